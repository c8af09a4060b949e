"""The inference engine actor: admission, validation and the asyncio face of the engine thread (worker.py).

In: GenerateRequests (`generate` / `complete`; `score` / `score_many` for their prompts' log-probs, scoring.py),
adapter versions (`swap_adapter`) and named adapters to serve beside the policy (`adapters.load` /
`adapters.unload`, adapters.py; each request names its own). Out: TokenEvents per generated token, AdapterSwapped
per applied swap. `run()` owns the engine thread: it signals readiness with
`task_status.started()`, raises if the thread fails, and when cancelled stops the thread, which ends unfinished
rows with finish_reason "abort" (such events carry token NO_TOKEN = -1 and are not part of the completion).

Runs on the asyncio backend (events come back through `loop.call_soon_threadsafe`).
"""

import asyncio
import contextlib
import math
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import mlx.core as mx
import mlx.nn as nn

from paraloop.config import EngineConfig, Settings
from paraloop.engine.adapters import Adapter, Adapters
from paraloop.engine.admission import Admission, validate
from paraloop.engine.lora_rows import RowAdapters
from paraloop.engine.scoring import PromptLogprobs
from paraloop.engine.served import Recorder, ServedIndex
from paraloop.engine.worker import (
    NO_TOKEN,
    Cancel,
    Handle,
    Insert,
    Install,
    Replace,
    Score,
    ScoreMany,
    Stop,
    Swap,
    Uninstall,
    Worker,
)
from paraloop.lora import AdapterSlots, ServedAdapter, has_lora
from paraloop.messages import AdapterSwapped, Completion, GenerateRequest, TokenEvent


def vocab_size(model: nn.Module, tokenizer: Any) -> int:
    args = getattr(model, "args", None)
    return int(getattr(args, "vocab_size", 0) or len(tokenizer))


class Engine:
    """The engine actor; owns the model twin and an mlx-lm BatchGenerator on one dedicated thread."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        config: EngineConfig,
        batch_size: int = 32,
        max_queue: int = 256,
        adapter: AdapterSlots | None = None,
        version: int = 0,
        max_loras: int = 8,
        max_lora_rank: int = 64,
        find_adapter: Callable[[str], Path | None] | None = None,
    ) -> None:
        """`adapter`: the policy's slots (None: the model's own LoRA layers, if any, are a policy that is never
        swapped; a model without them serves the bare base model by default). Named adapters (at most
        `max_loras`, of rank <= `max_lora_rank`) can be served beside it unless the policy is full weights (no LoRA
        layers); `find_adapter("step_000040")` is the checkpoint dir a request naming `policy@step_000040` loads."""
        if batch_size < 1 or max_queue < 1:
            raise ValueError(f"batch_size and max_queue must be >= 1, got {batch_size} and {max_queue}")
        # Lazily initialised arrays (fresh LoRA) would otherwise be evaluated on the engine thread's stream.
        mx.eval(model.parameters())
        self.tokenizer = tokenizer
        self.config = config
        self.max_queue = max_queue
        self.served: ServedIndex | None = None  # set by an Atropos run: the policy completions served, by ids
        self._adapter = adapter
        lora = adapter is None or has_lora(model)  # a full-weight policy leaves no base model to add adapters to
        routes = RowAdapters(model) if lora else None
        self.adapters = Adapters(
            policy=adapter is not None or has_lora(model),  # LoRA layers without slots: a policy never swapped
            lora=lora,
            targets=routes.targets if routes else {},
            max_loras=max_loras,
            max_rank=max_lora_rank,
            install=self._install,
            uninstall=self._uninstall,
            replace=self._replace,
            find=find_adapter,
        )
        self._vocab = vocab_size(model, tokenizer)
        self._promised_version = version  # highest version accepted by swap_adapter (applied or in flight)
        self._admission = Admission(max_requests=max_queue, max_kv_tokens=config.max_kv_tokens)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker = Worker(
            model,
            tokenizer,
            config=config,
            batch_size=batch_size,
            adapter=adapter,
            version=version,
            deliver=self._deliver_from_thread,
            routes=routes,
        )

    @classmethod
    def from_settings(
        cls,
        model: nn.Module,
        tokenizer: Any,
        settings: Settings,
        *,
        adapter: AdapterSlots | None,
        version: int = 0,
        find_adapter: Callable[[str], Path | None] | None = None,
    ) -> "Engine":
        """The engine as `paraloop run` and `paraloop serve` configure it ([engine] and [server] sections)."""
        return cls(
            model,
            tokenizer,
            config=settings.engine,
            batch_size=settings.server.batch_size,
            max_queue=settings.server.max_concurrent_requests,
            adapter=adapter,
            version=version,
            max_loras=settings.server.max_loras,
            max_lora_rank=settings.server.max_lora_rank,
            find_adapter=find_adapter,
        )

    @property
    def version(self) -> int:
        """The adapter version now serving."""
        return self._worker.version

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start the engine thread and serve until cancelled (or the thread fails, which raises here)."""
        if self._loop is not None:
            raise RuntimeError("Engine.run() can only be called once")
        loop = self._loop = asyncio.get_running_loop()
        ready, exited = anyio.Event(), anyio.Event()

        def main() -> None:
            try:
                self._worker.main(lambda: loop.call_soon_threadsafe(ready.set))
            finally:  # Worker.main has destroyed this thread's MLX streams (ml-explore/mlx#3126)
                with contextlib.suppress(RuntimeError):  # the loop is gone if run() gave up waiting
                    loop.call_soon_threadsafe(ready.set)
                    loop.call_soon_threadsafe(exited.set)

        thread = threading.Thread(target=main, name="paraloop-engine", daemon=True)
        thread.start()
        try:
            await ready.wait()
            if not exited.is_set():
                task_status.started()
            await exited.wait()
            if self._worker.error is not None:
                raise RuntimeError(f"the engine thread failed: {self._worker.error!r}") from self._worker.error
        finally:
            with anyio.CancelScope(shield=True):
                self._worker.post(Stop())
                with anyio.move_on_after(30):
                    await exited.wait()
                    # The thread is past its last MLX call; joining lets its stream go before the process exits.
                    await anyio.to_thread.run_sync(thread.join)

    def check(self, request: GenerateRequest) -> None:
        """Raise RequestError naming the first field that keeps `request` from ever running here."""
        validate(request, config=self.config, vocab=self._vocab)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        """TokenEvents of all rows as they are generated; each row's last event has a finish_reason.

        Raises RequestError, EngineBusy, or for `request.adapter` AdapterNotFound / AdapterError (adapters.py)
        before the first event. Leaving the iteration early (aclose, cancellation) removes the request's rows from
        the batch.
        """
        self.check(request)
        adapter = await self.adapters.acquire(request.adapter)
        try:
            cost = self._admission.admit(request)
        except BaseException:
            self.adapters.release(adapter)
            raise
        send, receive = anyio.create_memory_object_stream[list[TokenEvent]](math.inf)
        handle = Handle(request=request, send=send, adapter=adapter)
        served = Recorder(self.served, request.prompt_tokens) if self.served is not None and adapter.policy else None
        try:
            if not self._worker.post(Insert((handle,))):  # the engine has stopped
                for i in range(request.n):
                    yield TokenEvent(
                        row=i,
                        token=NO_TOKEN,
                        logprob=0.0,
                        version=self.version,
                        text="",
                        finish_reason="abort",
                        adapter=adapter.name,
                    )
                return
            async with receive:
                async for events in receive:
                    for event in events:
                        if served is not None:
                            served.add(event)
                        yield event
        finally:
            self._admission.release(1, cost)
            if not handle.done:
                self._worker.post(Cancel(handle))
            send.close()
            self.adapters.release(adapter)  # after the Cancel: an uninstall it allows comes later in the inbox

    async def complete(self, request: GenerateRequest) -> list[Completion]:
        """Generate and collect every row (ordered by row)."""
        async with contextlib.aclosing(self.generate(request)) as events:
            return await collect(events, request.n)

    async def _admit_batch(self, requests: list[GenerateRequest]) -> tuple[list[Adapter], int]:
        """Each request's adapter acquired, then the batch admitted together (waits while the engine is full); on
        any failure the adapters acquired so far are released. The caller releases both when done."""
        adapters: list[Adapter] = []
        try:
            for request in requests:
                adapters.append(await self.adapters.acquire(request.adapter))
            return adapters, await self._admission.admit_batch(requests)
        except BaseException:
            for adapter in adapters:
                self.adapters.release(adapter)
            raise

    async def complete_many(self, requests: list[GenerateRequest]) -> list[list[Completion]]:
        """Generate several requests admitted together, in one decode step and in this order.

        Their rows then share every decode step in a fixed arrangement, so seeded requests give the same tokens
        run after run (continuous batching would otherwise let thread timing decide who joins which step): this
        is what makes a resumed mock-environment run repeat an uninterrupted one exactly. Waits while the engine
        is full (new HTTP requests are refused meanwhile); raises RequestError if the batch could never fit.
        """
        for request in requests:
            self.check(request)
        adapters, cost = await self._admit_batch(requests)
        streams = [anyio.create_memory_object_stream[list[TokenEvent]](math.inf) for _ in requests]
        handles = tuple(
            Handle(request=r, send=send, adapter=a) for r, (send, _), a in zip(requests, streams, adapters, strict=True)
        )
        results: list[list[Completion]] = [[] for _ in requests]
        try:
            if not self._worker.post(Insert(handles)):
                raise RuntimeError("the engine has stopped")

            async def gather(i: int) -> None:
                async with streams[i][1] as receive:
                    results[i] = await collect(_flatten(receive), requests[i].n)

            async with anyio.create_task_group() as tg:
                for i in range(len(requests)):
                    tg.start_soon(gather, i)
        finally:
            self._admission.release(len(requests), cost)
            for handle, (send, _) in zip(handles, streams, strict=True):
                if not handle.done:
                    self._worker.post(Cancel(handle))
                send.close()
                self.adapters.release(handle.adapter)
        return results

    async def score(self, request: GenerateRequest, *, temperature: float = 1.0) -> PromptLogprobs:
        """The log-probs of `request.prompt_tokens` (positions 1..T-1) under its adapter, with
        `params.top_logprobs` alternatives, of softmax(logits / temperature); admitted and bounded like a
        generation (EngineBusy, RequestError)."""
        self.check(request)
        adapter = await self.adapters.acquire(request.adapter)
        try:
            cost = self._admission.admit(request)
            try:
                scored = self._post(
                    lambda reply: Score(
                        list(request.prompt_tokens), adapter, request.params.top_logprobs, reply, temperature
                    )
                )
                return await scored()
            finally:
                self._admission.release(1, cost)
        finally:
            self.adapters.release(adapter)

    async def score_many(self, requests: list[GenerateRequest], *, temperature: float = 1.0) -> list[list[float]]:
        """Each request's prompt scored under its own adapter: log softmax(logits / temperature) of token t after the
        ones before it, t = 1..T-1, in `requests` order. The prompts run together in batched forwards, each row
        routed to its adapter (scoring.py: a group of rows per forward, between two decode steps).

        Admitted like `complete_many`: waits while the engine is full, RequestError if the batch could never fit
        (or a request is invalid); AdapterNotFound / AdapterError for an adapter. Leaving early (cancellation)
        drops the groups not run yet. Rows under the policy are scored by the version serving when their group
        runs (a swap may land between two groups)."""
        for request in requests:
            self.check(request)
        if not requests:
            return []
        adapters, cost = await self._admit_batch(requests)
        jobs: list[ScoreMany] = []

        def job(reply: Callable[[Any], None]) -> ScoreMany:
            jobs.append(ScoreMany([list(r.prompt_tokens) for r in requests], adapters, temperature, reply))
            return jobs[0]

        try:
            scored = self._post(job)
            return await scored()  # type: ignore[return-value]
        finally:
            if jobs:
                jobs[0].cancelled = True  # read by the engine thread between groups (no effect once replied)
            self._admission.release(len(requests), cost)
            for adapter in adapters:
                self.adapters.release(adapter)  # an uninstall this allows comes after the job in the inbox

    async def swap_adapter(self, arrays: dict[str, mx.array], version: int, *, drain: bool = False) -> AdapterSwapped:
        """Serve `arrays` (evaluated; shared by reference) as adapter `version` from the next decode step on.

        drain=True (sync mode): new requests wait and running rows finish first, so no row mixes two versions.

        Returns once applied. Raises RuntimeError without an adapter, ValueError for an older version, for arrays
        that do not match the model's adapter, or for unevaluated arrays made on another thread (evaluate them
        where they were made: MLX streams are thread-local).
        """
        if self._adapter is None:
            raise RuntimeError("this engine serves a model without LoRA layers: there is no adapter to swap")
        if version < self._promised_version:
            raise ValueError(f"adapter version {version} is older than version {self._promised_version}")
        self._adapter.check(arrays)
        applied = self._post(lambda reply: Swap(arrays=arrays, version=version, reply=reply, drain=drain))
        self._promised_version = version
        return AdapterSwapped(version=version, pause_s=await applied())

    async def _install(self, adapter: Adapter) -> float:
        """Hand a loaded adapter to the engine thread; returns once rows can use it (the decode pause it took)."""
        return await self._post(lambda reply: Install(adapter, reply))()

    async def _replace(self, adapter: Adapter, served: ServedAdapter, version: int) -> float:
        """Have an installed named adapter serve `served` as `version` from the next decode step (the pause)."""
        return await self._post(lambda reply: Replace(adapter, served, version, reply))()

    def _post(self, command: Callable[[Callable[[float | Exception], None]], Any]) -> Callable[[], Awaitable[float]]:
        """Post `command(reply)` to the engine thread now (RuntimeError if the engine has stopped); the returned
        coroutine function waits for the reply: the decode pause it took, or the error it raised there."""
        loop = asyncio.get_running_loop()
        done = anyio.Event()
        result: list[float | Exception] = []

        def reply(outcome: float | Exception) -> None:  # on the engine thread
            result.append(outcome)
            loop.call_soon_threadsafe(done.set)

        if not self._worker.post(command(reply)):
            raise RuntimeError("the engine has stopped")

        async def wait() -> float:
            await done.wait()
            if isinstance(result[0], Exception):
                raise result[0]
            return result[0]

        return wait

    def _uninstall(self, adapter: Adapter) -> None:
        self._worker.post(Uninstall(adapter))  # a stopped engine frees everything anyway

    def stats(self) -> dict[str, float]:
        w = self._worker
        pauses = w.swap_pauses()
        return {
            "queue_depth": float(self._admission.requests),  # requests waiting or running (bounded by max_queue)
            "kv_tokens_admitted": float(self._admission.kv_tokens),  # their n x (prompt + max_tokens)
            "waiting_requests": float(max(self._admission.requests - w.active_requests, 0)),
            "active_requests": float(w.active_requests),
            "active_rows": float(w.active_rows),
            "requests_served": float(w.requests_served),
            "generated_tokens": float(w.generated_tokens),
            "tokens_per_s": w.tokens_per_s,  # decode throughput over the steps of the last 10 s
            "swaps": float(w.swaps),
            "last_swap_pause_s": pauses[-1] if pauses else 0.0,
            "median_swap_pause_s": w.median_pause(),
            "version": float(w.version),
            "swap_waiting": float(w.swap_waiting),  # 1 while a drain swap holds new rows (sync mode)
            "adapters_loaded": float(len(self.adapters.loaded())),  # named adapters served beside the policy
            "adapter_bytes": float(self.adapters.nbytes()),  # ... and the memory their arrays take
            **w.prefix_cache_stats(),
        }

    # --- events from the engine thread ----------------------------------------------------------------------------

    def _deliver_from_thread(self, batch: list[tuple[Handle, list[TokenEvent], bool]]) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._deliver, batch)

    @staticmethod
    def _deliver(batch: list[tuple[Handle, list[TokenEvent], bool]]) -> None:
        for handle, events, finished in batch:
            if finished:
                handle.done = True
            try:
                handle.send.send_nowait(events)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass  # the consumer left; its Cancel is on the way to the worker
            if finished:
                handle.send.close()


async def _flatten(receive: Any) -> AsyncIterator[TokenEvent]:
    async for events in receive:
        for event in events:
            yield event


@dataclass
class RowAccumulator:
    """One row (completion) as its TokenEvents arrive; `completion()` freezes it. The one place where events
    become rows, for the engine's own callers and for the HTTP routes alike."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    finish_reason: str = "abort"  # until the row's last event says otherwise
    adapter: str | None = None  # the adapter that produced the row (every event of a row names the same one)

    def add(self, event: TokenEvent) -> "RowAccumulator":
        self.adapter = event.adapter
        if event.token != NO_TOKEN:  # an "abort" event carries no token
            self.tokens.append(event.token)
            self.logprobs.append(event.logprob)
            self.versions.append(event.version)
            self.top_logprobs.append(list(event.top_logprobs or []))
            self.kept.append(event.kept)
        self.pieces.append(event.text)
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
        return self

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def completion(self, row: int) -> Completion:
        return Completion(
            row=row,
            tokens=self.tokens,
            logprobs=self.logprobs,
            versions=self.versions,
            text=self.text,
            finish_reason=self.finish_reason,
            top_logprobs=self.top_logprobs,
            adapter=self.adapter or "policy",
            kept=self.kept,
        )


async def collect(events: AsyncIterator[TokenEvent], n: int) -> list[Completion]:
    """Collect a request's TokenEvents into one Completion per row (abort markers carry no token). Rows are made
    as their events arrive: `n` is only trusted once the engine has validated the request (at the first event)."""
    rows: dict[int, RowAccumulator] = {}
    async for event in events:
        (rows.get(event.row) or rows.setdefault(event.row, RowAccumulator())).add(event)
    return [rows.get(i, RowAccumulator()).completion(i) for i in range(n)]
