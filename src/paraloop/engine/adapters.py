"""The adapters an engine serves, by name: the policy, the bare base model, and named LoRA adapters beside them.

In: names (a request's `model` field, resolved by the server), loads and unloads (`paraloop serve --lora-modules`,
POST /v1/load_lora_adapter and /v1/unload_lora_adapter), and names of a run's own checkpoints
(`policy@step_000040`), loaded the first time a request names them. Out: for each request, the `Adapter` its rows
use, held from `acquire` until `release`.

Bounds: at most `max_loras` named adapters are loaded (or loading) at once. To make room for a checkpoint a request
names, the least recently used checkpoint adapter no request is using is evicted; adapters loaded by name (at start
or over HTTP) stay until unloaded. Unloading or evicting takes the name away at once; the engine thread frees the
arrays once the last request using them has ended (requests hold their adapter), so rows in flight are never
disturbed. Files are read and checked against the model on a thread of their own while the engine keeps decoding.

Lives on the event loop. The engine thread reads an Adapter's arrays and owns its `position` and `rows`.
"""

import asyncio
import contextlib
import itertools
import json
import re
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio

from paraloop.engine.admission import EngineBusy
from paraloop.engine.prefix_cache import BASE_ADAPTER
from paraloop.lora import ServedAdapter, Target, read_for_serving
from paraloop.mlx_thread import end_mlx_thread

POLICY = "policy"  # the adapter being trained (or given with --lora-path), swapped live
BASE = "base"  # the base model with no adapter
CHECKPOINT = re.compile(r"policy@(step_\d+|initial_adapter)")  # a run's own checkpoints, loaded on demand
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+-]{0,127}")


class AdapterNotFound(LookupError):
    """No adapter of that name is served (HTTP 404)."""


class AdapterError(ValueError):
    """An adapter cannot be loaded or unloaded as asked (HTTP 400): `field` names the request field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class AdapterLimit(EngineBusy):
    """Every adapter slot holds an adapter some request is using (HTTP 429: retry once one is free)."""


@dataclass(eq=False)
class Adapter:
    """One adapter an engine serves. The base model and the policy are Adapters too, so every row has one."""

    name: str
    kind: Literal["base", "policy", "lora"]
    path: str = ""
    served: ServedAdapter | None = None  # the arrays by layer (lora), once read
    version: int = 0  # a checkpoint's version (trainer_state.json), put's version; engine thread once installed
    on_demand: bool = False  # a checkpoint a request named: evicted when room is needed
    identity: str = ""  # unique per load: the prefix cache keys KV by it
    install_s: float = 0.0  # how long decoding paused to take it
    created: int = field(default_factory=lambda: int(time.time()))
    # Event loop.
    users: int = 0  # requests holding it (and loads waiting for it)
    last_used: float = 0.0
    ready: anyio.Event | None = None  # set once loaded (or failed: `error`)
    error: Exception | None = None
    gone: bool = False  # unloaded or evicted: the engine frees it when the last user releases it
    # Engine thread.
    position: int | None = None  # its index in every routed layer's stack (lora_rows.py)
    rows: int = 0  # rows using it in the batch
    dropping: bool = False  # freed as soon as `rows` is 0
    epoch: int = 0  # advances with every replace: KV made in an older epoch is never reused
    replaced_at: int = -1  # the first decode step whose forward pass used the arrays of `version` (replace)
    previous_version: int = 0  # the version before the last replace: its tokens still come out until that step

    @property
    def policy(self) -> bool:
        return self.kind == "policy"


class Adapters:
    """The name table and its bounds; see the module docstring. `install(adapter)` hands a loaded adapter to the
    engine thread (returns the decode pause it took); `uninstall(adapter)` asks the engine thread to free it;
    `replace(adapter, served, version)` has it serve other arrays in place (returns the pause)."""

    def __init__(
        self,
        *,
        policy: bool,
        lora: bool,
        targets: dict[Target, tuple[int, int]],
        max_loras: int,
        max_rank: int,
        install: Callable[[Adapter], Awaitable[float]],
        uninstall: Callable[[Adapter], None],
        replace: Callable[[Adapter, ServedAdapter, int], Awaitable[float]] | None = None,
        find: Callable[[str], Path | None] | None = None,
    ) -> None:
        """`find("step_000040")`: the checkpoint dir a name "policy@step_000040" loads, or None (not served)."""
        from paraloop.engine.lora_rows import BASE as BASE_POSITION
        from paraloop.engine.lora_rows import POLICY as POLICY_POSITION

        self.policy = Adapter(POLICY, "policy", identity=BASE_ADAPTER, position=POLICY_POSITION) if policy else None
        self.base = Adapter(BASE, "base", identity="base", position=BASE_POSITION) if lora or not policy else None
        self.lora = lora  # named adapters can be served (the model is not full-weight trained)
        self.targets = targets
        self.max_loras = max_loras
        self.max_rank = max_rank
        self._install = install
        self._uninstall = uninstall
        self._replace = replace
        self._find = find
        self._named: dict[str, Adapter] = {}
        self._serial = itertools.count(1)

    @property
    def default(self) -> Adapter:
        """What a request naming no adapter gets: the policy when there is one, else the base model."""
        return self.policy or self.base  # type: ignore[return-value]

    def loaded(self) -> list[Adapter]:
        """The named adapters ready to serve, in load order."""
        return [a for a in self._named.values() if a.ready is not None and a.ready.is_set() and a.error is None]

    def names(self) -> list[str]:
        fixed = [a.name for a in (self.policy, self.base) if a is not None]
        return fixed + [a.name for a in self.loaded()]

    def nbytes(self) -> int:
        return sum(a.served.nbytes for a in self.loaded() if a.served is not None)

    # --- requests --------------------------------------------------------------------------------------------------

    async def acquire(self, name: str | None) -> Adapter:
        """The adapter `name` selects (None: the default), held until `release`. A checkpoint name is loaded on first
        use (requests naming it meanwhile wait for that one load). Raises AdapterNotFound, AdapterError (the file
        cannot be served), AdapterLimit."""
        if name is None:
            return self._hold(self.default)
        if name == POLICY and self.policy is not None:
            return self._hold(self.policy)
        if name == BASE and self.base is not None:
            return self._hold(self.base)
        adapter = self._named.get(name)
        if adapter is None:
            checkpoint = CHECKPOINT.fullmatch(name)
            path = self._find(checkpoint[1]) if self._find is not None and checkpoint else None
            if path is None:
                raise AdapterNotFound(f"{name!r} names no served model or adapter (GET /v1/models lists them)")
            adapter = self._reserve(name, path, on_demand=True, field="model")
            self._hold(adapter)
            try:
                with anyio.CancelScope(shield=True):  # others may be waiting for this load: it always finishes
                    await self._fill(adapter)
            except BaseException:
                self.release(adapter)
                raise
            return adapter
        self._hold(adapter)
        try:
            assert adapter.ready is not None
            await adapter.ready.wait()
        except BaseException:
            self.release(adapter)
            raise
        if adapter.error is not None:
            self.release(adapter)
            raise adapter.error
        return adapter

    def release(self, adapter: Adapter) -> None:
        """A request is done with `adapter` (its rows have left the engine or are about to: the engine's Cancel for
        them is queued before any uninstall)."""
        if adapter.kind != "lora":
            return
        adapter.users -= 1
        adapter.last_used = time.monotonic()
        self._free_if_unused(adapter)

    def _hold(self, adapter: Adapter) -> Adapter:
        if adapter.kind == "lora":
            adapter.users += 1
            adapter.last_used = time.monotonic()
        return adapter

    # --- loading and unloading ---------------------------------------------------------------------------------------

    async def load(self, name: str, path: str | Path) -> Adapter:
        """Load the adapter at `path` (an mlx-lm adapter dir or file) under `name`; kept until unloaded. Raises
        AdapterError naming the field (`lora_name`, `lora_path`), AdapterLimit."""
        if not self.lora:
            raise AdapterError(
                "lora_name",
                "this engine serves full weights (train_mode = 'full'): named LoRA "
                "adapters need a model trained with LoRA",
            )
        if not NAME.fullmatch(name) or name in (POLICY, BASE) or name.startswith("policy@"):
            raise AdapterError(
                "lora_name",
                f"{name!r} is not a valid adapter name (letters, digits and ._:/+- up to "
                f"128 characters; 'policy', 'base' and 'policy@...' are reserved)",
            )
        if name in self._named:
            raise AdapterError("lora_name", f"an adapter named {name!r} is already loaded (unload it first)")
        adapter = self._reserve(name, path, on_demand=False, field="lora_name")
        self._hold(adapter)
        try:
            with anyio.CancelScope(shield=True):
                await self._fill(adapter)
        finally:
            self.release(adapter)
        return adapter

    async def put(self, name: str, served: ServedAdapter, version: int = 0) -> Adapter:
        """Serve arrays already in memory under `name` (no file is read): `paraloop tinker`'s sampler weights,
        their tokens labelled `version`. Evicted like a checkpoint a request named (least recently used first) when
        room is needed."""
        if not self.lora:
            raise AdapterError("model", "this engine serves full weights: LoRA adapters cannot be served beside them")
        if name in self._named:
            raise AdapterError("model", f"an adapter named {name!r} is already loaded")
        adapter = self._reserve(name, "", on_demand=True, field="model")
        adapter.served, adapter.version = served, version
        self._hold(adapter)
        try:
            with anyio.CancelScope(shield=True):
                adapter.install_s = await self._install(adapter)
        except Exception as e:
            adapter.error = e
            del self._named[name]
            raise
        finally:
            assert adapter.ready is not None
            adapter.ready.set()
            self.release(adapter)
        return adapter

    async def replace(self, name: str, served: ServedAdapter, version: int) -> bool:
        """Serve other arrays under the name `put` gave, in place, from the next decode step on: rows decoding with
        it go on with the new arrays, each token labelled with the version that produced it (the KV they hold stays
        as the older arrays computed it). False if `name` is not served (evicted or unloaded: `put` it again)."""
        adapter = self._named.get(name)
        ready = adapter is not None and adapter.ready is not None and adapter.ready.is_set()
        if not ready or adapter.error is not None or adapter.served is None or self._replace is None:
            return False
        if version < adapter.version:
            raise ValueError(f"adapter {name!r}: version {version} is older than version {adapter.version}")
        self._hold(adapter)
        try:
            with anyio.CancelScope(shield=True):
                await self._replace(adapter, served, version)
            adapter.served = served
        finally:
            self.release(adapter)
        return True

    def unload(self, name: str) -> Adapter:
        """Stop serving `name` now (new requests get 404); its arrays go once no request uses them."""
        adapter = self._named.get(name)
        if adapter is None:
            if name in (POLICY, BASE):
                raise AdapterError("lora_name", f"{name!r} is not a named adapter and cannot be unloaded")
            raise AdapterNotFound(f"no adapter named {name!r} is loaded")
        self._drop(adapter)
        return adapter

    def _reserve(self, name: str, path: str | Path, *, on_demand: bool, field: str) -> Adapter:
        if not self.lora:
            raise AdapterError(
                field,
                "this engine serves full weights (train_mode = 'full'): LoRA checkpoints and "
                "named adapters cannot be served beside them",
            )
        self._make_room(field)
        adapter = Adapter(
            name,
            "lora",
            path=str(path),
            on_demand=on_demand,
            ready=anyio.Event(),
            identity=f"lora:{name}#{next(self._serial)}",
        )
        self._named[name] = adapter
        return adapter

    def _make_room(self, field: str) -> None:
        while len(self._named) >= self.max_loras:
            idle = [a for a in self._named.values() if a.on_demand and a.users == 0 and a.ready.is_set()]
            if idle:
                self._drop(min(idle, key=lambda a: a.last_used))
            elif any(a.on_demand for a in self._named.values()):
                raise AdapterLimit(
                    f"all server.max_loras = {self.max_loras} adapter slots hold adapters in use or "
                    "loading; retry later"
                )
            else:
                raise AdapterError(
                    field,
                    f"server.max_loras = {self.max_loras} adapters are loaded: unload one "
                    "(POST /v1/unload_lora_adapter) first",
                )

    async def _fill(self, adapter: Adapter) -> None:
        """Read, check and install `adapter`; on failure, forget it and raise AdapterError (naming the path)."""
        assert adapter.ready is not None
        try:
            adapter.served, adapter.version = await on_own_thread(self._read, Path(adapter.path))
            adapter.install_s = await self._install(adapter)
        except (OSError, ValueError) as e:
            adapter.error = AdapterError("model" if adapter.on_demand else "lora_path", str(e))
        except Exception as e:  # the engine stopped: still a clean refusal for the waiting requests
            adapter.error = e
        finally:
            if adapter.error is not None and self._named.get(adapter.name) is adapter:
                del self._named[adapter.name]
            adapter.ready.set()
        if adapter.error is not None:
            raise adapter.error
        self._free_if_unused(adapter)  # unloaded while it was loading

    def _read(self, path: Path) -> tuple[ServedAdapter, int]:
        """On the loading thread: the adapter's arrays, checked against the model, and its version."""
        return read_for_serving(path, self.targets, max_rank=self.max_rank), checkpoint_version(path)

    def _drop(self, adapter: Adapter) -> None:
        if self._named.get(adapter.name) is adapter:
            del self._named[adapter.name]
        adapter.gone = True
        self._free_if_unused(adapter)

    def _free_if_unused(self, adapter: Adapter) -> None:
        done = adapter.ready is not None and adapter.ready.is_set()
        if adapter.gone and adapter.users == 0 and done and adapter.error is None and adapter.served is not None:
            self._uninstall(adapter)
            adapter.served = None  # nothing else to free it for: the engine thread holds its arrays until then


def checkpoint_version(path: Path) -> int:
    """The adapter version a paraloop checkpoint dir records (trainer_state.json), else 0."""
    state = path / "trainer_state.json" if path.is_dir() else None
    if state is None or not state.is_file() or state.stat().st_size > 16 << 20:
        return 0
    with contextlib.suppress(OSError, ValueError):
        version = json.loads(state.read_text()).get("version")
        if isinstance(version, int) and not isinstance(version, bool):
            return version
    return 0


async def on_own_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs) on a new thread, which destroys its MLX streams when done (a thread's streams must go
    before the thread does, ml-explore/mlx#3126); the event loop and the engine thread go on meanwhile. What fn
    returns must be evaluated: MLX streams are thread-local."""
    loop = asyncio.get_running_loop()
    done = anyio.Event()
    out: list[tuple[bool, Any]] = []

    def main() -> None:
        try:
            out.append((True, fn(*args, **kwargs)))
        except BaseException as e:  # handed to the awaiting task
            out.append((False, e))
        finally:
            end_mlx_thread()
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                loop.call_soon_threadsafe(done.set)

    threading.Thread(target=main, name="paraloop-adapter-load", daemon=True).start()
    await done.wait()
    ok, value = out[0]
    if not ok:
        raise value
    return value


async def load_modules(adapters: Adapters, modules: dict[str, str]) -> None:
    """server.lora_modules (name -> path), loaded as the engine starts: the operator's own paths, so not held to
    server.lora_dirs. Raises ValueError naming the key of the first that cannot be served."""
    for name, path in modules.items():
        try:
            await adapters.load(name, path)
        except AdapterError as e:
            raise ValueError(f"server.lora_modules.{name}: {e.message}") from None
        except EngineBusy as e:
            raise ValueError(f"server.lora_modules.{name}: {e}") from None
