"""What `paraloop run` builds and how its actors are joined, read top to bottom.

    rollout source --RolloutBatch--> learner --AdapterPublished--> publisher --swap--> engine <--HTTP-- environments
    (mock env / Atropos)             learner --SaveCheckpoint--> checkpointer
                                     learner --StepFinished--> monitor (metrics.jsonl, TensorBoard, W&B, progress line)
                                   publisher --version--> evaluator --EvalFinished--> monitor  ([eval] every_steps)

`run_async` is one run: `build_parts` (the other ranks joined, the model loaded on the learner's thread, its engine
twin, the rollout source, the journal), then `run_actors` (every actor in one anyio task group). The learner and
the actors downstream of it (publisher, evaluator, checkpointer, monitor) are the finite part: when they are done
(total steps, /control/stop, SIGINT/SIGTERM) the rest is cancelled. An actor that raises cancels the group. The
watchdog (run/watchdog.py) reports a part that has work but makes no progress; with [watchdog] stall_timeout it
ends the run. Launched as one rank of several (docs/distributed.md), the ranks decide each step together
(run/ranks.py); rank 0 alone writes checkpoints and metrics and evaluates. Tests drive `run_actors` on the fakes of
tests/support/run_fakes.py.
"""

import json
import logging
import os
import signal
import sys
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import anyio
from aiohttp import web
from anyio.abc import TaskGroup, TaskStatus
from mlx_lm.tokenizer_utils import TokenizerWrapper

from paraloop import checkpoint
from paraloop.atropos.evals import EVAL_DIR, AtroposEvals
from paraloop.config import ConfigError, Settings, Staleness, public_dump
from paraloop.dashboard import LiveRun, dashboard_routes
from paraloop.distributed import Ranks, launch_rank
from paraloop.engine import Engine
from paraloop.engine.adapters import load_modules
from paraloop.engine.engine import vocab_size
from paraloop.evaluation import EvalPlan, eval_plan
from paraloop.learn.algorithms import get_algorithm
from paraloop.logs import hard_exit
from paraloop.lora import AdapterSlots
from paraloop.messages import AdapterPublished, EvalFinished, RolloutBatch, SaveCheckpoint, StepFinished
from paraloop.mlx_thread import ComputeThread, MlxThread
from paraloop.run import monitor, peers
from paraloop.run import ranks as ranked
from paraloop.run.agent_sessions import AgentSessions
from paraloop.run.buffer import RolloutBuffer
from paraloop.run.checkpointer import run_checkpointer
from paraloop.run.control import LearnerControl, control_routes, run_families
from paraloop.run.evaluator import Evaluator
from paraloop.run.fetcher import run_fetcher
from paraloop.run.journal import JOURNAL, Consumed, Journal, Replay
from paraloop.run.learner import Learner, Trainable
from paraloop.run.peers import Watcher
from paraloop.run.publisher import Swapping, run_publisher
from paraloop.run.reporters import MissingExtra, Reporter, close_all, open_reporters
from paraloop.run.samples import rollout_samples
from paraloop.run.session_routes import session_routes
from paraloop.run.setup import SetupError, make_source
from paraloop.run.status import RunStatus
from paraloop.run.teacher import distilled, make_teacher
from paraloop.run.watchdog import Watchdog
from paraloop.server.app import make_app, serve_http
from paraloop.server.metrics import Metrics
from paraloop.server.state import ServedEngine

log = logging.getLogger("paraloop.run")

OUTBOX_SIZE = 1  # one batch waits while the learner steps: bounded staleness in async mode
STALL_CHECKPOINT_S = 120.0  # stall_timeout: the longest wait for the final checkpoint before the run ends


class RunEngine(ServedEngine, Swapping, Protocol):
    """The engine as the run wires it: started in the task group, served over HTTP, swapped by the publisher
    (engine.Engine; tests: run_fakes.FakeEngine)."""

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None: ...


@dataclass
class Parts:
    """What the actors run on: `build_parts` makes them from the settings; tests make them from small fakes."""

    trainer: Trainable
    thread: ComputeThread  # the learner's
    engine: RunEngine
    source: AsyncIterator[RolloutBatch] | None  # None on a rank of a distributed run that makes no rollouts
    source_status: Callable[[], dict[str, Any]]
    adapter_config: dict[str, Any] | None
    tokenizer: TokenizerWrapper | None = None  # for readable rollout samples and held-out evaluation (None: neither)
    resumed: bool = False
    journal: Journal | None = None  # for sources that cannot send a batch again (Atropos)
    replay: list[Replay] = field(default_factory=list)  # groups a resumed run trains first
    consumed: Consumed | None = None  # the resumed checkpoint's (None without a journal)
    ranks: Ranks | None = None  # when launched as one rank of several
    watcher: Watcher | None = None  # the heartbeats of a distributed run
    sessions: AgentSessions | None = None  # rollout source "sessions": recorded by the HTTP routes, rewarded there


async def run_async(settings: Settings, *, ready: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """Run until total_steps, /control/stop or a signal. `ready(port)` is called once HTTP serves."""
    run_dir = Path(settings.checkpoint.dir)
    run_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before anything runs
    root = launch_rank() == 0  # rank 0 alone writes checkpoints and metrics and evaluates
    if not settings.checkpoint.resume and root and checkpoint.list_checkpoints(run_dir):
        raise SetupError(
            f"{run_dir} already holds checkpoints of an earlier run: continue it with --resume {run_dir}, "
            "or give another --run-dir (nothing is overwritten)"
        )
    plan = evaluation_plan(settings) if root else None  # before the model loads
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
        print("\n" + monitor.summary_table(status.history), file=sys.stderr)
    if monitor.eval_table(status.evals):
        print("\n" + monitor.eval_table(status.evals), file=sys.stderr)
    return {
        "step": status.step,
        "version": status.version,
        "last_checkpoint": status.last_checkpoint,
        "history": status.history,
    }


def evaluation_plan(settings: Settings) -> EvalPlan | None:
    """The held-out evaluation `[eval] every_steps` asks for (an Atropos or agent sessions run evaluates only with
    `[eval] task`)."""
    if not settings.eval.every_steps or not (settings.eval.task or settings.rl_training.rollout_source == "mock"):
        return None
    try:
        return eval_plan(settings)  # preflight has checked it already
    except ConfigError as e:
        raise SetupError(str(e)) from None


async def build_parts(settings: Settings, thread: MlxThread) -> Parts:
    """Join the other ranks (if launched as one of several), load the model (on the learner's thread), its engine
    twin and the rollout source; set up the journal."""
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
            log.info(
                "resumed from %s at step %d (version %d)", models.resumed.path, trainer.step_count, trainer.version
            )
    elif models.adapter_config is not None:
        await thread.call(
            checkpoint.write_initial_adapter,
            run_dir,
            trainer.adapter(),
            models.adapter_config,
            settings.checkpoint.adapter_format,
        )
    find = None
    if settings.server.checkpoint_adapters and rl.train_mode == "lora":
        find = partial(checkpoint.step_dir_of, run_dir)  # "policy@step_000040" is served from it
    engine = Engine.from_settings(
        models.engine_model, models.tokenizer, settings, adapter=slots, version=trainer.version, find_adapter=find
    )
    parts = Parts(
        trainer=trainer,
        thread=thread,
        engine=engine,
        source=None,
        source_status=dict,
        adapter_config=models.adapter_config,
        tokenizer=models.tokenizer,
        resumed=models.resumed is not None,
        ranks=ranks,
        watcher=watcher,
    )
    if not ranked.has_source(settings, ranks):  # a rank of a distributed run may have no rollouts to make
        return parts
    if rl.rollout_source != "mock" and not follower:  # its batches exist only here once fetched: journal them
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
    if rl.rollout_source == "sessions":  # agents' own traffic, recorded by the HTTP routes
        parts.sessions = AgentSessions(rl.sessions, batch_size=rl.batch_size, journal=parts.journal)
        parts.source, parts.source_status = parts.sessions.batches(), parts.sessions.stats
        return parts
    parts.source, parts.source_status = make_source(
        settings,
        engine,
        models.tokenizer,
        models.resumed,
        share=(ranks.rank, ranks.size) if ranks else (0, 1),
        replay=parts.replay,
        vocab=vocab_size(models.engine_model, models.tokenizer),
    )
    if settings.distill.teacher:  # on-policy distillation: the teacher scores every batch on its way in
        try:
            teacher = await make_teacher(settings, engine, models.tokenizer, thread)
        except ValueError as e:
            raise SetupError(str(e)) from None
        parts.source = distilled(parts.source, teacher)
    return parts


async def run_actors(
    settings: Settings,
    parts: Parts,
    *,
    ready: Callable[[int], Any] | None = None,
    signals: bool = True,
    hard_exit: Callable[[int, str], Any] = hard_exit,
    status_out: list[RunStatus] | None = None,
    plan: EvalPlan | None = None,
    reporters: list[Reporter] | None = None,
) -> RunStatus:
    """Start every actor in one task group and run until the learner is done; returns the run's status.

    `signals`: handle SIGINT/SIGTERM (only where the main thread runs the loop). `status_out` receives the
    RunStatus as soon as it exists (for tests that watch a run from outside). `plan`: the held-out evaluation
    (evaluation.eval_plan; None: none). `reporters`: where metrics go (default: those `[logging]` names)."""
    rl, run_dir, trainer, engine = settings.rl_training, Path(settings.checkpoint.dir), parts.trainer, parts.engine
    follower = parts.ranks is not None and not parts.ranks.is_root
    if follower:
        plan = None  # rank 0 alone evaluates
    if reporters is None:
        reporters = [] if follower else open_reporters(settings, run_dir)
    sync = rl.mode == "sync"

    # The inboxes, bounded. In sync mode the fetcher waits for a credit per adapter version; with evaluation,
    # versions pass through the evaluator first (which then forwards the credits).
    batches_send, batches_recv = anyio.create_memory_object_stream[RolloutBatch](OUTBOX_SIZE)
    published_send, published_recv = anyio.create_memory_object_stream[AdapterPublished](1)
    ckpt_send, ckpt_recv = anyio.create_memory_object_stream[SaveCheckpoint](2)
    finished_send, finished_recv = anyio.create_memory_object_stream[StepFinished | EvalFinished](64)
    credits_send, credits_recv = anyio.create_memory_object_stream[int](1) if sync and parts.source else (None, None)
    versions_send, versions_recv = anyio.create_memory_object_stream[int](1) if plan else (None, None)
    publisher_credits = versions_send if plan else credits_send
    learner_credits = publisher_credits.clone() if sync and publisher_credits is not None else None

    buffer = rollout_buffer(settings, parts.ranks)
    prometheus = Metrics()
    status = RunStatus(
        total_steps=rl.total_steps,
        mode=rl.mode,
        run_dir=str(run_dir),
        step=trainer.step_count,
        version=trainer.version,
        serving_version=trainer.version,
        engine_stats=engine.stats,
        source_status=parts.source_status,
        buffer_stats=buffer.stats,
        journal_stats=parts.journal.stats if parts.journal is not None else None,
        ranks_status=parts.watcher.status if parts.watcher is not None else None,
        queues={
            "rollouts": batches_send,
            "publish": published_send,
            "checkpoints": ckpt_send,
            "metrics": finished_send,
        },
        rollouts=deque(maxlen=settings.logging.rollout_steps),
        sampler=rollout_sampler(settings, parts.tokenizer),
        prometheus=prometheus,
    )
    if status_out is not None:
        status_out.append(status)
    control = LearnerControl(status)
    coordinator = coordinate(settings, parts, status, control)
    learner = Learner(
        trainer,
        parts.thread,
        status=status,
        control=control,
        total_steps=rl.total_steps,
        checkpoint_interval=settings.checkpoint.interval,
        save_every_step=settings.checkpoint.save_every_step,
        batches=batches_recv,
        published=published_send,
        checkpoints=ckpt_send,
        finished=finished_send,
        credits=learner_credits,
        max_staleness=rl.staleness.max_versions,
        stale_policy=rl.staleness.policy,
        consumed=parts.consumed,
        ranks=coordinator,
    )
    evaluator = None
    if plan is not None:
        evaluator = Evaluator(
            engine,
            parts.tokenizer,
            plan,
            every=settings.eval.every_steps,
            status=status,
            step=lambda: trainer.step_count,
            total_steps=rl.total_steps,
            results=finished_send.clone(),
        )
    config_dump = public_dump(settings)  # no control_token: checkpoints, the dashboard and W&B show this
    app = run_app(settings, parts, status, control, config_dump, prometheus, follower=follower)

    async def end_stalled(parts_stalled: dict[str, str]) -> None:
        """stall_timeout: stop taking batches and write a final checkpoint while the learner can take one."""
        control.stop()
        with anyio.move_on_after(STALL_CHECKPOINT_S):
            written = await learner.checkpoint_now(final=True)
            if written is not None and written.error is None:
                log.error("final checkpoint before ending the stalled run: %s", written.path)

    async with anyio.create_task_group() as tg:
        port = await serve(tg, settings, parts, app, coordinator, follower=follower)
        status.http_port = port  # known once HTTP serves
        if ready is not None:
            ready(port)
        if signals and threading.current_thread() is threading.main_thread():
            await tg.start(partial(watch_signals, control, hard_exit=hard_exit), name="signals")
        watchdog = Watchdog(status, settings.watchdog)
        await tg.start(partial(watchdog.run, on_timeout=end_stalled, hard_exit=hard_exit), name="watchdog")
        if evaluator is not None and not parts.resumed:
            await evaluator.evaluate_now(trainer.version)  # the starting adapter, before any rollout
        if parts.source is not None:
            tg.start_soon(
                partial(
                    run_fetcher,
                    parts.source,
                    batches_send,
                    buffer=buffer,
                    version=lambda: trainer.version,
                    credits=credits_recv,
                    journal=parts.journal,
                    replay=parts.replay,
                    max_draws=rl.dynamic_sampling_max_draws if rl.dynamic_sampling else None,
                ),
                name="fetcher",
            )
        # The finite part: the learner and everything downstream of it end by end-of-stream, in turn, so the
        # last swap, checkpoint and metrics line are done before the rest (engine, HTTP, fetcher) is cancelled.
        async with anyio.create_task_group() as training:
            training.start_soon(learner.run, name="learner")
            training.start_soon(
                partial(
                    run_publisher, published_recv, engine=engine, status=status, credits=publisher_credits, drain=sync
                ),
                name="publisher",
            )
            if evaluator is not None:
                training.start_soon(evaluator.run, versions_recv, credits_send, name="evaluator")
            if follower:  # rank 0 alone writes metrics and checkpoints
                ckpt_recv.close()
                training.start_soon(partial(ranked.follow, finished_recv, status=status), name="monitor")
            else:
                atropos_evals = AtroposEvals(run_dir / EVAL_DIR) if rl.atropos.api_url else None
                training.start_soon(
                    partial(
                        monitor.run_monitor,
                        finished_recv,
                        status=status,
                        reporters=reporters,
                        mismatch_threshold=rl.mismatch_threshold,
                        atropos_evals=atropos_evals,
                    ),
                    name="monitor",
                )
                training.start_soon(
                    partial(
                        run_checkpointer,
                        ckpt_recv,
                        run_dir=str(run_dir),
                        adapter_config=parts.adapter_config,
                        adapter_format=settings.checkpoint.adapter_format,
                        keep_last=settings.checkpoint.keep_last,
                        config=config_dump,
                        status=status,
                        journal=parts.journal,
                    ),
                    name="checkpointer",
                )
        tg.cancel_scope.cancel()
    return status


def rollout_buffer(settings: Settings, ranks: Ranks | None) -> RolloutBuffer:
    """The fetcher's buffer. Sync mode with the mock environment is strictly on-policy: groups that dynamic sampling
    drew beyond a batch are dropped at the next version, never trained on by the one after. Atropos rows, which
    environments generate ahead, answer to max_staleness / stale_policy in both modes."""
    rl = settings.rl_training
    staleness = rl.staleness
    if staleness.max_versions is None and rl.dynamic_sampling:
        staleness = Staleness(0, "drop")
    return RolloutBuffer(
        batch_size=ranked.local_batch_size(settings, ranks),
        priority=rl.buffer_priority,
        max_staleness=staleness.max_versions,
        stale_policy=staleness.policy,
        drop_zero_signal=rl.dynamic_sampling,
    )


def rollout_sampler(
    settings: Settings, tokenizer: TokenizerWrapper | None
) -> Callable[[RolloutBatch, int, int], list[dict[str, Any]]] | None:
    """The readable samples the status keeps of each step's rollouts (None: none kept)."""
    if not settings.logging.rollout_samples or tokenizer is None:
        return None
    rl = settings.rl_training
    advantages = partial(get_algorithm(rl.algorithm).advantages, scale=rl.scale_rewards, eps=rl.advantage_eps)
    return lambda batch, step, version: rollout_samples(
        batch,
        tokenizer,
        step=step,
        version=version,
        k=settings.logging.rollout_samples,
        advantages=advantages,
        max_tokens=settings.logging.max_sample_tokens,
    )


def coordinate(
    settings: Settings, parts: Parts, status: RunStatus, control: LearnerControl
) -> ranked.Coordinator | None:
    """The ranks' step decisions (None in a run of one process); the heartbeats end with them."""
    if parts.ranks is None or parts.watcher is None:
        return None
    coordinator = ranked.Coordinator(
        parts.ranks,
        parts.thread,
        status,
        control,
        source=parts.source is not None,
        checksum_interval=settings.distributed.checksum_interval,
        run_dir=Path(settings.checkpoint.dir),
    )
    parts.watcher.done = lambda: coordinator.done
    return coordinator


def run_app(
    settings: Settings,
    parts: Parts,
    status: RunStatus,
    control: LearnerControl,
    config_dump: dict[str, Any],
    prometheus: Metrics,
    *,
    follower: bool,
) -> web.Application:
    """The HTTP API: the engine's routes, /control and the dashboard (rank 0), /ranks (several ranks)."""
    run_dir = Path(settings.checkpoint.dir)
    routes: list[web.RouteDef] = []
    if not follower:
        live = LiveRun(
            status,
            config_dump,
            name=run_dir.resolve().name,
            resumed_at=parts.trainer.step_count if parts.resumed else None,
            rollout_steps=settings.logging.rollout_steps,
        )
        routes += [
            *control_routes(status, control),
            *(session_routes(parts.sessions) if parts.sessions is not None else []),
            *dashboard_routes(live, token_required=bool(settings.server.control_token)),
        ]
    if parts.watcher is not None:  # /ranks (heartbeats); a follower's /control answers 409 naming rank 0
        routes += peers.rank_routes(parts.watcher, status, follower=follower)
    app = make_app(
        parts.engine,
        settings=settings,
        extra_routes=routes,
        metrics=prometheus,
        stalled=lambda: {part: info["reason"] for part, info in status.stalled.items()},
        turns=parts.sessions,
    )
    prometheus.add_collector(partial(run_families, status))
    return app


async def serve(
    tg: TaskGroup,
    settings: Settings,
    parts: Parts,
    app: web.Application,
    coordinator: ranked.Coordinator | None,
    *,
    follower: bool,
) -> int:
    """Start the engine and HTTP in `tg` (and meet the other ranks); returns the bound port."""
    engine, ranks, watcher = parts.engine, parts.ranks, parts.watcher
    await tg.start(engine.run, name="engine")
    if settings.server.lora_modules:
        try:
            await load_modules(engine.adapters, settings.server.lora_modules)
        except ValueError as e:
            raise SetupError(str(e)) from None
    port = await tg.start(
        serve_http,
        app,
        settings.server.host,
        peers.bound_port(settings, ranks.rank) if ranks else settings.server.port,
        name="http",
    )
    run_dir = Path(settings.checkpoint.dir)
    if not follower:
        server_info = {"host": settings.server.host, "port": port, "pid": os.getpid()}
        (run_dir / "server.json").write_text(json.dumps(server_info))  # noqa: ASYNC240 - a few bytes, once
    if ranks is not None and watcher is not None and coordinator is not None:
        host = peers.advertise_host(settings, ranks.rank)
        watcher.set_peers(await peers.exchange_addresses(ranks, parts.thread, host, port))
        coordinator.info = {
            "url": f"http://{host}:{port}",
            "pid": os.getpid(),
            "peers": [p["url"] for p in [*watcher.peers]],
        }
        coordinator.write_rank_file()
        await tg.start(watcher.run, name="heartbeats")
        await coordinator.compare(parts.trainer, parts.trainer.step_count)  # every rank starts from rank 0's state
    log.info(
        "serving on http://%s:%d (adapter version %d)%s",
        settings.server.host,
        port,
        parts.trainer.version,
        "" if follower else f"; dashboard: http://{settings.server.host}:{port}/dashboard",
    )
    return port


async def watch_signals(
    control: LearnerControl,
    *,
    hard_exit: Callable[[int, str], Any],
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """First SIGINT/SIGTERM: graceful stop (final checkpoint, exit 0). A second one: exit at once (130)."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        count = 0
        async for signum in signals:
            count += 1
            if count == 1:
                log.info(
                    "%s: finishing the step in flight and writing a final checkpoint (again: exit at once)",
                    signal.Signals(signum).name,
                )
                control.stop()
            else:
                # A step or a checkpoint write in flight holds its thread in a call nothing can interrupt: the
                # user asked not to wait for it. The newest checkpoint on disk stands (a half-written one is a
                # hidden .tmp dir that the next write removes); fetched batches are in the journal.
                hard_exit(130, f"second {signal.Signals(signum).name}: exiting now, without a final checkpoint")
