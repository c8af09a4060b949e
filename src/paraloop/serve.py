"""`paraloop serve`: serve a model (and optionally a LoRA adapter) over the HTTP API, no training.

In: --model-path, a model directory or a Hugging Face repo id (and --revision, --lora-path, --lora-modules
NAME=PATH ..., --host, --port, --config, --compute, --set KEY=VALUE ...).
Out: the engine and the HTTP server running in one anyio task group until SIGINT/SIGTERM, then a clean exit 0:
new requests get 503, in-flight generations end (finish_reason "abort"), the socket closes. Bad input (missing
model, a repo id not cached while offline, unreadable adapter, bad config, port in use) is one
`paraloop: error: ...` line on stderr and exit 2.
"""

import argparse
import logging
import signal
import sys

import anyio

from paraloop.config import ConfigError, Settings, public_dump
from paraloop.engine import Engine
from paraloop.engine.adapters import load_modules
from paraloop.flags import add_config_flags, settings_from_args
from paraloop.lora import AdapterSlots
from paraloop.model import load_model
from paraloop.predecessor import apply_adapter_assuming
from paraloop.server import STATE, make_app, mark_shutting_down, serve_http
from paraloop.server.state import served_model_name

log = logging.getLogger("paraloop.serve")

SERVE_FLAGS = (
    "--model-path",
    "--revision",
    "--adapter",
    "--compute",
    "--host",
    "--port",
    "--control-token",
    "--served-model-name",
    "--diverse-mode",
    "--lora-modules",
    "--max-loras",
    "--max-lora-rank",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="paraloop serve", description="Serve a model over the OpenAI-compatible and /generate HTTP API."
    )
    add_config_flags(parser, only=SERVE_FLAGS)
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    settings = settings_from_args(args)
    if not settings.model.base_path:
        raise ConfigError("model.base_path: no model given (use --model-path)")
    return settings


def build_engine(settings: Settings) -> Engine:
    """Load the model (and adapter) and construct the Engine; raises on unusable input."""
    model, tokenizer, _, _ = load_model(
        settings.model.base_path,
        compute=settings.model.compute,
        trust_remote_code=settings.model.trust_remote_code,
        revision=settings.model.revision,
    )
    slots = None
    if settings.model.lora_path:  # an adapter without adapter_config.json takes scale/dropout from rl_training.lora
        apply_adapter_assuming(
            model, settings.model.lora_path, seed=settings.rl_training.seed, assume=settings.rl_training.lora
        )
        slots = AdapterSlots(model)
    return Engine.from_settings(model, tokenizer, settings, adapter=slots)


async def serve(engine: Engine, settings: Settings) -> str | None:
    """Run the engine and the HTTP app until SIGINT/SIGTERM. Returns an error message if the port cannot be bound."""
    from paraloop.dashboard import ServeView, dashboard_routes

    view = ServeView(engine, public_dump(settings), name=served_model_name(settings))
    routes = dashboard_routes(view, token_required=bool(settings.server.control_token))
    app = make_app(engine, settings=settings, extra_routes=routes)
    host, port = settings.server.host, settings.server.port
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            try:
                await load_modules(engine.adapters, settings.server.lora_modules)
            except ValueError as e:
                tg.cancel_scope.cancel()
                return str(e)
            try:
                port = await tg.start(serve_http, app, host, port)
            except OSError as e:  # the port is taken or the host does not resolve
                tg.cancel_scope.cancel()
                return f"cannot listen on {host}:{port}: {e}"
            log.info("serving %s on http://%s:%d (dashboard: /dashboard)", app[STATE].model_name, host, port)
            async for signum in signals:
                log.info("%s received: stopping", signal.Signals(signum).name)
                mark_shutting_down(app)
                break
            tg.cancel_scope.cancel()
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from paraloop.blas import log_blas

    log_blas()  # the first line: a CPU server without OpenBLAS is ~40x slower
    try:
        settings = settings_from(args)
    except ConfigError as e:
        return fail(str(e))
    try:
        engine = build_engine(settings)
    except (OSError, ValueError) as e:  # paraloop's own loaders name the file and the problem
        return fail(str(e))
    except Exception as e:  # whatever mlx-lm raises on a model it cannot read: still the user's input
        return fail(f"cannot load {settings.model.base_path}: {type(e).__name__}: {e}")
    error = anyio.run(serve, engine, settings)
    return fail(error) if error else 0


def fail(message: str) -> int:
    print(f"paraloop: error: {message}", file=sys.stderr)
    return 2
