"""`paraloop run config.toml`: serve the model and train its adapter with GRPO, in one process.

    rollout source --RolloutBatch--> learner --AdapterPublished--> publisher --swap--> engine <--HTTP-- environments
    (mock env / Atropos)             learner --SaveCheckpoint--> checkpointer
                                     learner --StepFinished--> monitor (metrics.jsonl, progress line)
                                   publisher --version--> evaluator --EvalFinished--> monitor  ([eval] every_steps)

Every actor runs in one anyio task group; the learner and checkpointer form the finite part: when they are done
(total steps, /control/stop, SIGINT/SIGTERM) the rest is cancelled. An actor that raises cancels the group and the
process exits 1 with its error.
"""

import argparse
import json
import logging
import os
import signal
import sys
from collections import deque
from functools import partial
from pathlib import Path
from typing import Any

import anyio

from paraloop.config import ConfigError, Settings, public_dump
from paraloop.flags import add_config_flags, settings_from_args

log = logging.getLogger("paraloop.run")

OUTBOX_SIZE = 1  # one batch waits while the learner steps: bounded staleness in async mode


async def watch_signals(control: Any, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
    """First SIGINT/SIGTERM: graceful stop (final checkpoint, exit 0). A second one: stop at once."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        count = 0
        async for signum in signals:
            count += 1
            if count == 1:
                log.info("%s: finishing the step in flight and writing a final checkpoint", signal.Signals(signum).name)
                control.stop()
            else:
                raise KeyboardInterrupt


async def run_async(settings: Settings, *, ready: Any = None) -> dict[str, Any]:
    """Run until total_steps, /control/stop or a signal. `ready(port)` is called once HTTP serves."""
    from paraloop import checkpoint
    from paraloop.atropos.evals import EVAL_DIR, AtroposEvals
    from paraloop.dashboard import LiveRun, dashboard_routes
    from paraloop.distributed import launch_rank
    from paraloop.engine import Engine
    from paraloop.learn.algorithms import get_algorithm
    from paraloop.lora import AdapterSlots
    from paraloop.messages import AdapterPublished, EvalFinished, RolloutBatch, SaveCheckpoint, StepFinished
    from paraloop.run import peers
    from paraloop.run import ranks as ranked
    from paraloop.run.buffer import RolloutBuffer
    from paraloop.run.checkpointer import run_checkpointer
    from paraloop.run.control import LearnerControl, control_routes, run_families
    from paraloop.run.evaluator import Evaluator
    from paraloop.run.fetcher import run_fetcher
    from paraloop.run.learner import Learner
    from paraloop.run.mlx_thread import MlxThread
    from paraloop.run.monitor import eval_table, run_monitor, summary_table
    from paraloop.run.publisher import run_publisher
    from paraloop.run.reporters import MissingExtra, close_all, open_reporters
    from paraloop.run.samples import rollout_samples
    from paraloop.run.setup import SetupError, make_source
    from paraloop.run.status import RunStatus
    from paraloop.server.app import make_app, serve_http
    from paraloop.server.metrics import METRICS

    rl = settings.rl_training
    run_dir = Path(settings.checkpoint.dir)
    run_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before anything runs
    if not settings.checkpoint.resume and launch_rank() == 0 and checkpoint.list_checkpoints(run_dir):
        raise SetupError(
            f"{run_dir} already holds checkpoints of an earlier run: continue it with --resume {run_dir}, "
            "or give another --run-dir (nothing is overwritten)"
        )
    plan = None
    if settings.eval.every_steps and (settings.eval.task or not rl.atropos.api_url):
        from paraloop.evaluation import eval_plan

        try:
            plan = eval_plan(settings)  # before the model loads (preflight has checked it already)
        except ConfigError as e:
            raise SetupError(str(e)) from None
    thread = MlxThread("paraloop-learner")
    try:
        reporters = open_reporters(settings, run_dir) if launch_rank() == 0 else []  # rank 0 alone writes metrics
    except MissingExtra as e:
        raise SetupError(str(e)) from None
    try:
        ranks, watcher = await ranked.join(settings, thread)  # (None, None) unless launched as one of several ranks
        follower = ranks is not None and not ranks.is_root
        if follower:
            plan = None  # rank 0 alone evaluates
        models = await ranked.build(settings, thread, ranks, watcher)
        trainer = models.trainer
        names = list(trainer.adapter()) if rl.train_mode == "full" else None  # full mode swaps every weight
        slots = AdapterSlots(models.engine_model, names=names)
        if models.resumed is not None or follower:
            slots.swap(trainer.adapter())
            if models.resumed is not None:
                log.info("resumed from %s at step %d (version %d)", models.resumed.path, trainer.step_count,
                         trainer.version)
        elif models.adapter_config is not None:
            await thread.call(checkpoint.write_initial_adapter, run_dir, trainer.adapter(), models.adapter_config,
                              settings.checkpoint.adapter_format)

        engine = Engine.from_settings(
            models.engine_model, models.tokenizer, settings, adapter=slots, version=trainer.version
        )
        status = RunStatus(total_steps=rl.total_steps, mode=rl.mode, run_dir=str(run_dir), step=trainer.step_count,
                         version=trainer.version, serving_version=trainer.version, engine_stats=engine.stats,
                         rollouts=deque(maxlen=settings.logging.rollout_steps))
        if settings.logging.rollout_samples:
            advantages = partial(get_algorithm(rl.algorithm).advantages, scale=rl.scale_rewards, eps=rl.advantage_eps)
            status.sampler = lambda batch, step, version: rollout_samples(
                batch, models.tokenizer, step=step, version=version, k=settings.logging.rollout_samples,
                advantages=advantages, max_tokens=settings.logging.max_sample_tokens)
        control = LearnerControl(status)
        batches_send, batches_recv = anyio.create_memory_object_stream[RolloutBatch](OUTBOX_SIZE)
        published_send, published_recv = anyio.create_memory_object_stream[AdapterPublished](1)
        ckpt_send, ckpt_recv = anyio.create_memory_object_stream[SaveCheckpoint](2)
        finished_send, finished_recv = anyio.create_memory_object_stream[StepFinished | EvalFinished](64)
        sync = rl.mode == "sync"
        source = ranked.has_source(settings, ranks)  # a rank of a distributed run may have no rollouts to make
        credits_send, credits_recv = anyio.create_memory_object_stream[int](1) if sync and source else (None, None)
        # With evaluation, versions pass through the evaluator first (in sync mode it forwards the credits).
        versions_send, versions_recv = anyio.create_memory_object_stream[int](1) if plan else (None, None)
        publisher_credits = versions_send if plan else credits_send
        learner_credits = publisher_credits.clone() if sync and publisher_credits is not None else None
        status.queues = {"rollouts": batches_send, "publish": published_send, "checkpoints": ckpt_send,
                        "metrics": finished_send}

        if source:
            source, status.source_status = make_source(settings, engine, models.tokenizer, models.resumed,
                                                       share=(ranks.rank, ranks.size) if ranks else (0, 1))
        coordinator = None
        if ranks is not None:
            coordinator = ranked.Coordinator(ranks, thread, status, control, source=bool(source),
                                             checksum_interval=settings.distributed.checksum_interval, run_dir=run_dir)
            watcher.done = lambda: coordinator.done
            status.ranks_status = watcher.status

        learner = Learner(
            trainer, thread, status=status, control=control, total_steps=rl.total_steps,
            checkpoint_interval=settings.checkpoint.interval, save_every_step=settings.checkpoint.save_every_step,
            batches=batches_recv, published=published_send, checkpoints=ckpt_send, finished=finished_send,
            credits=learner_credits,
            max_staleness=rl.max_staleness if rl.mode == "async" else None, stale_policy=rl.stale_policy,
            ranks=coordinator,
        )
        evaluator = None
        if plan is not None:
            evaluator = Evaluator(engine, models.tokenizer, plan, every=settings.eval.every_steps, status=status,
                                  step=lambda: trainer.step_count, total_steps=rl.total_steps,
                                  results=finished_send.clone())
        config_dump = public_dump(settings)  # no control_token: checkpoints, the dashboard and W&B show this
        live = LiveRun(status, config_dump, name=run_dir.resolve().name,  # noqa: ASYNC240 - once, at start
                       resumed_at=trainer.step_count if models.resumed is not None else None,
                       rollout_steps=settings.logging.rollout_steps)
        token_required = bool(settings.server.control_token)
        routes = [] if follower else [*control_routes(status, control),
                                      *dashboard_routes(live, token_required=token_required)]
        if ranks is not None:  # /ranks (heartbeats); a follower's /control answers 409 naming rank 0
            routes += peers.rank_routes(watcher, status, follower=follower)
        app = make_app(engine, settings=settings, extra_routes=routes)
        app[METRICS].add_collector(partial(run_families, status))
        status.prometheus = app[METRICS]
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            port = await tg.start(serve_http, app, settings.server.host,
                                  peers.bound_port(settings, ranks.rank) if ranks else settings.server.port)
            status.http_port = port
            if not follower:
                (run_dir / "server.json").write_text(json.dumps({"host": settings.server.host, "port": port, "pid": os.getpid()}))
            if ranks is not None:
                host = peers.advertise_host(settings, ranks.rank)
                watcher.set_peers(await peers.exchange_addresses(ranks, thread, host, port))
                coordinator.info = {"url": f"http://{host}:{port}", "pid": os.getpid(),
                                    "peers": [p["url"] for p in [*watcher.peers]]}
                coordinator.write_rank_file()
                await tg.start(watcher.run)
                await coordinator.compare(trainer, trainer.step_count)  # every rank starts from rank 0's state
            log.info("serving on http://%s:%d (adapter version %d)%s", settings.server.host, port, trainer.version,
                     "" if follower else f"; dashboard: http://{settings.server.host}:{port}/dashboard")
            if ready is not None:
                ready(port)
            if threading_main():
                await tg.start(watch_signals, control)
            # Sync mode is strictly on-policy: groups that dynamic sampling drew beyond a batch are dropped at the
            # next version, never trained on by the one after.
            sync_staleness = 0 if rl.dynamic_sampling else None
            buffer = RolloutBuffer(
                batch_size=ranked.local_batch_size(settings, ranks), priority=rl.buffer_priority,
                max_staleness=rl.max_staleness if rl.mode == "async" else sync_staleness,
                stale_policy=rl.stale_policy if rl.mode == "async" else "drop", drop_zero_signal=rl.dynamic_sampling,
            )
            status.buffer_stats = buffer.stats
            if evaluator is not None and models.resumed is None:
                await evaluator.evaluate_now(trainer.version)  # the starting adapter, before any rollout
            if source:
                tg.start_soon(partial(run_fetcher, source, batches_send, buffer=buffer,
                                      version=lambda: trainer.version, credits=credits_recv,
                                      max_draws=rl.dynamic_sampling_max_draws if rl.dynamic_sampling else None))
            # The finite part: the learner and everything downstream of it end by end-of-stream, in turn, so the
            # last swap, checkpoint and metrics line are done before the rest (engine, HTTP, fetcher) is cancelled.
            async with anyio.create_task_group() as training:
                training.start_soon(learner.run)
                training.start_soon(partial(run_publisher, published_recv, engine=engine, status=status,
                                            credits=publisher_credits, drain=sync))
                if evaluator is not None:
                    training.start_soon(evaluator.run, versions_recv, credits_send)
                if follower:  # rank 0 alone writes metrics and checkpoints
                    ckpt_recv.close()
                    training.start_soon(partial(ranked.follow, finished_recv, status=status))
                else:
                    atropos_evals = AtroposEvals(run_dir / EVAL_DIR) if rl.atropos.api_url else None
                    training.start_soon(partial(run_monitor, finished_recv, status=status, reporters=reporters,
                                                mismatch_threshold=rl.mismatch_threshold,
                                                atropos_evals=atropos_evals))
                    training.start_soon(partial(
                        run_checkpointer, ckpt_recv, run_dir=str(run_dir), adapter_config=models.adapter_config,
                        adapter_format=settings.checkpoint.adapter_format, keep_last=settings.checkpoint.keep_last,
                        config=config_dump, status=status,
                    ))
            tg.cancel_scope.cancel()
    finally:
        thread.close()
        close_all(reporters)  # the monitor closed them unless it never ran; closing twice is harmless
    if status.history and not follower:
        print("\n" + summary_table(status.history), file=sys.stderr)
    if eval_table(status.evals):
        print("\n" + eval_table(status.evals), file=sys.stderr)
    return {"step": status.step, "version": status.version, "last_checkpoint": status.last_checkpoint,
            "history": status.history}


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
        from paraloop.run.setup import SetupError

        if isinstance(err, SetupError):
            print(f"paraloop: error: {err}", file=sys.stderr)
            return 2
        if isinstance(err, KeyboardInterrupt):
            return 130
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
