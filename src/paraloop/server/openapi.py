"""GET /openapi.json: an OpenAPI 3.1 document of every route the app serves, for users and their tools.

Built from the app's router (so every route is in it, /control included under `paraloop run`) and from the very
msgspec Structs the handlers decode (so a request schema cannot drift from what is accepted), with the configured
limits (engine.max_n, ...) filled in as maximums. `BODIES` names each POST route's body; a POST route not in it takes
no body, and `body_middleware` holds it to that: nothing, or an empty JSON object.
"""

from typing import Any

import msgspec
from aiohttp import web

from paraloop.config import Settings
from paraloop.server.adapter_routes import LoadLoraBody, UnloadLoraBody
from paraloop.server.errors import APIError, bad_request
from paraloop.server.limits import max_prompt_chars, read_body
from paraloop.server.schemas import Body, ChatBody, CompletionBody, GenerateBody, SessionRewardBody, decode
from paraloop.server.state import STATE

OPENAPI_VERSION = "3.1.0"

BODIES: dict[str, type[Body]] = {
    "/v1/completions": CompletionBody,
    "/v1/chat/completions": ChatBody,
    "/generate": GenerateBody,
    "/v1/load_lora_adapter": LoadLoraBody,
    "/v1/unload_lora_adapter": UnloadLoraBody,
    "/v1/sessions/{session_id}/reward": SessionRewardBody,
}

SUMMARIES = {
    "/v1/completions": "OpenAI completions (text or token-id prompt); JSON, or SSE with stream=true",
    "/v1/chat/completions": "OpenAI chat completions (the tokenizer's chat template); JSON, or SSE with stream=true",
    "/generate": "vLLM-style generation as Atropos's vllm server type calls it; JSON, or NDJSON with stream=true",
    "/v1/models": "The served model and every adapter a request's `model` may name (policy, base, named)",
    "/v1/load_lora_adapter": "Load a LoRA adapter from server.lora_dirs under a name (vLLM's route)",
    "/v1/unload_lora_adapter": "Stop serving a named adapter; requests using it finish first (vLLM's route)",
    "/health": "Liveness and the adapter version now serving (never needs the token)",
    "/openapi.json": "This document",
    "/control/status": "The run's state: step, versions, paused, queues, metrics, engine statistics",
    "/control/pause": "The learner takes no new batch (HTTP generation goes on)",
    "/control/resume": "Undo pause",
    "/control/step": "While paused: exactly one learner step; answers its metrics",
    "/control/snapshot": "Write a checkpoint now; answers its path",
    "/control/stop": "Finish the step in flight, write a final checkpoint, end the run",
    "/metrics": "Prometheus text format",
    "/ranks": "A distributed run's heartbeat: this rank, its collectives, and what it sees of the other ranks",
    "/v1/sessions/{session_id}/reward": "A run in sessions mode: an agent session's reward and its group's key",
    "/control/{action}": "On a rank other than 0 of a distributed run: 409 naming rank 0, which drives the run",
}

PARAMETERS = {
    "/v1/sessions/{session_id}/reward": [
        {
            "name": "session_id",
            "in": "path",
            "required": True,
            "description": "The session its requests were tagged with (docs/agents.md)",
            "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
        }
    ],
    "/control/step": [
        {
            "name": "timeout",
            "in": "query",
            "required": False,
            "description": "Seconds to wait for a rollout batch; none by then: 504 and no step is taken later",
            "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": 86400, "default": 600},
        }
    ],
}

STREAM_TYPES = {
    "/v1/completions": "text/event-stream",
    "/v1/chat/completions": "text/event-stream",
    "/generate": "application/x-ndjson",
}
TEXT_ROUTES = {"/metrics": "text/plain"}


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(msgspec.Struct):
    """Every error, whatever the route or cause."""

    error: ErrorDetail


ERRORS = {
    "400": "Invalid JSON, a wrong type or value, an unknown field, or a limit exceeded (`param` names the field)",
    "401": "server.control_token is set and the bearer token is missing or wrong",
    "404": "Unknown route, or a `model` / `lora_name` that names no served adapter",
    "405": "Wrong method (see the Allow header)",
    "408": "The body did not arrive within server.body_timeout_s",
    "413": "Body larger than server.max_body_bytes",
    "403": "The request carries an Origin (a browser page) not in server.allowed_origins, or an adapter path lies "
    "outside server.lora_dirs",
    "415": "Content-Type is not JSON",
    "429": "The engine is full (requests or KV-cache tokens); retry after Retry-After seconds",
    "503": "The server is shutting down",
}


def routes_of(app: web.Application) -> list[tuple[str, str]]:
    """(path, method) of every route the app serves; HEAD only where it is the sole method."""
    out = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else None
        if path is None or route.method == "*":
            continue
        out.add((path, route.method.upper()))
    return sorted(r for r in out if r[1] != "HEAD" or (r[0], "GET") not in out)


def build(app: web.Application, settings: Settings) -> dict[str, Any]:
    schemas, components = msgspec.json.schema_components(
        [*BODIES.values(), ErrorResponse], ref_template="#/components/schemas/{name}"
    )
    refs = dict(zip([*BODIES, "error"], schemas, strict=True))
    bodies = _all_bodies()
    for name, schema in components.items():
        if name in bodies:
            schema["additionalProperties"] = False  # unknown fields are refused (forbid_unknown_fields)
    _fill_limits(components, settings)
    error = {"description": "OpenAI-shaped error", "content": {"application/json": {"schema": refs["error"]}}}
    paths: dict[str, dict[str, Any]] = {}
    for path, method in routes_of(app):
        op: dict[str, Any] = {
            "summary": SUMMARIES.get(path, path),
            "operationId": f"{method.lower()}_{path.strip('/').replace('/', '_').replace('.', '_') or 'root'}",
            "responses": {"200": _ok(path)} | {code: error | {"description": text} for code, text in ERRORS.items()},
        }
        if path in PARAMETERS:
            op["parameters"] = PARAMETERS[path]
        if path in BODIES and method == "POST":
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": refs[path]}}}
        elif method == "POST":
            op["description"] = "Takes no body: send none, or an empty JSON object."
        if path == "/health" or not settings.server.control_token:
            op["security"] = []
        paths.setdefault(path, {})[method.lower()] = op
    doc: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "paraloop",
            "version": _version(),
            "description": "One process serves the policy and trains its LoRA adapter. See docs/api.md.",
        },
        "paths": paths,
        "components": {"schemas": components},
    }
    if settings.server.control_token:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc


def _all_bodies() -> set[str]:
    out, todo = set(), [Body]
    while todo:
        kind = todo.pop()
        out.add(kind.__name__)
        todo.extend(kind.__subclasses__())
    return out


def _ok(path: str) -> dict[str, Any]:
    content: dict[str, Any] = {TEXT_ROUTES.get(path, "application/json"): {"schema": {}}}
    if path in STREAM_TYPES:
        content[STREAM_TYPES[path]] = {"schema": {"type": "string"}}
    return {"description": "OK", "content": content}


def _fill_limits(components: dict[str, Any], settings: Settings) -> None:
    """The configured limits as schema bounds: a client reading the document sees what this server accepts."""
    engine = settings.engine
    limits = {
        "n": {"maximum": engine.max_n},
        "max_tokens": {"maximum": engine.max_tokens_limit},
        "max_completion_tokens": {"maximum": engine.max_tokens_limit},
        "top_logprobs": {"maximum": engine.max_top_logprobs},
        "stop_token_ids": {"maxItems": engine.max_stop_token_ids},
        "messages": {"maxItems": engine.max_prompt_tokens},
        "prompt_token_ids": {"maxItems": engine.max_prompt_tokens},
    }
    for name in ("CompletionBody", "GenerateBody"):
        limits_here = {**limits, "logprobs": {"maximum": engine.max_top_logprobs}}
        _apply(components[name]["properties"], limits_here)
        prompt = components[name]["properties"]["prompt"]
        prompt["description"] = (
            f"One prompt: text (at most {max_prompt_chars(engine)} characters) or token ids (at most "
            f"engine.max_prompt_tokens={engine.max_prompt_tokens}); a batch of one is unwrapped"
        )
    for name in ("ChatBody", "PromptObject"):
        _apply(components[name]["properties"], limits)
    for name in ("CompletionBody", "ChatBody", "GenerateBody"):
        stop = components[name]["properties"]["stop"]
        for alt in stop["anyOf"]:
            if alt.get("type") == "string":
                alt["maxLength"] = engine.max_stop_string_chars
            elif alt.get("type") == "array":
                alt["maxItems"] = engine.max_stop_strings
                alt["items"] = {"type": "string", "minLength": 1, "maxLength": engine.max_stop_string_chars}


def _apply(properties: dict[str, Any], limits: dict[str, dict[str, Any]]) -> None:
    for field, bounds in limits.items():
        prop = properties.get(field)
        if prop is None:
            continue
        for alt in prop.get("anyOf", [prop]):
            kind = alt.get("type")
            if kind == "integer" and "maximum" in bounds or kind == "array" and "maxItems" in bounds:
                alt.update({k: v for k, v in bounds.items() if k in ("maximum", "maxItems")})


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("paraloop")
    except PackageNotFoundError:
        return "0"


async def openapi(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.openapi is None:
        state.openapi = msgspec.json.encode(build(request.app, state.settings))
    return web.Response(body=state.openapi, content_type="application/json")


# --- holding routes to their documented bodies ----------------------------------------------------------------------


# JSON, and the types clients put on a body given without one (curl -d and urllib: form-urlencoded; fetch: text/plain).
# Browsers may send these cross-origin without a preflight: the gate refuses any request with a foreign Origin.
JSON_TYPES = ("application/json", "application/x-www-form-urlencoded", "text/plain")


def check_content_type(request: web.Request) -> None:
    """A JSON body (or one sent with a client's default type); anything else is a 415 before a byte is read."""
    if "Content-Type" not in request.headers:
        return
    mime = request.content_type
    if not (mime in JSON_TYPES or (mime.startswith("application/") and mime.endswith("+json"))):
        raise APIError(
            415, f"Content-Type {mime!r} is not supported: send application/json", code="unsupported_media_type"
        )
    if (request.charset or "utf-8").lower() not in ("utf-8", "utf8"):
        raise APIError(
            415, f"charset {request.charset!r} is not supported: JSON bodies are UTF-8", code="unsupported_media_type"
        )


class NoBody(Body):
    """What a POST route without a documented body accepts: nothing, or `{}`."""


@web.middleware
async def body_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """POST routes: a JSON content type, the whole body within server.body_timeout_s (read here, once: handlers get
    aiohttp's cached copy), and a route without a documented body gets none (or an empty object)."""
    info = request.match_info
    if request.method != "POST" or info.http_exception is not None or info.route.resource is None:
        return await handler(request)
    takes_body = info.route.resource.canonical in BODIES
    if not request.body_exists:
        if takes_body:
            raise bad_request(None, "request body is empty (expected a JSON object)")
        return await handler(request)
    check_content_type(request)
    server = request.app[STATE].settings.server
    body = await read_body(request, server.body_timeout_s)
    if not takes_body and body.strip():
        try:
            decode(body, NoBody, max_depth=server.max_json_depth)
        except APIError as e:
            if e.param:
                raise bad_request(e.param, "this route takes no request body (send none, or {})") from None
            raise
    return await handler(request)
