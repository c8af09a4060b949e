"""The HTTP routes of the Tinker API (/api/v1/...), as the official SDK (tinker 0.38) calls them.

In: JSON bodies, and protobuf for forward_backward. Out: JSON, or a future's request id; retrieve_future answers a
finished forward_backward or sample in protobuf (the SDK reads those only so), anything else in JSON, an unfinished
one with {"type": "try_again"}. Bad input is a 400 naming the field, found before any work starts (the SDK raises
BadRequestError at once; a 5xx it would retry for minutes); what can only fail later fails its future with
{"error", "category": "user"}, which the SDK raises as RequestFailedError.
"""

import hmac
import logging
import math
import re
from typing import Any

import msgspec
from aiohttp import web

from paraloop.messages import SamplingParams
from paraloop.server.errors import APIError, bad_request, error_response, from_http_exception, request_errors
from paraloop.server.limits import read_body
from paraloop.server.responses import json_response
from paraloop.tinker import proto
from paraloop.tinker.futures import Futures, FuturesFull, Result
from paraloop.tinker.learner import AdamParams, check_data
from paraloop.tinker.losses import LOSSES, resolve_config
from paraloop.tinker.sessions import NAME, TinkerState, UserError

log = logging.getLogger("paraloop.tinker")
STATE = web.AppKey("tinker_state", TinkerState)
FUTURES = web.AppKey("tinker_futures", Futures)
LIMITS = web.AppKey("tinker_limits", dict)
TOKEN = web.AppKey("tinker_token", str)
PROTO = "application/x-protobuf"
FIELD = re.compile(r"[A-Za-z_][\w.\[\]]*")
SAMPLE_FIELDS = {
    **{name: f"sampling_params.{name}" for name in SamplingParams.__struct_fields__},
    "prompt": "prompt",
    "n": "num_samples",
    "stop_token_ids": "sampling_params.stop",
}
"""The engine's field names as asample's body spells them: the 400 of a sample the engine would refuse."""


@web.middleware
async def errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        token = request.app[TOKEN]
        given = request.headers.get("X-API-Key", "").encode("utf-8", "surrogateescape")  # its bytes, UTF-8 or not
        if token and not hmac.compare_digest(given, token.encode()):
            raise APIError(401, "X-API-Key: the server's token is required (TINKER_API_KEY)", param="X-API-Key")
        return await handler(request)
    except APIError as e:
        return error_response(e)
    except (UserError, proto.ProtoError) as e:
        return error_response(refused(e))
    except FuturesFull as e:
        return error_response(APIError(429, str(e)))
    except web.HTTPException as e:
        return error_response(from_http_exception(e))
    except Exception:
        log.exception("tinker route %s failed", request.path)
        return error_response(APIError(500, "internal error (see the server log)"))


def refused(e: Exception) -> APIError:
    """A 400 for a message of the form "FIELD: what is wrong", FIELD as its param."""
    message = str(e)
    field, sep, _ = message.partition(": ")
    param = field if sep and FIELD.fullmatch(field) else None
    return APIError(400, message, param=param, code="invalid_value")


async def read(request: web.Request) -> bytes:
    """The whole body, bounded as on every paraloop server (server/limits.py, read_body)."""
    return await read_body(request, request.app[LIMITS]["body_timeout_s"])


JSON = msgspec.json.Decoder(float_hook=float)  # 1e400 decodes to inf, refused below naming its field
INT_RANGE = (-(2**63), 2**64 - 1)  # int64 and uint64 (the SDK's seeds are uint64)


async def body_of(request: web.Request) -> dict[str, Any]:
    """The body's JSON object, bounded before any route reads it: nesting at most server.max_json_depth deep,
    integers within 64 bits, numbers finite; else a 400 naming the field."""
    try:
        body = JSON.decode(await read(request))
    except msgspec.DecodeError as e:  # not JSON, not UTF-8, or an integer of thousands of digits
        raise bad_request(None, f"the body is not JSON: {e}") from None
    except RecursionError:
        raise bad_request(None, "the body is not JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise bad_request(None, "the body must be a JSON object")
    bounded(body, request.app[LIMITS]["max_json_depth"])
    return body


def bounded(body: dict[str, Any], max_depth: int) -> None:
    """Walk the body without recursion; 400 naming the first field out of bounds."""
    stack: list[tuple[Any, str, int]] = [(body, "", 1)]
    while stack:
        value, name, depth = stack.pop()
        if depth > max_depth:
            raise bad_request(name, f"nested more than {max_depth} levels deep (server.max_json_depth)")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            field = f"{name}[{key}]" if isinstance(value, list) else f"{name}.{key}" if name else str(key)
            if isinstance(item, dict | list):
                stack.append((item, field, depth + 1))
            elif type(item) is int and not INT_RANGE[0] <= item <= INT_RANGE[1]:
                raise bad_request(field, "an integer outside the 64-bit range")
            elif type(item) is float and not math.isfinite(item):
                raise bad_request(field, "a number beyond the range of a double")


def get(body: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = ..., *, where: str = "") -> Any:
    name = f"{where}{key}"
    value = body.get(key, default)
    if value is ...:
        raise bad_request(name, "required")
    if value is None and default is None:
        return None
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise bad_request(name, f"must be {kind}, got a boolean")
    if not isinstance(value, kind):
        raise bad_request(name, f"has the wrong type ({type(value).__name__})")
    return value


def future(request: web.Request, work: Any, *, client: str, **extra: Any) -> web.Response:
    """Submit training work of `client` (a model id): after its earlier calls, round-robin with other clients'."""
    request_id = request.app[FUTURES].submit(work, key=client)
    return json_response({"request_id": request_id, **extra})


# --- service ---------------------------------------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def capabilities(request: web.Request) -> web.Response:
    state = request.app[STATE]
    model = {
        "model_name": state.model_name,
        "max_context_length": state.max_context,
        "trainable": True,
        "sampleable": True,
    }
    return json_response({"supported_models": [model]})


async def client_config(request: web.Request) -> web.Response:
    # httpx's own transport; forward_backward bodies uncompressed; per-request polling of retrieve_future
    return json_response(
        {
            "use_pyqwest_transport": False,
            "proto_compress_fwdbwd": False,
            "fwdbwd_max_chunk_len": request.app[LIMITS]["max_data"],
            "sample_use_retrieve_futures": False,
            "custom_loss_server_side": False,
        }
    )


async def dynamic_config(request: web.Request) -> web.Response:
    return json_response({"refresh_interval_sec": 300})


async def create_session(request: web.Request) -> web.Response:
    await body_of(request)
    return json_response({"type": "create_session", "session_id": request.app[STATE].new_session()})


async def heartbeat(request: web.Request) -> web.Response:
    body = await body_of(request)
    session_id = get(body, "session_id", str)
    if session_id not in request.app[STATE].sessions:
        raise APIError(404, f"session_id: no session {session_id!r}", param="session_id")
    return json_response({"type": "session_heartbeat"})


FINISH_REASONS = ("success", "errored", "interrupted")


async def finish_session(request: web.Request) -> web.Response:
    """ServiceClient.close(status): the session takes no new training client (sessions.py, finish_session)."""
    body = await body_of(request)
    reason = get(get(body, "reason", dict), "type", str, where="reason.")
    if reason not in FINISH_REASONS:
        raise bad_request("reason.type", f"must be one of {', '.join(FINISH_REASONS)}")
    get(body, "detail", str, None)
    session_id = request.match_info["session_id"]
    try:
        request.app[STATE].finish_session(session_id, reason)
    except KeyError:
        raise APIError(404, f"session_id: no session {session_id!r}", param="session_id") from None
    return json_response({"type": "finish_session"})


async def accepted(request: web.Request) -> web.Response:
    """Telemetry and cancellations: nothing to do locally (a cancelled sample finishes and is dropped)."""
    await read(request)
    return json_response({"status": "accepted"})


# --- training --------------------------------------------------------------------------------------------------------


async def create_model(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await body_of(request)
    state.check_base(get(body, "base_model", str), "base_model")
    lora = get(body, "lora_config", dict, None) or {}
    rank = get(lora, "rank", int, 32, where="lora_config.")
    if not 1 <= rank <= state.max_rank:
        raise bad_request("lora_config.rank", f"must be in [1, {state.max_rank}] (server.max_lora_rank)")
    for key in ("train_mlp", "train_attn"):
        if get(lora, key, bool, True, where="lora_config.") is not True:
            raise bad_request(
                f"lora_config.{key}",
                "LoRA on a subset of the layers is not supported here: every "
                "linear layer of every block gets an adapter",
            )
    seed = get(lora, "seed", int, None, where="lora_config.")
    if seed is not None and seed < 0:
        raise bad_request("lora_config.seed", "must be >= 0 (a 64-bit unsigned seed)")
    optimizer = get(body, "optimizer_config", dict, None) or {}
    if optimizer.get("type", "adamw") != "adamw":
        raise bad_request("optimizer_config.type", "only adamw is supported here")
    model_id = state.new_model_id(get(body, "session_id", str), get(body, "model_seq_id", int))
    return future(request, lambda: state.create_model(model_id, rank, seed), client=model_id, model_id=model_id)


async def get_info(request: web.Request) -> web.Response:
    body = await body_of(request)
    return json_response(request.app[STATE].info(get(body, "model_id", str)))


async def forward_backward(request: web.Request) -> web.Response:
    state, limits = request.app[STATE], request.app[LIMITS]
    if request.content_type != PROTO or request.headers.get("Content-Encoding"):
        raise APIError(415, f"forward_backward takes an uncompressed {PROTO} body", param="Content-Type")
    fb = proto.decode_forward_backward(await read(request))
    state.model(fb.model_id)
    if fb.loss_fn not in LOSSES:
        raise bad_request("loss_fn", f"{fb.loss_fn!r} is not supported here (supported: {', '.join(LOSSES)})")
    if not fb.data:
        raise bad_request("data", "empty")
    if len(fb.data) > limits["max_data"]:
        raise bad_request("data", f"{len(fb.data)} datums, more than tinker.max_data = {limits['max_data']}")
    try:
        config = resolve_config(fb.loss_fn, fb.config)
        check_data(fb.data, fb.loss_fn, vocab=state.vocab, max_tokens=limits["max_batch_tokens"])
    except ValueError as e:
        raise refused(e) from None
    return future(request, lambda: state.forward_backward(fb, config), client=fb.model_id, model_id=fb.model_id)


async def client_call(request: web.Request) -> tuple[TinkerState, dict[str, Any], str]:
    """A call on an existing training client: the state, the body and its model_id (400: no such client)."""
    state, body = request.app[STATE], await body_of(request)
    model_id = get(body, "model_id", str)
    state.model(model_id)
    return state, body, model_id


def checked_name(name: str) -> str:
    """A checkpoint's name, as `path` gives it."""
    if not NAME.fullmatch(name):
        raise bad_request("path", f"{name!r}: a name of letters, digits and ._- (up to 128)")
    return name


async def optim_step(request: web.Request) -> web.Response:
    state, body, model_id = await client_call(request)
    raw = get(body, "adam_params", dict, None)
    if raw is None:
        raise bad_request("adam_params", "required (only Adam is supported here)")
    params = AdamParams()
    for key in ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm"):
        value = get(raw, key, (int, float), getattr(params, key), where="adam_params.")
        if not math.isfinite(value) or value < 0 or (key.startswith("beta") and value >= 1):
            raise bad_request(f"adam_params.{key}", f"{value} is out of range")
        setattr(params, key, float(value))
    return future(request, lambda: state.optim_step(model_id, params), client=model_id, model_id=model_id)


async def save_weights(request: web.Request) -> web.Response:
    state, body, model_id = await client_call(request)
    name = checked_name(get(body, "path", str, None) or f"step-{state.models[model_id].step}")
    return future(request, lambda: state.save_state(model_id, name), client=model_id, model_id=model_id)


async def load_weights(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await body_of(request)
    model_id = get(body, "model_id", str, None)
    path = get(body, "path", str)
    state.resolve(path, "path")
    optimizer = get(body, "optimizer", bool, False)
    if model_id is not None:
        state.model(model_id)
        work, client = lambda: state.load_state(model_id, path, optimizer=optimizer, new=False), model_id  # noqa: E731
    else:  # create-via-load: the SDK names the new client SESSION_ID:train:N itself
        new_id = state.new_model_id(get(body, "session_id", str), get(body, "model_seq_id", int))
        state.check_base(get(body, "base_model", str, None), "base_model")
        work, client = lambda: state.load_state(new_id, path, optimizer=optimizer, new=True), new_id  # noqa: E731
    return future(request, work, client=client)


async def save_for_sampler(request: web.Request) -> web.Response:
    state, body, model_id = await client_call(request)
    name = get(body, "path", str, None)
    if name is not None:
        checked_name(name)
    kind = get(body, "kind", str, "snapshot")
    if kind not in ("snapshot", "inflight"):
        raise bad_request("kind", f"{kind!r}: must be 'snapshot' or 'inflight'")
    if kind == "inflight" and name is not None:
        raise bad_request("path", "an inflight save has no name (it updates the client's inflight samplers)")
    work = lambda: state.save_for_sampler(model_id, name, inflight=kind == "inflight")  # noqa: E731
    return future(request, work, client=model_id, model_id=model_id)


# --- sampling --------------------------------------------------------------------------------------------------------


async def create_sampling_session(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await body_of(request)
    base_model = get(body, "base_model", str, None)
    state.check_base(base_model, "base_model")
    model_path = get(body, "model_path", str, None)
    arrays = state.sampler_from_path(model_path) if model_path else None
    sampler_id = state.new_sampler(model_path, arrays)
    return json_response({"type": "create_sampling_session", "sampling_session_id": sampler_id})


async def join_sampling_session(request: web.Request) -> web.Response:
    body = await body_of(request)
    request.app[STATE].sampler(get(body, "sampling_session_id", str))
    return json_response({"type": "join_sampling_session", "client_counter": 1})


async def get_sampler(request: web.Request) -> web.Response:
    sampler = request.app[STATE].sampler(request.match_info["sampler_id"])
    return json_response(
        {"sampler_id": sampler.sampler_id, "base_model": sampler.base_model, "model_path": sampler.model_path}
    )


def prompt_tokens(body: dict[str, Any], vocab: int) -> list[int]:
    prompt = get(body, "prompt", dict)
    tokens: list[int] = []
    for i, chunk in enumerate(get(prompt, "chunks", list, where="prompt.")):
        where = f"prompt.chunks[{i}]"
        if not isinstance(chunk, dict) or chunk.get("type", "encoded_text") != "encoded_text":
            raise bad_request(where, "only encoded_text chunks are supported (no images)")
        ids = get(chunk, "tokens", list, where=f"{where}.")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
            raise bad_request(f"{where}.tokens", f"token ids must be integers in [0, {vocab})")
        tokens += ids
    if not tokens:
        raise bad_request("prompt", "empty")
    return tokens


def sampling_params(raw: dict[str, Any]) -> SamplingParams:
    w = "sampling_params."
    temperature = float(get(raw, "temperature", (int, float), 1.0, where=w))
    top_p = float(get(raw, "top_p", (int, float), 1.0, where=w))
    top_k = get(raw, "top_k", int, -1, where=w)
    max_tokens = get(raw, "max_tokens", int, None, where=w)
    seed = get(raw, "seed", int, None, where=w)
    if seed is not None:
        seed %= 2**63 - 1  # any 64-bit seed the SDK sends, folded as the hosted service folds it
    stop = raw.get("stop")
    if not 0 <= temperature <= 100 or not math.isfinite(temperature):
        raise bad_request(f"{w}temperature", "must be in [0, 100]")
    if not 0 < top_p <= 1:
        raise bad_request(f"{w}top_p", "must be in (0, 1]")
    if top_k < -1:
        raise bad_request(f"{w}top_k", "must be -1 (off) or >= 0")
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"{w}max_tokens", "must be >= 1")
    strings: list[str] = []
    ids: list[int] = []
    if isinstance(stop, str):
        strings = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        strings = stop
    elif isinstance(stop, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in stop):
        ids = stop
    elif stop is not None:
        raise bad_request(f"{w}stop", "must be a string, a list of strings or a list of token ids")
    kwargs: dict[str, Any] = {
        "temperature": temperature,
        "top_p": top_p,
        "top_k": max(top_k, 0),
        "stop": strings,
        "stop_token_ids": ids,
        "ignore_eos": stop == [],
        "seed": seed,
    }
    if max_tokens is not None:
        kwargs["max_tokens"] = max_tokens
    return SamplingParams(**kwargs)


async def asample(request: web.Request) -> web.Response:
    state, limits = request.app[STATE], request.app[LIMITS]
    body = await body_of(request)
    sampler_id = get(body, "sampling_session_id", str, None)
    state.sampler(sampler_id)
    n = get(body, "num_samples", int, 1)
    if not 1 <= n <= limits["max_num_samples"]:
        raise bad_request("num_samples", f"must be in [1, {limits['max_num_samples']}] (tinker.max_num_samples)")
    tokens = prompt_tokens(body, state.vocab)
    params = sampling_params(get(body, "sampling_params", dict))
    for key in ("topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k"):
        if get(body, key, int, 0):
            raise bad_request(key, "not supported here (docs/tinker.md)")
    for key in ("target_prompt_logprobs", "prompt_logprobs_last_n"):
        if body.get(key) is not None:
            raise bad_request(key, "not supported here (docs/tinker.md)")
    scored = bool(get(body, "prompt_logprobs", bool, False))
    with request_errors(SAMPLE_FIELDS):
        generate = state.generate_request(tokens, n, params)
    work = lambda: state.sample(sampler_id, generate, prompt_logprobs=scored)  # noqa: E731
    request_id = request.app[FUTURES].submit(work, key=None)
    return json_response({"request_id": request_id, "sample_sequence_ids": [f"{request_id}.{i}" for i in range(n)]})


# --- futures ---------------------------------------------------------------------------------------------------------


async def retrieve_future(request: web.Request) -> web.Response:
    body = await body_of(request)
    request_id = get(body, "request_id", str)
    try:
        result = await request.app[FUTURES].retrieve(request_id)
    except KeyError:
        raise APIError(
            404,
            f"request_id: no future {request_id!r} (never made, or its result expired: tinker.retention_s)",
            param="request_id",
        ) from None
    if result is None:
        return json_response({"type": "try_again", "request_id": request_id, "queue_state": "active"})
    return respond(result)


def respond(result: Result) -> web.Response:
    if result.error is not None:
        return json_response({"error": result.error, "category": result.category})
    if result.proto is not None:
        return web.Response(body=result.proto, content_type=PROTO)
    return json_response(result.json, nan_literals=True)  # optim_step's metrics: a diverged grad_norm is NaN


ROUTES = [
    web.get("/api/v1/healthz", healthz),
    web.get("/api/v1/get_server_capabilities", capabilities),
    web.post("/api/v1/client/config", client_config),
    web.post("/api/v1/client/dynamic_config", dynamic_config),
    web.post("/api/v1/create_session", create_session),
    web.post("/api/v1/session_heartbeat", heartbeat),
    web.post("/api/v1/sessions/{session_id}/finish", finish_session),
    web.post("/api/v1/telemetry", accepted),
    web.post("/api/v1/cancel_future", accepted),
    web.post("/api/v1/create_model", create_model),
    web.post("/api/v1/get_info", get_info),
    web.post("/api/v1/forward_backward", forward_backward),
    web.post("/api/v1/optim_step", optim_step),
    web.post("/api/v1/save_weights", save_weights),
    web.post("/api/v1/load_weights", load_weights),
    web.post("/api/v1/save_weights_for_sampler", save_for_sampler),
    web.post("/api/v1/create_sampling_session", create_sampling_session),
    web.post("/api/v1/join_sampling_session", join_sampling_session),
    web.get("/api/v1/samplers/{sampler_id}", get_sampler),
    web.post("/api/v1/asample", asample),
    web.post("/api/v1/retrieve_future", retrieve_future),
]


def make_app(
    state: TinkerState, futures: Futures, *, limits: dict[str, float], token: str, max_body: int
) -> web.Application:
    app = web.Application(client_max_size=max_body, middlewares=[errors])
    app[STATE], app[FUTURES], app[LIMITS], app[TOKEN] = state, futures, limits, token
    app.router.add_routes(ROUTES)
    return app
