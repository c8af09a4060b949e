"""`paraloop run config.toml`: serve the model and train its adapter with GRPO, in one process.

    rollout source --RolloutBatch--> learner --AdapterPublished--> publisher --swap--> engine <--HTTP-- environments
    (mock env / Atropos)             learner --SaveCheckpoint--> checkpointer
                                     learner --StepFinished--> monitor (metrics.jsonl, TensorBoard, W&B, progress line)
                                   publisher --version--> evaluator --EvalFinished--> monitor  ([eval] every_steps)

Every actor runs in one anyio task group; the learner and checkpointer form the finite part: when they are done
(total steps, /control/stop, SIGINT/SIGTERM) the rest is cancelled. An actor that raises cancels the group and the
process exits 1 with its error. The watchdog (run/watchdog.py) reports a part that has work but makes no progress;
with [watchdog] stall_timeout it ends the run (exit 3). Launched as one rank of several (docs/distributed.md), the
ranks decide each step together (run/ranks.py); rank 0 alone writes checkpoints and metrics and evaluates.

Exit codes: 0 done (total steps, /control/stop, a first SIGINT/SIGTERM), 1 an actor failed, 2 bad configuration or
input, 3 stalled past stall_timeout, 130 a second SIGINT/SIGTERM or an interrupt.
"""

import argparse
import json
import logging
import os
import signal
import sys
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio

from paraloop.config import ConfigError, Settings, public_dump
from paraloop.flags import add_config_flags, settings_from_args
from paraloop.logs import hard_exit
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


@dataclass
class Parts:
    """What the actors run on: `build_parts` makes them from the settings; tests make them from small fakes."""

    trainer: Any  # learn.trainer.Trainer: step, adapter, reference, state, step_count, version
    thread: Any  # the learner's MlxThread
    engine: Any  # engine.Engine: run, swap_adapter, stats, version, tokenizer (and what the HTTP routes call)
    source: AsyncIterator[Any] | None  # RolloutBatch; None on a rank of a distributed run that makes no rollouts
    source_status: Callable[[], dict[str, Any]]
    adapter_config: dict[str, Any] | None
    tokenizer: Any = None  # for readable rollout samples and held-out evaluation (None: neither)
    resumed: bool = False
    journal: Any = None  # run.journal.Journal, for sources that cannot send a batch again (Atropos)
    replay: list[Any] = field(default_factory=list)  # journal.Replay: groups a resumed run trains first
    consumed: Any = None  # journal.Consumed: the resumed checkpoint's (None without a journal)
    ranks: Any = None  # distributed.Ranks when launched as one rank of several
    watcher: Any = None  # run/peers.py's heartbeat watcher of a distributed run


async def build_parts(settings: Settings, thread: Any) -> Parts:
    """Join the other ranks (if launched as one of several), load the model (on the learner's thread), its engine
    twin and the rollout source; set up the journal."""
    from paraloop import checkpoint
    from paraloop.engine import Engine
    from paraloop.engine.engine import vocab_size
    from paraloop.lora import AdapterSlots
    from paraloop.run import ranks as ranked
    from paraloop.run.journal import JOURNAL, Consumed, Journal
    from paraloop.run.setup import make_source

    rl = settings.rl_training
    run_dir = Path(settings.checkpoint.dir)
    ranks, watcher = await ranked.join(settings, thread)  # (None, None) unless launched as one of several ranks
    follower = ranks is not None and not ranks.is_root
    models = await ranked.build(settings, thread, ranks, watcher)
    trainer = models.trainer
    names = list(trainer.adapter()) if rl.train_mode == "full" else None  # full mode swaps every weight
    slots = AdapterSlots(models.engine_model, names=names)
    if models.resumed is not None or follower:  # a follower serves rank 0's start state
        slots.swap(trainer.adapter())
        if models.resumed is not None:
            log.info("resumed from %s at step %d (version %d)", models.resumed.path, trainer.step_count,
                     trainer.version)
    elif models.adapter_config is not None:
        await thread.call(checkpoint.write_initial_adapter, run_dir, trainer.adapter(), models.adapter_config,
                          settings.checkpoint.adapter_format)
    find = None
    if settings.server.checkpoint_adapters and rl.train_mode == "lora":
        find = partial(checkpoint.step_dir_of, run_dir)  # "policy@step_000040" is served from it
    engine = Engine.from_settings(models.engine_model, models.tokenizer, settings, adapter=slots,
                                  version=trainer.version, find_adapter=find)
    parts = Parts(trainer=trainer, thread=thread, engine=engine, source=None, source_status=dict,
                  adapter_config=models.adapter_config, tokenizer=models.tokenizer,
                  resumed=models.resumed is not None, ranks=ranks, watcher=watcher)
    if not ranked.has_source(settings, ranks):  # a rank of a distributed run may have no rollouts to make
        return parts
    if rl.atropos.api_url and not follower:  # its batches exist only here once fetched: journal them
        parts.journal = Journal(run_dir)
        state = models.resumed.trainer_state.get("journal") if models.resumed is not None else None
        try:
            parts.consumed = Consumed.from_json(state) if state is not None else Consumed()
        except ValueError as e:
            raise SetupError(f"cannot resume from {models.resumed.path}: {e}") from None
        earlier = models.resumed.path.parents[1] / JOURNAL if models.resumed is not None else None
        if earlier is not None and earlier.is_dir():  # resumed from another run dir: bring its entries along
            parts.journal.adopt(Journal(earlier.parent), parts.consumed)
        parts.replay = parts.journal.unconsumed(parts.consumed)
    parts.source, parts.source_status = make_source(
        settings, engine, models.tokenizer, models.resumed, share=(ranks.rank, ranks.size) if ranks else (0, 1),
        replay=parts.replay, vocab=vocab_size(models.engine_model, models.tokenizer))
    return parts


async def run_async(settings: Settings, *, ready: Any = None) -> dict[str, Any]:
    """Run until total_steps, /control/stop or a signal. `ready(port)` is called once HTTP serves."""
    from paraloop import checkpoint
    from paraloop.distributed import launch_rank
    from paraloop.run.mlx_thread import MlxThread
    from paraloop.run.monitor import eval_table, summary_table
    from paraloop.run.reporters import MissingExtra, close_all, open_reporters

    rl = settings.rl_training
    run_dir = Path(settings.checkpoint.dir)
    run_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before anything runs
    root = launch_rank() == 0  # rank 0 alone writes checkpoints and metrics and evaluates
    if not settings.checkpoint.resume and root and checkpoint.list_checkpoints(run_dir):
        raise SetupError(
            f"{run_dir} already holds checkpoints of an earlier run: continue it with --resume {run_dir}, "
            "or give another --run-dir (nothing is overwritten)"
        )
    plan = None
    if root and settings.eval.every_steps and (settings.eval.task or not rl.atropos.api_url):
        from paraloop.evaluation import eval_plan

        try:
            plan = eval_plan(settings)  # before the model loads (preflight has checked it already)
        except ConfigError as e:
            raise SetupError(str(e)) from None
    try:
        reporters = open_reporters(settings, run_dir) if root else []
    except MissingExtra as e:
        raise SetupError(str(e)) from None
    thread = MlxThread("paraloop-learner")
    try:
        parts = await build_parts(settings, thread)
        status = await run_actors(settings, parts, ready=ready, plan=plan, reporters=reporters)
    finally:
        thread.close()
        close_all(reporters)  # the monitor closed them unless it never ran; closing twice is harmless
    if status.history and root:
        print("\n" + summary_table(status.history), file=sys.stderr)
    if eval_table(status.evals):
        print("\n" + eval_table(status.evals), file=sys.stderr)
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
    plan: Any = None,
    reporters: list[Any] | None = None,
) -> Any:
    """Start every actor in one task group and run until the learner is done; returns the run's status.

    `signals`: handle SIGINT/SIGTERM (only where the main thread runs the loop). `status_out` receives the
    RunStatus as soon as it exists (for tests that watch a run from outside). `plan`: the held-out evaluation
    (evaluation.eval_plan; None: none). `reporters`: where metrics go (default: those `[logging]` names)."""
    from paraloop.atropos.evals import EVAL_DIR, AtroposEvals
    from paraloop.dashboard import LiveRun, dashboard_routes
    from paraloop.engine.adapters import load_modules
    from paraloop.learn.algorithms import get_algorithm
    from paraloop.messages import AdapterPublished, EvalFinished, RolloutBatch, SaveCheckpoint, StepFinished
    from paraloop.run import peers
    from paraloop.run import ranks as ranked
    from paraloop.run.buffer import RolloutBuffer
    from paraloop.run.checkpointer import run_checkpointer
    from paraloop.run.control import LearnerControl, control_routes, run_families
    from paraloop.run.evaluator import Evaluator
    from paraloop.run.fetcher import run_fetcher
    from paraloop.run.learner import Learner
    from paraloop.run.monitor import run_monitor
    from paraloop.run.publisher import run_publisher
    from paraloop.run.reporters import open_reporters
    from paraloop.run.samples import rollout_samples
    from paraloop.run.status import RunStatus
    from paraloop.run.watchdog import Watchdog
    from paraloop.server.app import make_app, serve_http
    from paraloop.server.metrics import METRICS

    rl = settings.rl_training
    run_dir = Path(settings.checkpoint.dir)
    trainer, engine, ranks, watcher = parts.trainer, parts.engine, parts.ranks, parts.watcher
    follower = ranks is not None and not ranks.is_root
    if follower:
        plan = None  # rank 0 alone evaluates
    if reporters is None:
        reporters = [] if follower else open_reporters(settings, run_dir)
    status = RunStatus(total_steps=rl.total_steps, mode=rl.mode, run_dir=str(run_dir), step=trainer.step_count,
                       version=trainer.version, serving_version=trainer.version, engine_stats=engine.stats,
                       source_status=parts.source_status, rollouts=deque(maxlen=settings.logging.rollout_steps))
    if status_out is not None:
        status_out.append(status)
    if parts.journal is not None:
        status.journal_stats = parts.journal.stats
    if settings.logging.rollout_samples and parts.tokenizer is not None:
        advantages = partial(get_algorithm(rl.algorithm).advantages, scale=rl.scale_rewards, eps=rl.advantage_eps)
        status.sampler = lambda batch, step, version: rollout_samples(
            batch, parts.tokenizer, step=step, version=version, k=settings.logging.rollout_samples,
            advantages=advantages, max_tokens=settings.logging.max_sample_tokens)
    control = LearnerControl(status)
    batches_send, batches_recv = anyio.create_memory_object_stream[RolloutBatch](OUTBOX_SIZE)
    published_send, published_recv = anyio.create_memory_object_stream[AdapterPublished](1)
    ckpt_send, ckpt_recv = anyio.create_memory_object_stream[SaveCheckpoint](2)
    finished_send, finished_recv = anyio.create_memory_object_stream[StepFinished | EvalFinished](64)
    sync = rl.mode == "sync"
    source = parts.source
    credits_send, credits_recv = anyio.create_memory_object_stream[int](1) if sync and source else (None, None)
    # With evaluation, versions pass through the evaluator first (in sync mode it forwards the credits).
    versions_send, versions_recv = anyio.create_memory_object_stream[int](1) if plan else (None, None)
    publisher_credits = versions_send if plan else credits_send
    learner_credits = publisher_credits.clone() if sync and publisher_credits is not None else None
    status.queues = {"rollouts": batches_send, "publish": published_send, "checkpoints": ckpt_send,
                     "metrics": finished_send}
    coordinator = None
    if ranks is not None:
        coordinator = ranked.Coordinator(ranks, parts.thread, status, control, source=source is not None,
                                         checksum_interval=settings.distributed.checksum_interval, run_dir=run_dir)
        watcher.done = lambda: coordinator.done
        status.ranks_status = watcher.status
    learner = Learner(
        trainer, parts.thread, status=status, control=control, total_steps=rl.total_steps,
        checkpoint_interval=settings.checkpoint.interval, save_every_step=settings.checkpoint.save_every_step,
        batches=batches_recv, published=published_send, checkpoints=ckpt_send, finished=finished_send,
        credits=learner_credits,
        max_staleness=rl.max_staleness if rl.staleness_applies else None, stale_policy=rl.stale_policy,
        consumed=parts.consumed, ranks=coordinator,
    )
    evaluator = None
    if plan is not None:
        evaluator = Evaluator(engine, parts.tokenizer, plan, every=settings.eval.every_steps, status=status,
                              step=lambda: trainer.step_count, total_steps=rl.total_steps,
                              results=finished_send.clone())
    watchdog = Watchdog(status, settings.watchdog)
    config_dump = public_dump(settings)  # no control_token: checkpoints, the dashboard and W&B show this
    routes = []
    if not follower:
        live = LiveRun(status, config_dump, name=run_dir.resolve().name,  # noqa: ASYNC240 - once, at start
                       resumed_at=trainer.step_count if parts.resumed else None,
                       rollout_steps=settings.logging.rollout_steps)
        routes += [*control_routes(status, control),
                   *dashboard_routes(live, token_required=bool(settings.server.control_token))]
    if ranks is not None:  # /ranks (heartbeats); a follower's /control answers 409 naming rank 0
        routes += peers.rank_routes(watcher, status, follower=follower)
    app = make_app(engine, settings=settings, extra_routes=routes,
                   stalled=lambda: {part: info["reason"] for part, info in status.stalled.items()})
    app[METRICS].add_collector(partial(run_families, status))
    status.prometheus = app[METRICS]

    async def end_stalled(parts_stalled: dict[str, str]) -> None:
        """stall_timeout: stop taking batches and write a final checkpoint while the learner can take one."""
        control.stop()
        with anyio.move_on_after(STALL_CHECKPOINT_S):
            written = await learner.checkpoint_now(final=True)
            if written is not None and written.error is None:
                log.error("final checkpoint before ending the stalled run: %s", written.path)

    async with anyio.create_task_group() as tg:
        await tg.start(engine.run, name="engine")
        if settings.server.lora_modules:
            try:
                await load_modules(engine.adapters, settings.server.lora_modules)
            except ValueError as e:
                raise SetupError(str(e)) from None
        port = await tg.start(serve_http, app, settings.server.host,
                              peers.bound_port(settings, ranks.rank) if ranks else settings.server.port, name="http")
        status.http_port = port
        if not follower:
            server_info = {"host": settings.server.host, "port": port, "pid": os.getpid()}
            (run_dir / "server.json").write_text(json.dumps(server_info))  # noqa: ASYNC240 - a few bytes, once
        if ranks is not None:
            host = peers.advertise_host(settings, ranks.rank)
            watcher.set_peers(await peers.exchange_addresses(ranks, parts.thread, host, port))
            coordinator.info = {"url": f"http://{host}:{port}", "pid": os.getpid(),
                                "peers": [p["url"] for p in [*watcher.peers]]}
            coordinator.write_rank_file()
            await tg.start(watcher.run, name="heartbeats")
            await coordinator.compare(trainer, trainer.step_count)  # every rank starts from rank 0's state
        log.info("serving on http://%s:%d (adapter version %d)%s", settings.server.host, port, trainer.version,
                 "" if follower else f"; dashboard: http://{settings.server.host}:{port}/dashboard")
        if ready is not None:
            ready(port)
        if signals and threading_main():
            await tg.start(partial(watch_signals, control, hard_exit=hard_exit), name="signals")
        await tg.start(partial(watchdog.run, on_timeout=end_stalled, hard_exit=hard_exit), name="watchdog")
        # Sync mode is strictly on-policy: groups that dynamic sampling drew beyond a batch are dropped at the
        # next version, never trained on by the one after.
        sync_staleness = 0 if rl.dynamic_sampling else None
        buffer = RolloutBuffer(
            batch_size=ranked.local_batch_size(settings, ranks), priority=rl.buffer_priority,
            max_staleness=rl.max_staleness if rl.staleness_applies else sync_staleness,
            stale_policy=rl.stale_policy if rl.staleness_applies else "drop", drop_zero_signal=rl.dynamic_sampling,
        )
        status.buffer_stats = buffer.stats
        if evaluator is not None and not parts.resumed:
            await evaluator.evaluate_now(trainer.version)  # the starting adapter, before any rollout
        if source is not None:
            tg.start_soon(partial(run_fetcher, source, batches_send, buffer=buffer, version=lambda: trainer.version,
                                  credits=credits_recv, journal=parts.journal, replay=parts.replay,
                                  max_draws=rl.dynamic_sampling_max_draws if rl.dynamic_sampling else None),
                          name="fetcher")
        # The finite part: the learner and everything downstream of it end by end-of-stream, in turn, so the
        # last swap, checkpoint and metrics line are done before the rest (engine, HTTP, fetcher) is cancelled.
        async with anyio.create_task_group() as training:
            training.start_soon(learner.run, name="learner")
            training.start_soon(partial(run_publisher, published_recv, engine=engine, status=status,
                                        credits=publisher_credits, drain=sync), name="publisher")
            if evaluator is not None:
                training.start_soon(evaluator.run, versions_recv, credits_send, name="evaluator")
            if follower:  # rank 0 alone writes metrics and checkpoints
                ckpt_recv.close()
                training.start_soon(partial(ranked.follow, finished_recv, status=status), name="monitor")
            else:
                atropos_evals = AtroposEvals(run_dir / EVAL_DIR) if rl.atropos.api_url else None
                training.start_soon(partial(run_monitor, finished_recv, status=status, reporters=reporters,
                                            mismatch_threshold=rl.mismatch_threshold, atropos_evals=atropos_evals),
                                    name="monitor")
                training.start_soon(partial(
                    run_checkpointer, ckpt_recv, run_dir=str(run_dir), adapter_config=parts.adapter_config,
                    adapter_format=settings.checkpoint.adapter_format, keep_last=settings.checkpoint.keep_last,
                    config=config_dump, status=status, journal=parts.journal,
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
        from paraloop.distributed import launch_rank

        # before anything loads: a mistake costs a second, not a model load
        model_dir = preflight(settings, follower=launch_rank() > 0)
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
    if not args.no_plot and launch_rank() == 0 and (Path(settings.checkpoint.dir) / "metrics.jsonl").is_file():
        try:
            from paraloop.plot import plot_run

            print(f"wrote {plot_run(settings.checkpoint.dir)}", file=sys.stderr)
        except ImportError:
            print("paraloop: no plot: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        except (OSError, ValueError) as e:  # the run itself succeeded: say why there is no picture, exit 0
            print(f"paraloop: no plot: {e}", file=sys.stderr)
    return 0
