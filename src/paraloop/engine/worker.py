"""The engine thread: one mlx-lm BatchGenerator, continuous batching, adapter swaps between decode steps.

In: commands through a thread-safe inbox (Insert, Cancel, Swap, Stop) from the asyncio side (engine.py).
Out: TokenEvents, handed to `deliver(batch)` once per decode step as [(handle, events, finished)]; `deliver` runs
on this thread and must only schedule work elsewhere. The thread blocks on the inbox while no row is active and
stops on Stop (or when a step raises), ending every unfinished row with finish_reason "abort".

All MLX work happens here: since mlx 0.31.2 streams are thread-local, and the generator's stream is this thread's.

Versions: a swap lands between two `BatchGenerator.next()` calls, and each token is labelled with the version of
the forward pass that sampled it (the call before the one that returns it). The KV entries a row already holds
(its prompt, earlier tokens) stay as the older adapter computed them; the learner recomputes logprobs anyway.
"""

import queue
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.generate import BatchGenerator, StopSequences, generation_stream

from paraloop.config import EngineConfig
from paraloop.engine.prefill import fork_cache, prefill
from paraloop.engine.sampling import RowSampler, effective_temperature, greedy, row_keys, token_logprobs
from paraloop.engine.text import IncrementalDetokenizer, StopStrings
from paraloop.lora import AdapterSlots
from paraloop.messages import GenerateRequest, SamplingParams, TokenEvent
from paraloop.model import Float32Logits

NO_TOKEN = -1  # the token id of an "abort" event, which carries no generated token
MAX_SHARED_SAMPLERS = 64  # distinct unseeded sampling settings kept for sharing
RATE_WINDOW_S = 10.0  # decode tokens/s is measured over the steps of the last this-many seconds


@dataclass(eq=False)
class Handle:
    """One admitted request, shared by both sides (the worker keys its state by it)."""

    request: GenerateRequest
    send: Any  # asyncio side: the request's event stream (only touched on the event loop)
    done: bool = False  # asyncio side: the last event was delivered


@dataclass(eq=False)
class Insert:
    handles: tuple[Handle, ...]  # several: admitted in the same decode step (a deterministic batch composition)


@dataclass(eq=False)
class Cancel:
    handle: Handle


@dataclass(eq=False)
class Swap:
    arrays: dict[str, mx.array]
    version: int
    reply: Callable[
        [float | Exception], None
    ]  # called on this thread: the pause in seconds, or why it failed
    drain: bool = False  # sync mode: hold new rows, let running rows finish, then swap (no row mixes versions)


class Stop:
    pass


@dataclass(eq=False)
class Row:
    """Engine-thread state of one completion."""

    handle: Handle
    index: int
    temperature: float
    top_logprobs: int
    detok: IncrementalDetokenizer
    stops: StopStrings

    def text_at_end(self) -> str:
        """Pending text once the row ends other than by a stop string (held-back text was not a stop string)."""
        text = self.stops.feed(self.detok.flush())
        return text if self.stops.stopped else text + self.stops.flush()


@dataclass(eq=False)
class Pending:
    rows_left: int
    events: list[TokenEvent] = field(default_factory=list)


class Worker:
    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        config: EngineConfig,
        batch_size: int,
        adapter: AdapterSlots | None,
        version: int,
        deliver: Callable[[list[tuple[Handle, list[TokenEvent], bool]]], None],
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.batch_size = batch_size
        self.adapter = adapter
        self.version = version
        self.deliver = deliver
        self.eos_ids = sorted(tokenizer.eos_token_ids)
        self.error: BaseException | None = None

        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()  # orders `post` against closing, so no command is left unread
        self._waiting: deque[Handle] = deque()
        self._rows: dict[int, Row] = {}  # BatchGenerator uid -> row
        self._uids: dict[Handle, list[int]] = {}
        self._left: dict[Handle, int] = {}  # rows not finished yet, per request
        self._keys_made = 0
        self._shared: dict[tuple[float, float, int, float], RowSampler] = {}
        self._last_step_version = version
        self._window: deque[tuple[float, float, int]] = deque()  # (end time, duration, tokens) per step
        self._window_busy = 0.0
        self._window_tokens = 0
        self._pauses: deque[float] = deque(maxlen=256)  # the most recent swap pauses (for their median)
        self._draining: Swap | None = None  # a drain swap waiting for the running rows to finish
        self._unread: list[Any] = []  # commands taken from the inbox after a Stop

        # Read from other threads (plain values, replaced whole).
        self.requests_served = 0
        self.swaps = 0
        self.generated_tokens = 0
        self.tokens_per_s = 0.0
        self.active_rows = 0
        self.active_requests = 0

    # --- called from the asyncio side ---------------------------------------------------------------------------

    def post(self, command: Any) -> bool:
        """Queue a command; False once the worker has stopped (the command will never run)."""
        with self._lock:
            if self._closed:
                return False
            self._inbox.put(command)
            return True

    def swap_pauses(self) -> list[float]:
        return list(self._pauses)

    @property
    def swap_waiting(self) -> bool:
        """A drain swap is holding new rows until the running ones finish."""
        return self._draining is not None

    # --- the thread ---------------------------------------------------------------------------------------------

    def main(self, on_ready: Callable[[], None]) -> None:
        try:
            with mx.stream(generation_stream):
                self.gen = BatchGenerator(
                    Float32Logits(self.model),  # a bfloat16 model's logits would not reach NumPy
                    completion_batch_size=self.batch_size,
                    prefill_batch_size=min(self.config.prefill_batch_size, self.batch_size),
                    prefill_step_size=self.config.prefill_step_size,
                )
                on_ready()
                self._loop()
        except BaseException as e:  # reported by Engine.run; the rows end with "abort" below
            self.error = e
        finally:
            with self._lock:
                self._closed = True
            self._abort_all()
            gen = getattr(self, "gen", None)
            if gen is not None:
                gen.close()
                # Let the last asynchronously evaluated step finish before this thread (and its stream) ends.
                mx.synchronize(gen.stream)
            # A thread's MLX streams must be destroyed by the thread itself before the process exits, or MLX's own
            # late cleanup can abort it ("terminate called without an active exception", ml-explore/mlx#3126).
            mx.clear_streams()

    def _loop(self) -> None:
        while True:
            # Sleep on the inbox only with nothing to do: a drain swap whose rows just finished is work too (left
            # parked while the loop slept, it would wait for a command that may never come).
            commands = self._take(block=self._idle())
            for i, command in enumerate(commands):
                if isinstance(command, Stop):
                    self._unread = commands[i + 1 :]  # taken with the Stop: answered by _abort_all
                    return
                self._apply(command)
            if self._draining is not None and not self._rows:
                swap, self._draining = self._draining, None
                self._swap(swap)
            self._admit()
            if self._rows:
                self._step()

    def _idle(self) -> bool:
        return not self._rows and not self._waiting and self._draining is None

    def _take(self, *, block: bool) -> list[Any]:
        commands = [self._inbox.get()] if block else []  # idle: sleep until a command arrives
        while True:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, command: Any) -> None:
        if isinstance(command, Insert):
            self._waiting.extend(command.handles)
        elif isinstance(command, Cancel):
            self._cancel(command.handle)
        elif isinstance(command, Swap):
            if self._draining is not None:  # a newer version supersedes the one still draining
                self._draining.reply(self._draining_superseded(command.version))
                self._draining = None
            if command.drain and self._rows:
                self._draining = command
                return
            self._swap(command)
        else:
            raise TypeError(f"unknown engine command {command!r}")

    @staticmethod
    def _draining_superseded(version: int) -> Exception:
        return ValueError(f"superseded by adapter version {version} before the running rows finished")

    def _swap(self, command: Swap) -> None:
        start = time.perf_counter()
        assert self.adapter is not None  # Engine.swap_adapter refuses otherwise
        try:
            # A no-op for evaluated arrays. Lazy ones built on another thread cannot be evaluated here (MLX
            # streams are thread-local): refuse them now rather than fail in the middle of a decode step.
            mx.eval(list(command.arrays.values()))
        except RuntimeError as e:
            command.reply(ValueError(f"adapter version {command.version} was not applied: {e}"))
            return
        self.adapter.swap(command.arrays)
        self.version = command.version
        pause = time.perf_counter() - start
        self._pauses.append(pause)
        self.swaps += 1
        command.reply(pause)

    def _cancel(self, handle: Handle) -> None:
        if handle in self._waiting:
            self._waiting.remove(handle)
            return
        uids = [u for u in self._uids.pop(handle, []) if u in self._rows]
        if uids:
            self.gen.remove(uids)
            for uid in uids:
                del self._rows[uid]
        self._left.pop(handle, None)
        self._count_active()

    def _admit(self) -> None:
        # A request joins while the batch has room; its extra rows wait inside the generator's own queue.
        # While a drain swap waits, new requests wait too: they will start on the new version.
        while self._draining is None and self._waiting and len(self._rows) < self.batch_size:
            self._insert(self._waiting.popleft())
        self._count_active()

    def _insert(self, handle: Handle) -> None:
        request, params = handle.request, handle.request.params
        prompt, n = request.prompt_tokens, request.n
        stop_ids = [] if params.ignore_eos else list(self.eos_ids)
        stop_ids += [t for t in params.stop_token_ids if t not in stop_ids]
        stop_sequences = StopSequences([[t] for t in stop_ids] or None)
        if n > 1 and len(prompt) > 1:
            # Prefill the prompt once; each row decodes from its own copy of the cache.
            cache = prefill(self.model, prompt[:-1], step=self.config.prefill_step_size)
            prompts, caches = [prompt[-1:]] * n, [fork_cache(cache) for _ in range(n)]
        else:
            prompts, caches = [prompt] * n, None
        samplers = self._samplers(params, n)
        uids = self.gen.insert(
            prompts,
            max_tokens=[params.max_tokens] * n,
            caches=caches,
            samplers=samplers,
            stop_sequences=[stop_sequences] * n,
        )
        for index, uid in enumerate(uids):
            self._rows[uid] = Row(
                handle=handle,
                index=index,
                temperature=effective_temperature(params.temperature),
                top_logprobs=params.top_logprobs,
                detok=IncrementalDetokenizer(self.tokenizer, prompt),
                stops=StopStrings(params.stop),
            )
        self._uids[handle] = uids
        self._left[handle] = n

    def _samplers(self, params: SamplingParams, n: int) -> list[Any]:
        """One sampler per row. Greedy rows, and rows without a seed that sample alike, share one object:
        when every row of the batch shares it, BatchGenerator samples the batch in one call instead of one per
        row. Seeded rows get their own key, so their samples do not depend on what else is in the batch."""
        if effective_temperature(params.temperature) == 0:
            return [greedy] * n
        if params.seed is not None:
            return [
                RowSampler(params, key) for key in row_keys(n=n, seed=params.seed, engine_seed=0, counter=0)
            ]
        setting = (params.temperature, params.top_p, params.top_k, params.min_p)
        if setting not in self._shared:
            if len(self._shared) >= MAX_SHARED_SAMPLERS:
                self._shared.clear()  # rows already inserted keep theirs; new rows get fresh ones
            key = row_keys(n=1, seed=None, engine_seed=self.config.seed, counter=self._keys_made)[0]
            self._keys_made += 1
            self._shared[setting] = RowSampler(params, key)
        return [self._shared[setting]] * n

    def _step(self) -> None:
        start = time.perf_counter()
        version = self.version
        _, responses = self.gen.next()
        # BatchGenerator returns each token one call late (it samples step k+1 while step k is read back), so
        # every token returned now came from the forward pass issued during the previous call.
        produced_by, self._last_step_version = self._last_step_version, version
        if responses:
            self._emit(responses, produced_by)
            self._measure(start, len(responses))

    def _emit(self, responses: list[Any], version: int) -> None:
        rows = [self._rows[r.uid] for r in responses]
        tokens = [r.token for r in responses]
        top_k = max(row.top_logprobs for row in rows)
        # NumPy views of the evaluated rows: no MLX op may queue behind the decode step already in flight.
        chosen_l, ids_l, vals_l = token_logprobs(
            [np.asarray(r.logprobs) for r in responses], tokens, [row.temperature for row in rows], top_k
        )

        out: dict[Handle, Pending] = {}
        stopped_by_text = []
        for i, (response, row) in enumerate(zip(responses, rows, strict=True)):
            finish = response.finish_reason
            if finish == "stop":  # an EOS or stop token: kept in tokens and logprobs, never in the text
                text = row.text_at_end()
            else:
                text = row.stops.feed(row.detok.add(response.token))
                if row.stops.stopped:
                    finish = "stop"
                    stopped_by_text.append(response.uid)
                elif finish == "length":
                    text += row.text_at_end()
            top = None
            if row.top_logprobs and ids_l is not None and vals_l is not None:
                top = list(zip(ids_l[i][: row.top_logprobs], vals_l[i][: row.top_logprobs], strict=True))
            pending = out.get(row.handle) or out.setdefault(row.handle, Pending(self._left[row.handle]))
            pending.events.append(
                TokenEvent(
                    row=row.index,
                    token=response.token,
                    logprob=chosen_l[i],
                    version=version,
                    text=text,
                    finish_reason=finish,
                    top_logprobs=top,
                )
            )
            if finish is not None:
                del self._rows[response.uid]
                pending.rows_left -= 1
        if stopped_by_text:
            self.gen.remove(stopped_by_text)
        self.generated_tokens += len(responses)
        batch = [(handle, p.events, self._settle(handle, p.rows_left)) for handle, p in out.items()]
        self._count_active()
        self.deliver(batch)

    def _settle(self, handle: Handle, rows_left: int) -> bool:
        """Record how many rows of `handle` remain; True when none do."""
        if rows_left:
            self._left[handle] = rows_left
            return False
        del self._left[handle]
        del self._uids[handle]
        self.requests_served += 1
        return True

    def _abort_all(self) -> None:
        """End every request still known to the worker (and any left in the inbox) with "abort" events."""
        batch = []
        by_handle: dict[Handle, list[TokenEvent]] = {}
        for row in self._rows.values():
            event = TokenEvent(
                row=row.index,
                token=NO_TOKEN,
                logprob=0.0,
                version=self.version,
                text=row.text_at_end(),
                finish_reason="abort",
            )
            by_handle.setdefault(row.handle, []).append(event)
        self._rows.clear()
        if self._draining is not None:
            self._draining.reply(RuntimeError("the engine stopped before the adapter swap was applied"))
            self._draining = None
        waiting = list(self._waiting)
        for command in [*self._unread, *self._take(block=False)]:
            if isinstance(command, Insert):
                waiting.extend(command.handles)
            elif isinstance(command, Cancel) and command.handle in waiting:
                waiting.remove(command.handle)
            elif isinstance(command, Swap):
                command.reply(RuntimeError("the engine stopped before the adapter swap was applied"))
        for handle in waiting:
            by_handle[handle] = [
                TokenEvent(
                    row=i, token=NO_TOKEN, logprob=0.0, version=self.version, text="", finish_reason="abort"
                )
                for i in range(handle.request.n)
            ]
        self._waiting.clear()
        for handle, events in by_handle.items():
            batch.append((handle, events, True))
        self._left.clear()
        self._uids.clear()
        self._count_active()
        if batch:
            self.deliver(batch)

    # --- statistics ---------------------------------------------------------------------------------------------

    def _count_active(self) -> None:
        self.active_rows = len(self._rows)
        self.active_requests = len(self._left)

    def _measure(self, start: float, tokens: int) -> None:
        end = time.perf_counter()
        self._window.append((end, end - start, tokens))
        self._window_busy += end - start
        self._window_tokens += tokens
        while self._window and self._window[0][0] < end - RATE_WINDOW_S:
            _, busy, count = self._window.popleft()
            self._window_busy -= busy
            self._window_tokens -= count
        self.tokens_per_s = self._window_tokens / self._window_busy if self._window_busy > 0 else 0.0

    def median_pause(self) -> float:
        pauses = self.swap_pauses()
        return statistics.median(pauses) if pauses else 0.0
