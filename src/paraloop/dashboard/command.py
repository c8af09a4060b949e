"""`paraloop dashboard RUN_DIR [RUN_DIR ...]`: the run dashboard from runs' files, curves overlaid to compare.

In: run directories (metrics.jsonl, rollouts.jsonl, checkpoints/*/trainer_state.json for the configuration), which
may still be growing. Out: the same page `paraloop run` serves at /dashboard, read-only, on http://HOST:PORT/ until
SIGINT/SIGTERM. A non-loopback --host needs --token (the page asks for it; it is sent as a bearer header).
"""

import argparse
import hmac
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import anyio
from aiohttp import web

from paraloop.dashboard.routes import dashboard_routes
from paraloop.dashboard.sources import RunFiles
from paraloop.server.errors import APIError, error_middleware

log = logging.getLogger("paraloop.dashboard")

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def make_files_app(run_dirs: list[Path], *, token: str | None = None, rollout_steps: int = 20) -> web.Application:
    @web.middleware
    async def gate(request: web.Request, handler: Any) -> web.StreamResponse:
        if token and request.path.startswith("/dashboard/api/"):
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                raise APIError(
                    401, "missing or wrong bearer token", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
                )
        return await handler(request)

    async def root(request: web.Request) -> web.Response:
        raise web.HTTPFound("/dashboard")

    app = web.Application(middlewares=[error_middleware, gate])
    app.router.add_routes(
        [
            web.get("/", root, allow_head=False),
            *dashboard_routes(RunFiles(run_dirs, rollout_steps=rollout_steps), token_required=bool(token)),
        ]
    )
    return app


async def serve(app: web.Application, host: str, port: int) -> str | None:
    """Serve until SIGINT/SIGTERM; the answer is an error message when the address cannot be bound."""
    runner = web.AppRunner(app, shutdown_timeout=2.0, access_log=None)  # the page's requests are short polls
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            try:
                await site.start()
            except OSError as e:
                return f"cannot listen on {host}:{port}: {e}"
            bound = runner.addresses[0][1]
            url_host = f"[{host}]" if ":" in host else host
            print(f"paraloop dashboard: http://{url_host}:{bound}/dashboard", file=sys.stderr, flush=True)
            async for _ in signals:
                break
        finally:
            with anyio.move_on_after(10, shield=True):
                await runner.cleanup()
    return None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="paraloop dashboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (with metrics.jsonl)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8050, help="port (default 8050; 0 picks a free one)")
    parser.add_argument(
        "--token",
        default=None,
        help="bearer token the page must give (required off loopback; or PARALOOP_DASHBOARD_TOKEN)",
    )
    parser.add_argument("--rollout-steps", type=int, default=20, help="latest steps of rollouts shown per run")
    args = parser.parse_args(argv)
    token = args.token or os.environ.get("PARALOOP_DASHBOARD_TOKEN") or None
    dirs = [Path(d) for d in args.run_dirs]
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        return fail(f"not a directory: {', '.join(missing)}")
    empty = [str(d) for d in dirs if not (d / "metrics.jsonl").is_file()]
    if len(empty) == len(dirs):
        return fail(f"no metrics.jsonl in {', '.join(empty)}: is this a paraloop run directory?")
    if not 0 <= args.port <= 65535:
        return fail(f"--port must be 0..65535, got {args.port}")
    if not 1 <= args.rollout_steps <= 1000:
        return fail("--rollout-steps must be 1..1000")
    if args.host not in LOOPBACK and not args.host.startswith("127.") and not token:
        return fail(f"--host {args.host} is not a loopback address: give --token so others cannot read the runs")
    for d in empty:
        log.warning("%s has no metrics.jsonl (yet): its curves stay empty until it does", d)
    error = anyio.run(serve, make_files_app(dirs, token=token, rollout_steps=args.rollout_steps), args.host, args.port)
    return fail(error) if error else 0


def fail(message: str) -> int:
    print(f"paraloop: error: {message}", file=sys.stderr)
    return 2
