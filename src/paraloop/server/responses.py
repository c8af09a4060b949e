"""JSON answers: every route's (the OpenAI routes, /generate, /control, /ranks, the dashboard's API, the
Tinker API) and every error's (server/errors.py).

Encoded once by msgspec, which writes a non-finite float as null. `nan_literals=True` writes NaN and Infinity
as Python's json module writes (and reads) them, for a client that parses floats that may not be finite with
it: the Tinker SDK's answers (a diverged step's grad_norm), where null would fail its float fields.
"""

import json
from typing import Any

import msgspec
from aiohttp import web


def json_response(
    payload: Any, *, status: int = 200, headers: dict[str, str] | None = None, nan_literals: bool = False
) -> web.Response:
    body = json.dumps(payload).encode() if nan_literals else msgspec.json.encode(payload)
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)
