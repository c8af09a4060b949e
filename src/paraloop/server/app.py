"""The aiohttp application: routes, the error/auth/shutdown middlewares, and helpers to run it under anyio.

In: an Engine (only `generate`, `version` and `tokenizer` are used; no MLX here) and the Settings.
Out: `make_app(...)` -> web.Application; `start_http(app, host, port)` -> (runner, bound port);
`serve_http(app, host, port, task_status=...)` runs it inside a task group until cancelled, then stops accepting,
lets in-flight handlers answer, and cleans up. `mark_shutting_down(app)` makes every new request a 503.
"""

import hmac
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

import anyio
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from anyio.abc import TaskStatus

from paraloop.config import Settings
from paraloop.server import adapter_routes
from paraloop.server.errors import APIError, error_middleware
from paraloop.server.generate_route import generate
from paraloop.server.metrics import METRICS, Metrics, engine_families, metrics_middleware, metrics_route
from paraloop.server.openai_routes import chat_completions, completions
from paraloop.server.openapi import body_middleware, openapi
from paraloop.server.responses import json_response
from paraloop.server.state import STATE, ServedEngine, ServerState, TurnRecorder, served_model_name

STALLED = web.AppKey("paraloop_stalled", Callable[[], dict[str, str]])  # part -> why (`paraloop run`'s watchdog)
OPEN_ROUTES = frozenset({"/health"})  # answer without the bearer token (Atropos polls it every second)
OPEN_PREFIXES = ("/dashboard/static/",)  # the dashboard's page and files hold no data; its API needs the token
SHUTDOWN_GRACE_S = 5.0


class MalformedHTTPFilter(logging.Filter):
    """aiohttp answers malformed HTTP (bad framing, oversized headers) with a 400 and logs a traceback for each: a
    client sending them in a loop would fill the log. The client got its answer; nothing is left to report."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], HttpProcessingError))


_server_log = logging.getLogger("aiohttp.server")
if not any(isinstance(f, MalformedHTTPFilter) for f in _server_log.filters):
    _server_log.addFilter(MalformedHTTPFilter())


@web.middleware
async def gate_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Refuse early: 503 while shutting down, 403 for a browser page's request (an Origin header not allowed), 401
    without the bearer token (when server.control_token is set)."""
    state = request.app[STATE]
    if state.shutting_down:
        raise APIError(503, "the server is shutting down", code="shutting_down")
    origin = request.headers.get("Origin")
    if origin is not None and request.path not in OPEN_ROUTES and not origin_allowed(request, origin, state):
        raise APIError(
            403,
            f"requests from web pages of origin {origin!r} are refused (server.allowed_origins)",
            code="forbidden_origin",
        )
    token = state.settings.server.control_token
    if token and not is_open(request.path):
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise APIError(
                401,
                "missing or wrong bearer token (send Authorization: Bearer <server.control_token>)",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
    return await handler(request)


LOOPBACK_HOSTS = re.compile(r"(localhost|127(\.\d{1,3}){3}|\[::1\])(:\d+)?")


def origin_allowed(request: web.Request, origin: str, state: ServerState) -> bool:
    """Only browsers send Origin. Without a token, a page on any site the user visits (or one that rebinds its DNS to
    127.0.0.1) could otherwise send simple requests here, such as POST /control/stop, without a preflight. Allowed:
    server.allowed_origins, and a page served from this server on a loopback address. With a token the page would
    also need the token, which browsers only send cross-origin after a CORS preflight paraloop never grants."""
    if origin in state.settings.server.allowed_origins or state.settings.server.control_token:
        return True
    return origin == f"{request.scheme}://{request.host}" and LOOPBACK_HOSTS.fullmatch(request.host) is not None


def is_open(path: str) -> bool:
    return path in OPEN_ROUTES or path == "/dashboard" or path.startswith(OPEN_PREFIXES)


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    stalled = request.app[STALLED]()
    if stalled:
        raise APIError(503, "stalled: " + "; ".join(f"{part}: {why}" for part, why in stalled.items()), code="stalled")
    return json_response({"status": "ok", "adapter_version": state.engine.version})


def make_app(
    engine: ServedEngine,
    *,
    settings: Settings,
    extra_routes: Iterable[web.AbstractRouteDef] | None = None,
    stalled: Callable[[], dict[str, str]] | None = None,
    metrics: Metrics | None = None,
    turns: TurnRecorder | None = None,
) -> web.Application:
    """The HTTP API over `engine`. `extra_routes` (e.g. /control, /metrics) read `request.app[STATE]`. `stalled()`
    names the parts of a run that make no progress: /health answers 503 while there is one. `metrics`: the
    Prometheus registry /metrics serves (a run's status observes into it from the start; default: a new one).
    `turns`: a run's agent sessions, which record the requests tagged with a session (session_turns.py)."""
    app = web.Application(
        client_max_size=settings.server.max_body_bytes,
        middlewares=[metrics_middleware, error_middleware, gate_middleware, body_middleware],
    )
    app[STATE] = ServerState(engine=engine, settings=settings, model_name=served_model_name(settings), turns=turns)
    app[METRICS] = metrics if metrics is not None else Metrics()
    if hasattr(engine, "stats"):
        app[METRICS].add_collector(lambda: engine_families(engine.stats()))
    app[STALLED] = stalled or dict
    app.router.add_routes(
        [
            web.get("/health", health, allow_head=True),
            web.get("/v1/models", adapter_routes.models, allow_head=False),
            *adapter_routes.ROUTES,
            web.post("/v1/completions", completions),
            web.post("/v1/chat/completions", chat_completions),
            web.post("/generate", generate),
            web.get("/openapi.json", openapi, allow_head=False),
            web.get("/metrics", metrics_route, allow_head=False),
            *(extra_routes or ()),
        ]
    )
    return app


def mark_shutting_down(app: web.Application) -> None:
    app[STATE].shutting_down = True


async def start_http(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Bind and start serving; port 0 picks a free port. Returns (runner, bound port); `runner.cleanup()` stops."""
    # handler_cancellation: a client that disconnects cancels its handler, which closes the engine iterator
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=SHUTDOWN_GRACE_S, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1]
    return runner, bound


async def serve_http(
    app: web.Application, host: str, port: int, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Serve until cancelled; `await tg.start(serve_http, app, host, port)` returns the bound port."""
    runner, bound = await start_http(app, host, port)
    try:
        task_status.started(bound)
        await anyio.sleep_forever()
    finally:
        mark_shutting_down(app)
        with anyio.move_on_after(SHUTDOWN_GRACE_S + 5, shield=True):
            await runner.cleanup()
