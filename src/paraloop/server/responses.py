"""JSON answers, encoded once by msgspec: every route's (the OpenAI routes, /control, /ranks, the dashboard's API)
and every error's (server/errors.py)."""

from typing import Any

import msgspec
from aiohttp import web


def json_response(payload: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=msgspec.json.encode(payload), content_type="application/json",
                        headers=headers)
