"""The dashboard's HTTP routes: the page, its static files, and a small JSON API the page polls.

GET /dashboard                    the page (static HTML; it holds no data, so it loads without the token)
GET /dashboard/static/NAME        its scripts, styles and the vendored uPlot (an allowlist, never a path)
GET /dashboard/api/info           mode (run | serve | files), whether /control is there, the runs and their config
GET /dashboard/api/metrics        ?run=0&since=STEP&rev=REV: step rows after STEP (bounded per answer)
GET /dashboard/api/evals          ?run=0: the held-out evaluations (step, task, reward_mean, pass@k, ...)
GET /dashboard/api/status         the live state (/control/status plus memory), null for files
GET /dashboard/api/rollouts       ?run=0&since=STEP: the last steps' samples after STEP

The page polls (every couple of seconds, less while hidden): no connection outlives a request, so nothing holds
the process open at shutdown. The API sits behind the app's bearer-token gate like every other route.
"""

from pathlib import Path
from typing import Any

from aiohttp import web

from paraloop.dashboard.sources import SourceError
from paraloop.server.errors import APIError, bad_request
from paraloop.server.responses import json_response

STATIC = Path(__file__).parent / "static"
CONTENT_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".txt": "text/plain",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
MAX_STEP = 2**62


def static_files() -> dict[str, Path]:
    """Every file the package ships under static/, by its relative name: the only names /static serves."""
    return {p.relative_to(STATIC).as_posix(): p for p in STATIC.rglob("*") if p.is_file() and p.suffix in CONTENT_TYPES}


def int_param(request: web.Request, name: str, default: int | None, *, lo: int, hi: int = MAX_STEP) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad_request(name, f"must be an integer, got {raw[:40]!r}") from None
    if not lo <= value <= hi:
        raise bad_request(name, f"must be between {lo} and {hi}")
    return value


def _json(payload: Any) -> web.Response:
    return json_response(payload, headers={"Cache-Control": "no-store"})


def dashboard_routes(source: Any, *, token_required: bool) -> list[web.RouteDef]:
    """The routes over `source` (sources.py). `token_required` tells the page to ask for the bearer token before
    its first API call (the token itself never reaches the page's HTML)."""
    files = static_files()
    html = files["index.html"].read_text().replace("{{auth}}", "token" if token_required else "none").encode()

    async def page(request: web.Request) -> web.Response:
        return web.Response(body=html, content_type="text/html", charset="utf-8", headers=PAGE_HEADERS)

    async def static(request: web.Request) -> web.Response:
        path = files.get(request.match_info["name"])
        if path is None:
            raise APIError(404, "no such dashboard file", code="not_found")
        return web.Response(
            body=path.read_bytes(),
            content_type=CONTENT_TYPES[path.suffix],
            headers={**PAGE_HEADERS, "Cache-Control": "max-age=300"},
        )

    def answer(fn: Any, *args: Any) -> web.Response:
        try:
            return _json(fn(*args))
        except SourceError as e:
            raise bad_request(e.param, str(e)) from None

    async def info(request: web.Request) -> web.Response:
        return answer(source.info)

    async def metrics(request: web.Request) -> web.Response:
        run = int_param(request, "run", 0, lo=0, hi=1000)
        since = int_param(request, "since", -1, lo=-1)
        rev = int_param(request, "rev", None, lo=0)
        return answer(source.metrics, run, since, rev)

    async def evals(request: web.Request) -> web.Response:
        return answer(source.evals, int_param(request, "run", 0, lo=0, hi=1000))

    async def status(request: web.Request) -> web.Response:
        return answer(source.status)

    async def rollouts(request: web.Request) -> web.Response:
        run = int_param(request, "run", 0, lo=0, hi=1000)
        since = int_param(request, "since", -1, lo=-1)
        return answer(source.rollouts, run, since)

    return [
        web.get("/dashboard", page, allow_head=False),
        web.get("/dashboard/static/{name:.+}", static, allow_head=False),
        web.get("/dashboard/api/info", info, allow_head=False),
        web.get("/dashboard/api/metrics", metrics, allow_head=False),
        web.get("/dashboard/api/evals", evals, allow_head=False),
        web.get("/dashboard/api/status", status, allow_head=False),
        web.get("/dashboard/api/rollouts", rollouts, allow_head=False),
    ]
