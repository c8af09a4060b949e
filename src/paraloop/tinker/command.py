"""`paraloop tinker`: serve the Tinker training API (docs/tinker.md) so Tinker programs train and sample locally.

In: --model-path (a model directory or a Hugging Face repo id), --host (127.0.0.1), --port, --config, --set
tinker.KEY=VALUE .... Out: the engine, the learner thread and the HTTP routes in one anyio task group until
SIGINT/SIGTERM, then exit 0. Point a program at it with TINKER_BASE_URL=http://127.0.0.1:PORT and any key of the
SDK's form (TINKER_API_KEY=tml-local); with server.control_token set, that token is the key. Bad input (missing
model, bad config, port in use) is one `paraloop: error: ...` line on stderr and exit 2.
"""

import argparse
import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from paraloop.config import ConfigError, Settings
from paraloop.engine import Engine
from paraloop.engine.engine import vocab_size
from paraloop.flags import add_config_flags, settings_from_args
from paraloop.mlx_thread import MlxThread
from paraloop.model import load_model, resolve_model_path, twin
from paraloop.server.app import start_http
from paraloop.tinker.futures import Futures
from paraloop.tinker.learner import Learner
from paraloop.tinker.routes import make_app
from paraloop.tinker.sessions import TinkerState

log = logging.getLogger("paraloop.tinker")
FLAGS = (
    "--model-path",
    "--revision",
    "--compute",
    "--host",
    "--port",
    "--control-token",
    "--max-loras",
    "--max-lora-rank",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paraloop tinker", description="Serve the Tinker training API locally.")
    add_config_flags(parser, only=FLAGS)
    return parser


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    path: Path  # the model directory (the tokenizer get_tokenizer loads)
    config: dict[str, Any]
    state_dir: Path  # tinker.state_dir, absolute


def load(settings: Settings) -> Loaded:
    """The model, loaded once (before the event loop starts); raises on unusable input."""
    path = resolve_model_path(settings.model.base_path, revision=settings.model.revision)
    model, tokenizer, config, _ = load_model(
        path, compute=settings.model.compute, trust_remote_code=settings.model.trust_remote_code
    )
    return Loaded(model, tokenizer, path, config, Path(settings.tinker.state_dir).resolve())


async def serve(
    settings: Settings, loaded: Loaded, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Serve until cancelled; `await tg.start(serve, settings, loaded)` returns the bound port."""
    t = settings.tinker
    thread = MlxThread("paraloop-tinker-learner")
    try:
        learner_twin = twin(loaded.model)  # before the engine wraps the base's linear layers for per-row adapters
        learner = await thread.call(Learner, learner_twin)
        engine = Engine.from_settings(loaded.model, loaded.tokenizer, settings, adapter=None)
        state = TinkerState(
            engine=engine,
            learner=learner,
            thread=thread,
            model_name=str(settings.model.base_path),
            tokenizer_path=str(loaded.path),
            state_dir=loaded.state_dir,
            max_clients=t.max_clients,
            vocab=vocab_size(loaded.model, loaded.tokenizer),
            max_context=int(loaded.config.get("max_position_embeddings") or 0),
            max_rank=settings.server.max_lora_rank,
        )
        futures = Futures(max_pending=t.max_pending, retention_s=t.retention_s, wait_s=t.poll_wait_s)
        limits = {
            "max_data": t.max_data,
            "max_batch_tokens": t.max_batch_tokens,
            "max_num_samples": t.max_num_samples,
            "max_json_depth": settings.server.max_json_depth,
            "body_timeout_s": settings.server.body_timeout_s,
        }
        app = make_app(
            state,
            futures,
            limits=limits,
            token=settings.server.control_token or "",
            max_body=settings.server.max_body_bytes,
        )
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            await tg.start(futures.run)
            runner, port = await start_http(app, settings.server.host, settings.server.port)
            try:
                log.info("Tinker API for %s on http://%s:%d", state.model_name, settings.server.host, port)
                task_status.started(port)
                await anyio.sleep_forever()
            finally:
                with anyio.move_on_after(10, shield=True):
                    await runner.cleanup()
                tg.cancel_scope.cancel()
    finally:
        thread.close()


async def run_until_signal(settings: Settings, loaded: Loaded) -> str | None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:
            try:
                await tg.start(serve, settings, loaded)
            except OSError as e:
                tg.cancel_scope.cancel()
                return f"cannot listen on {settings.server.host}:{settings.server.port}: {e}"
            async for signum in signals:
                log.info("%s received: stopping", signal.Signals(signum).name)
                break
            tg.cancel_scope.cancel()
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = settings_from_args(args)
        if not settings.model.base_path:
            raise ConfigError("model.base_path: no model given (use --model-path)")
        loaded = load(settings)
        error = anyio.run(run_until_signal, settings, loaded)
    except ConfigError as e:
        error = str(e)
    except (OSError, ValueError) as e:
        error = f"cannot load {getattr(args, 'model_path', '?')}: {e}"
    if error:
        print(f"paraloop: error: {error}", file=sys.stderr)
        return 2
    return 0
