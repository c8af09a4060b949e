"""`paraloop run config.toml`: serve the model and train its adapter with GRPO, in one process.

    rollout source --RolloutBatch--> learner --AdapterPublished--> publisher --swap--> engine <--HTTP-- environments
    (mock env / Atropos)             learner --SaveCheckpoint--> checkpointer
                                     learner --StepFinished--> monitor (metrics.jsonl, progress line)

Every actor runs in one anyio task group; the learner and checkpointer form the finite part: when they are done
(total steps, /control/stop, SIGINT/SIGTERM) the rest is cancelled. An actor that raises cancels the group and the
process exits 1 with its error. The watchdog (run/watchdog.py) reports a part that has work but makes no progress;
with [watchdog] stall_timeout it ends the run (exit 3).

Exit codes: 0 done (total steps, /control/stop, a first SIGINT/SIGTERM), 1 an actor failed, 2 bad configuration or
input, 3 stalled past stall_timeout, 130 a second SIGINT/SIGTERM or an interrupt.
"""

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio

from paraloop.config import ConfigError, Settings, public_dump
from paraloop.flags import add_config_flags, settings_from_args
from paraloop.run.setup import SetupError

log = logging.getLogger("paraloop.run")

OUTBOX_SIZE = 1  # one batch waits while the learner steps: bounded staleness in async mode
STALL_CHECKPOINT_S = 120.0  # stall_timeout: the longest wait for the final checkpoint before the run ends
EXIT_STALLED = 3


async def watch_signals(
    control: Any, *, hard_exit: Callable[[int, str], Any], task_status: Any = anyio.TASK_STATUS_IGNORED
) -> None:
    """First SIGINT/SIGTERM: graceful stop (final checkpoint, exit 0). A second one: exit at once (130)."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        count = 0
        async for signum in signals:
            count += 1
            if count == 1:
                log.info("%s: finishing the step in flight and writing a final checkpoint (again: exit at once)",
                         signal.Signals(signum).name)
                control.stop()
            else:
                # A step or a checkpoint write in flight holds its thread in a call nothing can interrupt: the
                # user asked not to wait for it. The newest checkpoint on disk stands (a half-written one is a
                # hidden .tmp dir that the next write removes); fetched batches are in the journal.
                hard_exit(130, f"second {signal.Signals(signum).name}: exiting now, without a final checkpoint")


def hard_exit(code: int, message: str) -> None:
    """End the process now, skipping the orderly shutdown (a second signal; a thread that will never return, which
    could be neither cancelled nor joined). Says why first."""
    log.error(message)
    print(f"paraloop: {message}", file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    logging.shutdown()
    os._exit(code)


@dataclass
class Parts:
    """What the actors run on: `build_parts` makes them from the settings; tests make them from small fakes."""

    trainer: Any  # learn.trainer.Trainer: step, adapter, reference, state, step_count, version
    thread: Any  # the learner's MlxThread
    engine: Any  # engine.Engine: run, swap_adapter, stats, version, tokenizer (and what the HTTP routes call)
    source: AsyncIterator[Any]  # RolloutBatch
    source_status: Callable[[], dict[str, Any]]
    adapter_config: dict[str, Any] | None
    journal: Any = None  # run.journal.Journal, for sources that cannot send a batch again (Atropos)
    replay: list[Any] = field(default_factory=list)  # journal.Replay: groups a resumed run trains first
    consumed: Any = None  # journal.Consumed: the resumed checkpoint's (None without a journal)


async def build_parts(settings: Settings, thread: Any) -> Parts:
    """Load the model (on the learner's thread), its engine twin and the rollout source; set up the journal."""
    from paraloop import checkpoint
    from paraloop.engine import Engine
    from paraloop.engine.engine import vocab_size
    from paraloop.lora import AdapterSlots
    from paraloop.run.journal import JOURNAL, Consumed, Journal
    from paraloop.run.setup import build_models, make_source

    rl = settings.rl_training
    run_dir = Path(settings.checkpoint.dir)
    models = await thread.call(build_models, settings)
    trainer = models.trainer
    names = list(trainer.adapter()) if rl.train_mode == "full" else None  # full mode swaps every weight
    slots = AdapterSlots(models.engine_model, names=names)
    if models.resumed is not None:
        slots.swap(models.resumed.adapter)
        log.info("resumed from %s at step %d (version %d)", models.resumed.path, trainer.step_count, trainer.version)
    elif models.adapter_config is not None:
        await thread.call(checkpoint.write_initial_adapter, run_dir, trainer.adapter(), models.adapter_config,
                          settings.checkpoint.adapter_format)
    engine = Engine.from_settings(models.engine_model, models.tokenizer, settings, adapter=slots,
                                  version=trainer.version)
    journal = consumed = None
    replay = []
    if rl.atropos.api_url:  # its batches exist only here once fetched: journal them (the mock env regenerates)
        journal = Journal(run_dir)
        state = models.resumed.trainer_state.get("journal") if models.resumed is not None else None
        try:
            consumed = Consumed.from_json(state) if state is not None else Consumed()
        except ValueError as e:
            raise SetupError(f"cannot resume from {models.resumed.path}: {e}") from None
        earlier = models.resumed.path.parents[1] / JOURNAL if models.resumed is not None else None
        if earlier is not None and earlier.is_dir():  # resumed from another run dir: bring its entries along
            journal.adopt(Journal(earlier.parent), consumed)
        replay = journal.unconsumed(consumed)
    source, source_status = make_source(settings, engine, models.tokenizer, models.resumed, replay=replay,
                                        vocab=vocab_size(models.engine_model, models.tokenizer))
    return Parts(trainer=trainer, thread=thread, engine=engine, source=source, source_status=source_status,
                 adapter_config=models.adapter_config, journal=journal, replay=replay, consumed=consumed)


async def run_async(settings: Settings, *, ready: Any = None) -> dict[str, Any]:
    """Run until total_steps, /control/stop or a signal. `ready(port)` is called once HTTP serves."""
    from paraloop import checkpoint
    from paraloop.run.mlx_thread import MlxThread
    from paraloop.run.monitor import summary_table

    run_dir = Path(settings.checkpoint.dir)
    run_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before anything runs
    if not settings.checkpoint.resume and checkpoint.list_checkpoints(run_dir):
        raise SetupError(
            f"{run_dir} already holds checkpoints of an earlier run: continue it with --resume {run_dir}, "
            "or give another --run-dir (nothing is overwritten)"
        )
    thread = MlxThread("paraloop-learner")
    try:
        parts = await build_parts(settings, thread)
        status = await run_actors(settings, parts, ready=ready)
    finally:
        thread.close()
    if status.history:
        print("\n" + summary_table(status.history), file=sys.stderr)
    return {"step": status.step, "version": status.version, "last_checkpoint": status.last_checkpoint,
            "history": status.history}


async def run_actors(
    settings: Settings,
    parts: Parts,
    *,
    ready: Callable[[int], Any] | None = None,
    signals: bool = True,
    hard_exit: Callable[[int, str], Any] = hard_exit,
    status_out: list[Any] | None = None,
) -> Any:
    """Start every actor in one task group and run until the learner is done; returns the run's status.

    `signals`: handle SIGINT/SIGTERM (only where the main thread runs the loop). `status_out` receives the
    RunStatus as soon as it exists (for tests that watch a run from outside)."""
    from paraloop.messages import AdapterPublished, RolloutBatch, SaveCheckpoint, StepFinished
    from paraloop.run.buffer import RolloutBuffer
    from paraloop.run.checkpointer import run_checkpointer
    from paraloop.run.control import LearnerControl, control_routes
    from paraloop.run.fetcher import run_fetcher
    from paraloop.run.learner import Learner
    from paraloop.run.monitor import run_monitor
    from paraloop.run.publisher import run_publisher
    from paraloop.run.status import RunStatus
    from paraloop.run.watchdog import Watchdog
    from paraloop.server.app import make_app, serve_http

    rl = settings.rl_training
    run_dir = Path(settings.checkpoint.dir)
    trainer, engine = parts.trainer, parts.engine
    status = RunStatus(total_steps=rl.total_steps, mode=rl.mode, run_dir=str(run_dir), step=trainer.step_count,
                       version=trainer.version, serving_version=trainer.version, engine_stats=engine.stats,
                       source_status=parts.source_status)
    if status_out is not None:
        status_out.append(status)
    if parts.journal is not None:
        status.journal_stats = parts.journal.stats
    control = LearnerControl(status)
    batches_send, batches_recv = anyio.create_memory_object_stream[RolloutBatch](OUTBOX_SIZE)
    published_send, published_recv = anyio.create_memory_object_stream[AdapterPublished](1)
    ckpt_send, ckpt_recv = anyio.create_memory_object_stream[SaveCheckpoint](2)
    finished_send, finished_recv = anyio.create_memory_object_stream[StepFinished](64)
    sync = rl.mode == "sync"
    credits_send, credits_recv = anyio.create_memory_object_stream[int](1) if sync else (None, None)
    status.queues = {"rollouts": batches_send, "publish": published_send, "checkpoints": ckpt_send,
                     "metrics": finished_send}
    learner = Learner(
        trainer, parts.thread, status=status, control=control, total_steps=rl.total_steps,
        checkpoint_interval=settings.checkpoint.interval, save_every_step=settings.checkpoint.save_every_step,
        batches=batches_recv, published=published_send, checkpoints=ckpt_send, finished=finished_send,
        credits=credits_send.clone() if credits_send else None,
        max_staleness=rl.max_staleness if rl.mode == "async" else None, stale_policy=rl.stale_policy,
        consumed=parts.consumed,
    )
    watchdog = Watchdog(status, settings.watchdog)
    app = make_app(engine, settings=settings, extra_routes=control_routes(status, control),
                   stalled=lambda: {part: info["reason"] for part, info in status.stalled.items()})

    async def end_stalled(parts_stalled: dict[str, str]) -> None:
        """stall_timeout: stop taking batches and write a final checkpoint while the learner can take one."""
        control.stop()
        with anyio.move_on_after(STALL_CHECKPOINT_S):
            written = await learner.checkpoint_now(final=True)
            if written is not None and written.error is None:
                log.error("final checkpoint before ending the stalled run: %s", written.path)

    async with anyio.create_task_group() as tg:
        await tg.start(engine.run, name="engine")
        port = await tg.start(serve_http, app, settings.server.host, settings.server.port, name="http")
        status.http_port = port
        server_info = {"host": settings.server.host, "port": port, "pid": os.getpid()}
        (run_dir / "server.json").write_text(json.dumps(server_info))  # noqa: ASYNC240 - a few bytes, once
        log.info("serving on http://%s:%d (adapter version %d)", settings.server.host, port, trainer.version)
        if ready is not None:
            ready(port)
        if signals and threading_main():
            await tg.start(partial(watch_signals, control, hard_exit=hard_exit), name="signals")
        await tg.start(partial(watchdog.run, on_timeout=end_stalled, hard_exit=hard_exit), name="watchdog")
        buffer = RolloutBuffer(
            batch_size=rl.batch_size, priority=rl.buffer_priority,
            max_staleness=rl.max_staleness if rl.mode == "async" else None, stale_policy=rl.stale_policy,
        )
        status.buffer_stats = buffer.stats
        tg.start_soon(partial(run_fetcher, parts.source, batches_send, buffer=buffer, version=lambda: trainer.version,
                              credits=credits_recv, journal=parts.journal, replay=parts.replay), name="fetcher")
        # The finite part: the learner and everything downstream of it end by end-of-stream, in turn, so the
        # last swap, checkpoint and metrics line are done before the rest (engine, HTTP, fetcher) is cancelled.
        async with anyio.create_task_group() as training:
            training.start_soon(learner.run, name="learner")
            training.start_soon(partial(run_publisher, published_recv, engine=engine, status=status,
                                        credits=credits_send, drain=sync), name="publisher")
            training.start_soon(partial(run_monitor, finished_recv, status=status, run_dir=run_dir), name="monitor")
            training.start_soon(partial(
                run_checkpointer, ckpt_recv, run_dir=str(run_dir), adapter_config=parts.adapter_config,
                adapter_format=settings.checkpoint.adapter_format, keep_last=settings.checkpoint.keep_last,
                config=public_dump(settings), status=status, journal=parts.journal,  # no control_token in it
            ), name="checkpointer")
        tg.cancel_scope.cancel()
    return status


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def error_of(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="paraloop run", description="serve and train with GRPO in one process")
    parser.add_argument("config_file", nargs="?", help="TOML configuration (same as --config)")
    add_config_flags(parser)
    parser.add_argument("--no-plot", action="store_true", help="do not write RUN_DIR/metrics.png at the end")
    parser.add_argument("--dry-run", action="store_true", help="check the configuration, the paths it names and the "
                        "model's config.json (resolving a Hugging Face id), then exit without loading the model")
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args, config_path=args.config_file or args.config)
    except ConfigError as e:
        print(f"paraloop: error: {e}", file=sys.stderr)
        return 2
    from paraloop.run.preflight import preflight
    from paraloop.run.setup import SetupError

    try:
        model_dir = preflight(settings)  # before anything loads: a mistake costs a second, not a model load
    except SetupError as e:
        print(f"paraloop: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # e.g. while a Hugging Face download runs
        print("paraloop: interrupted", file=sys.stderr)
        return 130
    if args.dry_run:
        print(f"configuration ok: model {settings.model.base_path} at {model_dir}")
        return 0
    try:
        anyio.run(run_async, settings)
    except KeyboardInterrupt:
        print("paraloop: interrupted", file=sys.stderr)
        return 130
    except BaseException as e:  # noqa: BLE001 - report the actor's error in one line, exit non-zero
        err = error_of(e)
        from paraloop.run.watchdog import RunStalled

        if isinstance(err, SetupError):
            print(f"paraloop: error: {err}", file=sys.stderr)
            return 2
        if isinstance(err, KeyboardInterrupt):
            return 130
        if isinstance(err, RunStalled):
            print(f"paraloop: error: {err} (stall_timeout)", file=sys.stderr)
            return EXIT_STALLED
        log.exception("run failed", exc_info=err)
        print(f"paraloop: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    if not args.no_plot:
        try:
            from paraloop.plot import plot_run

            print(f"wrote {plot_run(settings.checkpoint.dir)}", file=sys.stderr)
        except ImportError:
            print("paraloop: no plot: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        except (OSError, ValueError) as e:  # the run itself succeeded: say why there is no picture, exit 0
            print(f"paraloop: no plot: {e}", file=sys.stderr)
    return 0
