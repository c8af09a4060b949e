"""Adapters over HTTP, vLLM's way: GET /v1/models lists every servable id, POST /v1/load_lora_adapter and
/v1/unload_lora_adapter change the named adapters at run time.

In: {"lora_name", "lora_path"} / {"lora_name"} (guarded like every route by server.control_token). A path must lie
inside one of server.lora_dirs once symlinks are resolved (403 otherwise: no request reads files elsewhere; with no
lora_dirs, loading at run time is off). Out: the adapter's model card (load) or {"id", "object", "deleted"}
(unload); errors in the OpenAI shape naming the field. The engine's adapter table (engine/adapters.py) does the
rest: bounds, reading on its own thread, and leaving rows in flight undisturbed.
"""

import time
from pathlib import Path
from typing import Annotated, Any

from aiohttp import web
from msgspec import Meta

from paraloop.engine import EngineBusy
from paraloop.engine.adapters import Adapter, AdapterError, AdapterNotFound
from paraloop.lora import adapter_files
from paraloop.server.errors import APIError, bad_request
from paraloop.server.responses import json_response
from paraloop.server.schemas import Body, decode
from paraloop.server.state import STATE, ServerState

Name = Annotated[str, Meta(min_length=1, max_length=128)]
PathText = Annotated[str, Meta(min_length=1, max_length=4096)]


class LoadLoraBody(Body, kw_only=True):
    lora_name: Name
    lora_path: PathText


class UnloadLoraBody(Body, kw_only=True):
    lora_name: Name
    lora_int_id: int | None = None  # vLLM clients may send it: accepted, not used


def card(
    state: ServerState, model_id: str, *, parent: str | None = None, root: str | None = None, created: int | None = None
) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": created or state.created,
        "owned_by": "paraloop",
        "root": root or model_id,
        "parent": parent,
    }


def adapter_card(state: ServerState, adapter: Adapter) -> dict[str, Any]:
    served = {"policy": state.settings.model.lora_path, "base": state.settings.model.base_path}
    root = adapter.path or served.get(adapter.kind)
    version = state.engine.version if adapter.policy else adapter.version
    return card(state, adapter.name, parent=state.model_name, root=root, created=adapter.created) | {
        "adapter_version": version
    }


async def models(request: web.Request) -> web.Response:
    """The served model (the default adapter) and every adapter a request's `model` may name now."""
    state = request.app[STATE]
    cards = [card(state, state.model_name, root=state.settings.model.base_path)]
    adapters = getattr(state.engine, "adapters", None)
    if adapters is not None:
        for adapter in (adapters.policy, adapters.base, *adapters.loaded()):
            if adapter is not None:
                cards.append(adapter_card(state, adapter))
    return json_response({"object": "list", "data": cards})


def allowed_path(text: str, dirs: list[str]) -> Path:
    """`text` with symlinks resolved, if it (and the adapter files it names) lie inside one of `dirs`; else 403.
    What lies outside is refused before anything there is opened or reported."""
    if not dirs:
        raise APIError(
            403,
            "loading adapters at run time is off: list the directories they may come from in server.lora_dirs",
            param="lora_path",
            code="forbidden_path",
        )
    try:
        roots = [Path(d).resolve() for d in dirs]
        path = Path(text).resolve()
    except (OSError, ValueError) as e:  # a NUL byte, a symlink loop
        raise bad_request("lora_path", f"not a usable path ({e})") from None
    outside = APIError(
        403, f"lora_path: {text!r} is not inside server.lora_dirs", param="lora_path", code="forbidden_path"
    )
    if not any(path.is_relative_to(root) for root in roots):
        raise outside
    try:
        files = [f.resolve() for f in adapter_files(path) if f is not None]
    except (OSError, ValueError) as e:
        raise bad_request("lora_path", str(e)) from None
    if not all(any(f.is_relative_to(root) for root in roots) for f in files):
        raise outside  # a file inside is a symlink to elsewhere
    return path


async def load_lora_adapter(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = decode(await request.read(), LoadLoraBody, max_depth=state.settings.server.max_json_depth)
    if body.lora_name == state.model_name:
        raise bad_request("lora_name", f"{body.lora_name!r} is the served model's own name")
    path = allowed_path(body.lora_path, state.settings.server.lora_dirs)
    start = time.perf_counter()
    adapter = await _call(state.engine.adapters.load, body.lora_name, path)
    return json_response(adapter_card(state, adapter) | {"load_s": time.perf_counter() - start})


async def unload_lora_adapter(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = decode(await request.read(), UnloadLoraBody, max_depth=state.settings.server.max_json_depth)
    adapter = await _call(state.engine.adapters.unload, body.lora_name)
    return json_response({"id": adapter.name, "object": "model", "deleted": True})


async def _call(fn: Any, *args: Any) -> Adapter:
    try:
        result = fn(*args)
        return await result if hasattr(result, "__await__") else result
    except AdapterNotFound as e:
        raise APIError(404, str(e), param="lora_name", code="model_not_found") from None
    except AdapterError as e:
        raise bad_request(e.field, e.message) from None
    except EngineBusy as e:
        raise APIError(429, str(e), code="engine_busy", headers={"Retry-After": "1"}) from None
    except RuntimeError as e:  # the engine stopped
        raise APIError(503, str(e), code="engine_stopped") from None


ROUTES = [
    web.post("/v1/load_lora_adapter", load_lora_adapter),
    web.post("/v1/unload_lora_adapter", unload_lora_adapter),
]
