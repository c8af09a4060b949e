"""Every HTTP error as OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}.

In: whatever a handler (or aiohttp's router, or the body reader) raises. Out: a JSON response with the right status.
Bad input is always a 4xx naming the field (`param`); only a bug in paraloop answers 500, and it is logged with
its traceback while the server keeps serving.
"""

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from aiohttp import web

from paraloop.engine import RequestError
from paraloop.server.responses import json_response

log = logging.getLogger("paraloop.server")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class APIError(Exception):
    """An error answered as OpenAI's error JSON. `param` names the offending request field."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def bad_request(param: str | None, message: str) -> APIError:
    return APIError(400, f"{param}: {message}" if param else message, param=param, code="invalid_value")


def request_error(e: RequestError, fields: Mapping[str, str]) -> APIError:
    """The engine's RequestError as a 400 naming the route's field (`fields` maps engine names to the
    route's): the one place it is mapped, for the OpenAI routes, /generate and the Tinker API alike."""
    return bad_request(fields.get(e.field, e.field), e.message)


@contextmanager
def request_errors(fields: Mapping[str, str]) -> Iterator[None]:
    """`request_error` for whatever the block raises."""
    try:
        yield
    except RequestError as e:
        raise request_error(e, fields) from None


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(err: APIError) -> web.Response:
    body = error_body(err.status, err.message, param=err.param, code=err.code)
    return json_response(body, status=err.status, headers=err.headers)


def from_http_exception(exc: web.HTTPException) -> APIError:
    """aiohttp's own errors (404 from the router, 405, 413 from the body reader) in the OpenAI shape."""
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    if exc.status == 404:
        return APIError(404, "no such route", code="not_found", headers=headers)
    if exc.status == 405:
        return APIError(
            405,
            f"method not allowed (allowed: {exc.headers.get('Allow', '')})",
            code="method_not_allowed",
            headers=headers,
        )
    if exc.status == 413:
        return APIError(413, f"request body too large: {exc.text}", code="request_too_large")
    return APIError(exc.status, exc.reason or exc.text or "HTTP error", headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except APIError as err:
        return error_response(err)
    except web.HTTPException as exc:
        if exc.status < 400:  # redirects and the like pass through
            raise
        return error_response(from_http_exception(exc))
    except Exception:  # a paraloop bug: log it, answer JSON, keep serving
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(APIError(500, "internal server error (see the server log)", code="internal_error"))
