"""`paraloop run config.toml`: serve the model and train its adapter with GRPO, in one process.

    rollout source --RolloutBatch--> learner --AdapterPublished--> publisher --swap--> engine <--HTTP-- environments
    (mock env / Atropos)             learner --SaveCheckpoint--> checkpointer
                                     learner --StepFinished--> monitor (metrics.jsonl, progress line)

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
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio

from paraloop.config import ConfigError, Settings
from paraloop.flags import add_config_flags, settings_from_args

log = logging.getLogger("paraloop.run")

OUTBOX_SIZE = 1  # one batch waits while the learner steps: bounded staleness in async mode


class SetupError(RuntimeError):
    """A problem with what the user asked for (missing model, untrainable model, bad checkpoint)."""


@dataclass
class Models:
    learner_model: Any
    engine_model: Any
    tokenizer: Any
    adapter_config: dict[str, Any] | None
    trainer: Any
    resumed: Any  # checkpoint.Checkpoint | None


def build_models(settings: Settings) -> Models:
    """Load the model once; the learner and the engine get twins sharing its base weights. Runs on the learner's
    MLX thread."""
    import mlx.core as mx

    from paraloop import checkpoint
    from paraloop.learn.trainer import Trainer
    from paraloop.lora import adapter_arrays, adapter_config, apply_adapter, attach_lora
    from paraloop.model import load_model, twin

    rl = settings.rl_training
    if not settings.model.base_path:
        raise SetupError("model.base_path is not set (TOML [model] base_path, or --model-path)")
    try:
        model, tokenizer, _, quantized = load_model(
            settings.model.base_path,
            compute=settings.model.compute,
            trust_remote_code=settings.model.trust_remote_code,
        )
    except (FileNotFoundError, ValueError) as e:
        raise SetupError(f"cannot load model {settings.model.base_path}: {e}") from None

    resumed = None
    if settings.checkpoint.resume:
        try:
            resumed = checkpoint.read_checkpoint(checkpoint.find_checkpoint(settings.checkpoint.resume))
        except (FileNotFoundError, checkpoint.CheckpointError) as e:
            raise SetupError(f"cannot resume: {e}") from None

    cfg = None
    if rl.train_mode == "lora":
        if resumed is not None:
            if resumed.adapter_config.get("fine_tune_type", "lora") != "lora":
                raise SetupError(f"{resumed.path} is a full-weight checkpoint: resume it with train_mode = 'full'")
            cfg = resumed.adapter_config
            attach_lora(model, cfg, seed=rl.seed)
        elif settings.model.lora_path:
            try:
                cfg = apply_adapter(model, settings.model.lora_path, seed=rl.seed)
            except (FileNotFoundError, ValueError) as e:
                raise SetupError(str(e)) from None
        elif settings.model.auto_init_lora:
            cfg = adapter_config(rl.lora, model)
            attach_lora(model, cfg, seed=rl.seed)
        else:
            raise SetupError(
                "nothing to train: set model.auto_init_lora = true or model.lora_path"
                + ("" if quantized else ", or rl_training.train_mode = 'full'")
            )
        mx.eval(adapter_arrays(model))
    elif quantized:
        raise SetupError(
            "train_mode = 'full' needs a non-quantized model: quantized weights have no gradient "
            "(QuantizedMatmul has no vjp for them); use train_mode = 'lora' on a quantized model"
        )

    engine_model = twin(model)  # same base arrays, own LoRA slots
    engine_model.eval()
    model.train()
    trainer = Trainer(model, config=rl, adapter_config=cfg, version=0)
    if resumed is not None:
        if "trainer" not in resumed.trainer_state or resumed.optimizer_state is None:
            raise SetupError(f"cannot resume from {resumed.path}: it has no trainer/optimizer state (an adapter-only "
                             "checkpoint: start a new run from it with model.lora_path instead)")
        trainer.load_state({"optimizer": resumed.optimizer_state, "trainer": resumed.trainer_state["trainer"]},
                           resumed.adapter, resumed.reference)
    return Models(model, engine_model, tokenizer, cfg, trainer, resumed)


def setup_logging() -> None:
    level = os.environ.get("PARALOOP_LOG", "info").upper()
    logging.basicConfig(level=getattr(logging, level, logging.INFO), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


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


def make_source(settings: Settings, engine: Any, tokenizer: Any, resumed: Any) -> tuple[Any, Any]:
    """The rollout source: (async iterator of RolloutBatch, status() -> dict). Each batch carries the source's
    position (RolloutBatch.source_state), which checkpoints keep for an exact resume."""
    rl = settings.rl_training
    if rl.atropos.api_url:
        from paraloop.atropos.client import AtroposClient

        starting_step = rl.atropos.starting_step
        if starting_step is None:
            starting_step = resumed.step if resumed is not None else 0  # one Atropos step per learner step
        client = AtroposClient(
            rl.atropos,
            batch_size=rl.batch_size,
            token_budget=rl.token_budget,
            total_steps=rl.total_steps,
            checkpoint_dir=settings.checkpoint.dir,
            starting_step=starting_step,
            checkpoint_interval=settings.checkpoint.interval,
        )
        return client.batches(), client.status
    from paraloop.envs.mock import MockEnvironment

    env = MockEnvironment(
        engine,
        tokenizer,
        config=rl.mock,
        temperature=rl.temperature,
        max_tokens=rl.mock.max_tokens or rl.max_tokens,
        seed=rl.seed,
    )
    if resumed is not None and resumed.trainer_state.get("source_state"):
        env.load_state(resumed.trainer_state["source_state"])
    return env.batches(rl.batch_size), env.status


async def run_async(settings: Settings, *, ready: Any = None) -> dict[str, Any]:
    """Run until total_steps, /control/stop or a signal. `ready(port)` is called once HTTP serves."""
    from paraloop import checkpoint
    from paraloop.actors.checkpointer import run_checkpointer
    from paraloop.actors.fetcher import run_fetcher
    from paraloop.actors.learner import Learner, LearnerControl
    from paraloop.actors.monitor import run_monitor, summary_table
    from paraloop.actors.publisher import run_publisher
    from paraloop.buffer import RolloutBuffer
    from paraloop.control import control_routes
    from paraloop.engine import Engine
    from paraloop.lora import AdapterSlots
    from paraloop.messages import AdapterPublished, RolloutBatch, SaveCheckpoint, StepFinished
    from paraloop.mlx_thread import MlxThread
    from paraloop.server.app import make_app, serve_http
    from paraloop.state import RunState

    rl = settings.rl_training
    run_dir = Path(settings.checkpoint.dir)
    run_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before anything runs
    if not settings.checkpoint.resume and checkpoint.list_checkpoints(run_dir):
        raise SetupError(
            f"{run_dir} already holds checkpoints of an earlier run: continue it with --resume {run_dir}, "
            "or give another --run-dir (nothing is overwritten)"
        )
    thread = MlxThread("paraloop-learner")
    try:
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

        engine = Engine.from_settings(
            models.engine_model, models.tokenizer, settings, adapter=slots, version=trainer.version
        )
        state = RunState(total_steps=rl.total_steps, mode=rl.mode, run_dir=str(run_dir), step=trainer.step_count,
                         version=trainer.version, serving_version=trainer.version, engine_stats=engine.stats)
        control = LearnerControl(state)
        batches_send, batches_recv = anyio.create_memory_object_stream[RolloutBatch](OUTBOX_SIZE)
        published_send, published_recv = anyio.create_memory_object_stream[AdapterPublished](1)
        ckpt_send, ckpt_recv = anyio.create_memory_object_stream[SaveCheckpoint](2)
        finished_send, finished_recv = anyio.create_memory_object_stream[StepFinished](64)
        sync = rl.mode == "sync"
        credits_send, credits_recv = anyio.create_memory_object_stream[int](1) if sync else (None, None)
        state.queues = {"rollouts": batches_send, "publish": published_send, "checkpoints": ckpt_send,
                        "metrics": finished_send}

        source, state.source_status = make_source(settings, engine, models.tokenizer, models.resumed)

        learner = Learner(
            trainer, thread, state=state, control=control, total_steps=rl.total_steps,
            checkpoint_interval=settings.checkpoint.interval, save_every_step=settings.checkpoint.save_every_step,
            batches=batches_recv, published=published_send, checkpoints=ckpt_send, finished=finished_send,
            credits=credits_send.clone() if credits_send else None,
            max_staleness=rl.max_staleness if rl.mode == "async" else None, stale_policy=rl.stale_policy,
        )
        app = make_app(engine, settings=settings, extra_routes=control_routes(state, control))
        config_dump = settings.model_dump(mode="json")
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            port = await tg.start(serve_http, app, settings.server.host, settings.server.port)
            state.http_port = port
            (run_dir / "server.json").write_text(json.dumps({"host": settings.server.host, "port": port, "pid": os.getpid()}))
            log.info("serving on http://%s:%d (adapter version %d)", settings.server.host, port, trainer.version)
            if ready is not None:
                ready(port)
            if threading_main():
                await tg.start(watch_signals, control)
            tg.start_soon(partial(run_publisher, published_recv, engine=engine, state=state, credits=credits_send,
                                  drain=sync))
            tg.start_soon(partial(run_monitor, finished_recv, state=state, run_dir=run_dir))
            buffer = RolloutBuffer(
                batch_size=rl.batch_size, priority=rl.buffer_priority,
                max_staleness=rl.max_staleness if rl.mode == "async" else None, stale_policy=rl.stale_policy,
            )
            state.buffer_stats = buffer.stats
            tg.start_soon(partial(run_fetcher, source, batches_send, buffer=buffer, version=lambda: trainer.version,
                                  credits=credits_recv))
            async with anyio.create_task_group() as training:
                training.start_soon(learner.run)
                training.start_soon(partial(
                    run_checkpointer, ckpt_recv, run_dir=str(run_dir), adapter_config=models.adapter_config,
                    adapter_format=settings.checkpoint.adapter_format, keep_last=settings.checkpoint.keep_last,
                    config=config_dump, state=state,
                ))
            tg.cancel_scope.cancel()
    finally:
        thread.close()
    if state.history:
        print("\n" + summary_table(state.history), file=sys.stderr)
    return {"step": state.step, "version": state.version, "last_checkpoint": state.last_checkpoint,
            "history": state.history}


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
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args, config_path=args.config_file or args.config)
    except ConfigError as e:
        print(f"paraloop: error: {e}", file=sys.stderr)
        return 2
    setup_logging()
    try:
        anyio.run(run_async, settings)
    except KeyboardInterrupt:
        print("paraloop: interrupted", file=sys.stderr)
        return 130
    except BaseException as e:  # noqa: BLE001 - report the actor's error in one line, exit non-zero
        err = error_of(e)
        if isinstance(err, SetupError):
            print(f"paraloop: error: {err}", file=sys.stderr)
            return 2
        if isinstance(err, KeyboardInterrupt):
            return 130
        log.exception("run failed", exc_info=err)
        print(f"paraloop: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    if not args.no_plot:
        try:
            from paraloop.plot import plot_run

            print(f"wrote {plot_run(settings.checkpoint.dir)}", file=sys.stderr)
        except ImportError:
            log.info("matplotlib not installed: no plot (pip install 'paraloop[plot]')")
    return 0
