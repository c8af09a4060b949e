"""The engine thread: one mlx-lm BatchGenerator, continuous batching, adapter swaps between decode steps.

In: commands through a thread-safe inbox (Insert, Cancel, Swap, Install, Replace, Uninstall, Score, ScoreMany, Stop)
from the asyncio side (engine.py).
Out: TokenEvents, handed to `deliver(batch)` once per decode step as [(handle, events, finished)]; `deliver` runs
on this thread and must only schedule work elsewhere. The thread blocks on the inbox while no row is active and
stops on Stop (or when a step raises), ending every unfinished row with finish_reason "abort".

All MLX work happens here: since mlx 0.31.2 streams are thread-local, and the generator's stream is this thread's.

Versions: a swap lands between two `BatchGenerator.next()` calls, and each token is labelled with the version of
the forward pass that sampled it (the call before the one that returns it). The KV entries a row already holds
(its prompt, earlier tokens) stay as the older adapter computed them; the learner recomputes logprobs anyway.

Adapters: every request names its adapter (adapters.Adapter: the policy, the base model, or a named adapter that
Install put at a stack position of the routed LoRA layers, lora_rows.py); each forward pass routes its rows to theirs
(batches.py). A named adapter is freed (Uninstall) only once no row uses it; KV is cached per adapter. Replace gives
an installed named adapter other arrays and version at its position, between two steps, as Swap does the policy's
(`paraloop tinker`'s inflight samplers): its rows' tokens are labelled by the same one-step-late rule.

Shared prefill (sharing.py): a request starts from the longest prefix of its prompt in the prefix cache
(prefix_cache.py, entries of the serving adapter version only); its first row prefills the rest, and its other
rows, and other requests waiting for the same prefix, start from that row's prompt KV once it is computed. On the
CPU backend the decode step samples in NumPy (cpu_decode.py) and the MLP uses a vectorised exp (cpu_kernels.py).

Scoring (scoring.py): a ScoreMany's sequences, each under its own adapter, run in batched routed forwards of up to
scoring.SCORE_TOKENS positions, one such group per loop turn between two decode steps (as mlx-lm runs a prefill
chunk between them): a decode step's forward is one position per row over that row's KV cache, a score group's is
up to CHUNK positions per row from an empty cache, and mlx-lm's models take one rectangular (rows, positions) input,
so the two never share a forward (nor do mlx-lm's own prefill and decode rows).
"""

import itertools
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
from mlx_lm.generate import StopSequences, generation_stream
from mlx_lm.models.cache import make_prompt_cache

from paraloop.config import EngineConfig
from paraloop.engine import cpu_kernels
from paraloop.engine.adapters import Adapter
from paraloop.engine.batches import Routed
from paraloop.engine.cpu_decode import make_generator
from paraloop.engine.filtering import Filters, effective_temperature, row_filters
from paraloop.engine.lora_rows import FIRST_NAMED, RowAdapters, selected
from paraloop.engine.prefill import fork_cache
from paraloop.engine.prefix_cache import BASE_ADAPTER, STATS_OFF, CacheKey, PrefixCache, supports
from paraloop.engine.samplers import RowSamplers, step_logprobs
from paraloop.engine.scoring import prompt_logprobs, score_plan, score_rows
from paraloop.engine.sharing import Leader, waiting_for
from paraloop.engine.text import IncrementalDetokenizer, StopStrings
from paraloop.logits_head import logits_head
from paraloop.lora import AdapterSlots, ServedAdapter
from paraloop.messages import GenerateRequest, TokenEvent

NO_TOKEN = -1  # the token id of an "abort" event, which carries no generated token
RATE_WINDOW_S = 10.0  # decode tokens/s is measured over the steps of the last this-many seconds


@dataclass(eq=False)
class Handle:
    """One admitted request, shared by both sides (the worker keys its state by it)."""

    request: GenerateRequest
    send: Any  # asyncio side: the request's event stream (only touched on the event loop)
    adapter: Adapter  # what its rows use: the policy, the base model or a named adapter (held until it ends)
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
    reply: Callable[[float | Exception], None]  # called on this thread: the pause in seconds, or why it failed
    drain: bool = False  # sync mode: hold new rows, let running rows finish, then swap (no row mixes versions)


@dataclass(eq=False)
class Install:
    adapter: Adapter  # read and checked (adapters.py): its arrays are evaluated
    reply: Callable[[float | Exception], None]  # called on this thread: the pause in seconds, or why it failed


@dataclass(eq=False)
class Replace:
    adapter: Adapter  # installed (adapters.py): it serves `served` as `version` from the next forward pass
    served: ServedAdapter  # evaluated arrays
    version: int
    reply: Callable[[float | Exception], None]  # called on this thread: the pause in seconds, or why it failed


@dataclass(eq=False)
class Score:
    tokens: list[int]  # a prompt: its log-probs under `adapter` (scoring.py)
    adapter: Adapter
    top: int
    reply: Callable[[Any], None]  # called on this thread: the PromptLogprobs, or why it failed
    temperature: float = 1.0  # the logits are divided by it (a distillation teacher's; the API scores at 1)


@dataclass(eq=False)
class ScoreMany:
    """Sequences to score together, each under its adapter: every row's log-probs of tokens 1..T-1 (scoring.py)."""

    sequences: list[list[int]]
    adapters: list[Adapter]  # held by the caller until the reply
    temperature: float
    reply: Callable[[Any], None]  # called on this thread: list[list[float]] in `sequences` order, or why it failed
    cancelled: bool = False  # set by the asyncio side when its caller left: the groups not run yet are dropped
    groups: deque[list[int]] = field(default_factory=deque)  # worker side: the forward groups still to run
    results: list[list[float]] = field(default_factory=list)


@dataclass(eq=False)
class Uninstall:
    adapter: Adapter  # no request holds it any more (its rows' Cancels, if any, came first)


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
    epoch: int  # its adapter's epoch when its oldest KV was made (its cache is reusable only while it is current)
    filters: Filters | None = None  # top-k / top-p / min-p the row samples with (None: the full vocabulary)

    @property
    def adapter(self) -> Adapter:
        return self.handle.adapter

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
        routes: RowAdapters | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.batch_size = batch_size
        self.adapter = adapter
        self.version = version
        self.routes = routes  # the model's routed LoRA layers (None: only the policy is served)
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
        self._numpy = config.decode == "cpu" or (config.decode == "auto" and mx.default_device() == mx.cpu)
        self._samplers = RowSamplers(numpy=self._numpy, engine_seed=config.seed, eos=self.eos_ids)
        self._last_step_version = version
        self._steps = 0  # decode steps taken (Replace's one-step-late labels count them)
        self._window: deque[tuple[float, float, int]] = deque()  # (end time, duration, tokens) per step
        self._window_busy = 0.0
        self._window_tokens = 0
        self._pauses: deque[float] = deque(maxlen=256)  # the most recent swap pauses (for their median)
        self._draining: Swap | None = None  # a drain swap waiting for the running rows to finish
        self._unread: list[Any] = []  # commands taken from the inbox after a Stop
        self._epoch = 0  # advances with every adapter swap: KV made in an older epoch is never reused
        self._prefix: PrefixCache | None = None  # made in main() when enabled and the model's cache kind allows
        self._leaders: dict[int, Leader] = {}  # uid of a prefilling first row -> its request's sharing state
        self._held: dict[Handle, Leader] = {}  # requests waiting for a leader's prompt KV
        self._planned = 0  # rows of started requests not yet inserted (waiting for their leader)
        self._positions: set[int] = set()  # stack positions of the installed named adapters
        self._policy_rows = 0  # rows using the policy (a drain swap waits for these alone)
        self._scoring: deque[ScoreMany] = deque()  # batched scoring jobs, one forward group per loop turn
        self._head: Any = None  # the model's body/head split for scoring (logits_head.py), made on first use
        self._head_known = False

        # Read from other threads (plain values, replaced whole).
        self.requests_served = 0
        self.swaps = 0
        self.generated_tokens = 0
        self.tokens_per_s = 0.0
        self.active_rows = 0
        self.active_requests = 0
        self.score_groups = 0  # scoring groups run (one forward per CHUNK positions each; tests and benches read it)

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
                if self._numpy:
                    cpu_kernels.use_on_this_thread()
                self._prefix = self._make_prefix_cache()
                self.gen = make_generator(
                    Routed(self.model, self._position_of),  # float32 logits, each row routed to its adapter
                    numpy_sampling=self._numpy,
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
            if self._draining is not None and not self._policy_rows:
                swap, self._draining = self._draining, None
                self._swap(swap)
            self._admit()
            if self._scoring:
                self._score_group()
            if self._rows:
                self._step()

    def _idle(self) -> bool:
        return not self._rows and not self._waiting and self._draining is None and not self._scoring

    def _position_of(self, uid: int) -> int:
        position = self._rows[uid].adapter.position
        assert position is not None, "a row's adapter is installed until the row ends"
        return position

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
            if command.drain and self._policy_rows:
                self._draining = command
                return
            self._swap(command)
        elif isinstance(command, Install):
            self._install(command)
        elif isinstance(command, Replace):
            self._replace(command)
        elif isinstance(command, Uninstall):
            command.adapter.dropping = True
            self._free(command.adapter)
        elif isinstance(command, Score):
            self._score(command)
        elif isinstance(command, ScoreMany):
            command.groups.extend(score_plan([len(s) for s in command.sequences]))
            command.results = [[] for _ in command.sequences]
            self._scoring.append(command)
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
        self._epoch += 1
        if self._prefix is not None:
            self._prefix.retire(BASE_ADAPTER)  # O(1): the older trees become unreachable now ...
        pause = time.perf_counter() - start
        self._pauses.append(pause)
        self.swaps += 1
        command.reply(pause)
        if self._prefix is not None:
            self._prefix.release_retired()  # ... and are freed after the pause

    def _score(self, command: Score) -> None:
        """A prompt's log-probs, between two decode steps, under the adapter the request holds."""
        position = command.adapter.position
        assert position is not None, "a held adapter is installed"
        try:
            with selected([position]):  # the generator's model: float32 logits, routed LoRA layers
                result = prompt_logprobs(
                    self.gen.model, command.tokens, top=command.top, temperature=command.temperature
                )
        except Exception as e:  # reported to the request; the engine goes on
            command.reply(e)
            return
        command.reply(result)

    def _score_group(self) -> None:
        """One forward group of the oldest scoring job (its rows' adapters routed per row); the reply once the
        job's last group is done. A job whose caller left is dropped."""
        job = self._scoring[0]
        if job.cancelled:
            self._scoring.popleft()
            return
        if not self._head_known:
            self._head, self._head_known = logits_head(self.model), True
        rows = job.groups.popleft()
        try:
            positions = [job.adapters[i].position for i in rows]
            assert None not in positions, "a held adapter is installed"
            scored = score_rows(
                self.model,
                self._head,
                [job.sequences[i] for i in rows],
                temperature=job.temperature,
                adapters=positions,  # type: ignore[arg-type]
            )
        except Exception as e:  # reported to the caller; the engine goes on
            self._scoring.popleft()
            job.reply(e)
            return
        self.score_groups += 1
        for i, values in zip(rows, scored, strict=True):
            job.results[i] = values
        if not job.groups:
            self._scoring.popleft()
            job.reply(job.results)

    # --- named adapters ----------------------------------------------------------------------------------------------

    def _install(self, command: Install) -> None:
        """Give a loaded adapter the lowest free stack position; rows may use it from the next forward pass."""
        start = time.perf_counter()
        adapter = command.adapter
        if self.routes is None or adapter.served is None:
            command.reply(RuntimeError(f"adapter {adapter.name!r} cannot be installed in this engine"))
            return
        position = next(p for p in itertools.count(FIRST_NAMED) if p not in self._positions)
        self.routes.install(position, adapter.served.arrays, adapter.served.scale)
        self._positions.add(position)
        adapter.position = position
        command.reply(time.perf_counter() - start)

    def _replace(self, command: Replace) -> None:
        """Serve other arrays at an installed adapter's position from the next forward pass on."""
        start = time.perf_counter()
        adapter = command.adapter
        if self.routes is None or adapter.position is None:
            command.reply(RuntimeError(f"adapter {adapter.name!r} is not installed"))
            return
        try:
            mx.eval([x for pair in command.served.arrays.values() for x in pair])  # as _swap: refuse lazy arrays
        except RuntimeError as e:
            command.reply(ValueError(f"adapter {adapter.name!r} version {command.version} was not applied: {e}"))
            return
        self.routes.remove(adapter.position)
        self.routes.install(adapter.position, command.served.arrays, command.served.scale)
        adapter.previous_version, adapter.version = adapter.version, command.version
        adapter.replaced_at = self._steps + 1
        adapter.epoch += 1
        if self._prefix is not None:
            self._prefix.retire(adapter.identity)
        pause = time.perf_counter() - start
        self._pauses.append(pause)
        command.reply(pause)
        if self._prefix is not None:
            self._prefix.release_retired()

    def _label(self, adapter: Adapter) -> int:
        """The version of the tokens a named adapter's rows get from the step now running (one step late)."""
        return adapter.version if self._steps > adapter.replaced_at else adapter.previous_version

    def _free(self, adapter: Adapter) -> None:
        """Free an unloaded adapter once no row uses it (its requests ended: normally at once)."""
        if not adapter.dropping or adapter.rows or adapter.position is None or self.routes is None:
            return
        self.routes.remove(adapter.position)
        self._positions.discard(adapter.position)
        adapter.position = None
        if self._prefix is not None:
            self._prefix.retire(adapter.identity)
            self._prefix.release_retired()

    def _ended(self, uid: int) -> Row:
        """Forget a row that finished or was removed from the generator."""
        row = self._rows.pop(uid)
        row.adapter.rows -= 1
        self._policy_rows -= row.adapter.policy
        if row.adapter.dropping:
            self._free(row.adapter)
        return row

    def _cancel(self, handle: Handle) -> None:
        if handle in self._waiting:
            self._waiting.remove(handle)
            return
        if handle in self._held:
            self._held.pop(handle).held.remove(handle)
            return
        uids = self._uids.pop(handle, [])
        running = [u for u in uids if u in self._rows]
        if running:
            self.gen.remove(running)
            for uid in running:
                self._ended(uid)
        for uid in uids:
            self._drop_leader(uid)
        self._left.pop(handle, None)
        self._count_active()

    def _admit(self) -> None:
        # A request joins while the batch has room; its extra rows wait inside the generator's own queue.
        # While a drain swap waits, new requests wait too: they will start on the new version.
        while self._draining is None and self._waiting and len(self._rows) + self._planned < self.batch_size:
            self._start(self._waiting.popleft())
        self._count_active()

    # --- shared prefill -----------------------------------------------------------------------------------------

    def _make_prefix_cache(self) -> PrefixCache | None:
        if self.config.prefix_cache_mb <= 0 or not supports(make_prompt_cache(self.model)):
            return None
        return PrefixCache(max_bytes=self.config.prefix_cache_mb * 2**20)

    def _key(self, adapter: Adapter) -> CacheKey:
        """The prefix cache's key for KV computed under `adapter` now."""
        return (adapter.identity, self.version if adapter.policy else adapter.version)

    def _epoch_of(self, adapter: Adapter) -> int:
        """The policy changes in place by Swap, a named adapter by Replace: KV of an older epoch is stale."""
        return self._epoch if adapter.policy else adapter.epoch

    def _current(self, adapter: Adapter, epoch: int) -> bool:
        """KV made under `adapter` in `epoch` still serves it (a freed named adapter's never does)."""
        if adapter.kind == "lora" and adapter.position is None:
            return False
        return epoch == self._epoch_of(adapter)

    def _start(self, handle: Handle) -> None:
        """Start a request from the longest cached prefix of its prompt: all rows at once when nothing is left to
        prefill, else its first row (a Leader) now and the others once that row's prompt KV exists. A request
        whose prompt shares much with a leader's still prefilling waits for it (held) instead of computing the
        same KV again."""
        request, adapter = handle.request, handle.adapter
        prompt, n = request.prompt_tokens, request.n
        head = prompt[:-1]  # the last prompt token is the first decode step's input
        cached, cache = 0, None
        epoch = self._epoch_of(adapter)
        if self._prefix is not None and head:
            match = self._prefix.lookup(self._key(adapter), head)
            leader = waiting_for(list(self._leaders.values()), head, match.length, adapter=adapter, epoch=epoch)
            if leader is not None:
                leader.held.append(handle)
                self._held[handle] = leader
                return
            self._prefix.record(prompt_tokens=len(head), cached_tokens=match.length)
            cached, cache = match.length, PrefixCache.kv(match) or None
        samplers = self._samplers(request.params, n)
        if cached == len(head):
            self._insert_rows(handle, list(range(n)), samplers, cache, start=cached, epoch=epoch)
            return
        (uid,) = self._insert_rows(handle, [0], samplers, cache, start=cached, epoch=epoch)
        if n > 1 or self._prefix is not None:
            self._leaders[uid] = Leader(handle, head, adapter, epoch, list(range(1, n)), samplers)
            self._planned += n - 1

    def _prefilled(self, uid: int) -> None:
        """A leader's prompt is in its KV cache: cache it, start its request's other rows and re-admit the
        requests held for it (first in line, in their order)."""
        leader = self._leaders.pop(uid, None)
        if leader is None:
            return
        cache, tokens = self.gen.extract_cache([uid])[uid]
        tokens = list(tokens)
        if self._prefix is not None and self._current(leader.adapter, leader.epoch):
            self._prefix.insert(self._key(leader.adapter), tokens, cache)
        if leader.rows:
            self._planned -= len(leader.rows)
            self._insert_rows(leader.handle, leader.rows, leader.samplers, cache, start=len(tokens), epoch=leader.epoch)
        self._release(leader)

    def _drop_leader(self, uid: int) -> None:
        leader = self._leaders.pop(uid, None)
        if leader is not None:
            self._planned -= len(leader.rows)
            self._release(leader)

    def _release(self, leader: Leader) -> None:
        for handle in reversed(leader.held):
            del self._held[handle]
            self._waiting.appendleft(handle)
        leader.held.clear()

    def _store(self, row: Row, cache: list[Any] | None, tokens: list[int] | None) -> None:
        """Keep a finished row's KV (prompt + completion) for the next turn of its conversation."""
        if self._prefix is not None and cache and tokens and self._current(row.adapter, row.epoch):
            self._prefix.insert(self._key(row.adapter), list(tokens), cache)

    def _insert_rows(
        self, handle: Handle, rows: list[int], samplers: list[Any], cache: list[Any] | None, *, start: int, epoch: int
    ) -> list[int]:
        """Insert `rows` of a request into the generator, each from its own copy of `cache` (the KV of the
        prompt's first `start` tokens; None when start is 0); returns their uids."""
        request, params = handle.request, handle.request.params
        prompt = request.prompt_tokens
        stop_ids = [] if params.ignore_eos else list(self.eos_ids)
        stop_ids += [t for t in params.stop_token_ids if t not in stop_ids]
        stop_sequences = StopSequences([[t] for t in stop_ids] or None)
        k = len(rows)
        uids = self.gen.insert(
            [prompt[start:]] * k,
            max_tokens=[params.max_tokens] * k,
            caches=[fork_cache(cache) for _ in rows] if cache else None,
            all_tokens=[list(prompt[:start]) for _ in rows],  # one list per row: the generator appends to it
            samplers=[samplers[i] for i in rows],
            stop_sequences=[stop_sequences] * k,
        )
        for index, uid in zip(rows, uids, strict=True):
            self._rows[uid] = Row(
                handle=handle,
                index=index,
                temperature=effective_temperature(params.temperature),
                top_logprobs=params.top_logprobs,
                detok=IncrementalDetokenizer(self.tokenizer, prompt),
                stops=StopStrings(params.stop),
                epoch=epoch,
                filters=row_filters(params),
            )
        handle.adapter.rows += k
        self._policy_rows += k * handle.adapter.policy
        self._uids.setdefault(handle, []).extend(uids)
        self._left.setdefault(handle, request.n)
        return uids

    def _step(self) -> None:
        start = time.perf_counter()
        self._steps += 1
        version = self.version
        prompt_responses, responses = self.gen.next()
        for p in prompt_responses:
            if p.end_of_segment and not p.end_of_prompt:  # a leader's prompt (all but its last token) is done
                self._prefilled(p.uid)
        # BatchGenerator returns each token one call late (it samples step k+1 while step k is read back), so
        # every token returned now came from the forward pass issued during the previous call.
        produced_by, self._last_step_version = self._last_step_version, version
        if responses:
            self._emit(responses, produced_by)
            self._measure(start, len(responses))

    def _emit(self, responses: list[Any], version: int) -> None:
        rows = [self._rows[r.uid] for r in responses]
        chosen_l, tops, kept = step_logprobs(
            responses, [r.temperature for r in rows], [r.top_logprobs for r in rows], [r.filters for r in rows]
        )

        out: dict[Handle, Pending] = {}
        stopped_by_text: dict[int, Row] = {}
        for i, (response, row) in enumerate(zip(responses, rows, strict=True)):
            finish = response.finish_reason
            if finish == "stop":  # an EOS or stop token: kept in tokens and logprobs, never in the text
                text = row.text_at_end()
            else:
                text = row.stops.feed(row.detok.add(response.token))
                if row.stops.stopped:
                    finish = "stop"
                    stopped_by_text[response.uid] = row
                elif finish == "length":
                    text += row.text_at_end()
            top = tops[i][: row.top_logprobs] if row.top_logprobs and tops[i] is not None else None
            pending = out.get(row.handle) or out.setdefault(row.handle, Pending(self._left[row.handle]))
            adapter = row.adapter
            pending.events.append(
                TokenEvent(
                    row=row.index,
                    token=response.token,
                    logprob=chosen_l[i],
                    version=version if adapter.policy else self._label(adapter),
                    text=text,
                    finish_reason=finish,
                    top_logprobs=top,
                    adapter=adapter.name,
                    kept=kept[i],
                )
            )
            if finish is not None:
                self._ended(response.uid)
                pending.rows_left -= 1
                self._store(row, response.prompt_cache, response.all_tokens)
        if stopped_by_text:
            kept = self.gen.remove(list(stopped_by_text), return_prompt_caches=self._prefix is not None)
            for uid, (cache, tokens) in kept.items():
                self._store(stopped_by_text[uid], cache, tokens)
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
        by_handle: dict[Handle, list[TokenEvent]] = {}
        for row in self._rows.values():
            by_handle.setdefault(row.handle, []).append(self._abort_event(row.handle, row.index, row.text_at_end()))
        for uid in list(self._rows):
            self._ended(uid)
        if self._draining is not None:
            self._draining.reply(RuntimeError("the engine stopped before the adapter swap was applied"))
            self._draining = None
        for leader in self._leaders.values():  # rows waiting for their leader's prompt
            by_handle.setdefault(leader.handle, []).extend(self._abort_event(leader.handle, i) for i in leader.rows)
        self._leaders.clear()
        self._planned = 0
        self._waiting.extend(self._held)
        self._held.clear()
        waiting = list(self._waiting)
        for command in [*self._unread, *self._take(block=False)]:
            if isinstance(command, Insert):
                waiting.extend(command.handles)
            elif isinstance(command, Cancel) and command.handle in waiting:
                waiting.remove(command.handle)
            elif isinstance(command, Swap):
                command.reply(RuntimeError("the engine stopped before the adapter swap was applied"))
            elif isinstance(command, Install):
                command.reply(RuntimeError(f"the engine stopped before adapter {command.adapter.name!r} was loaded"))
            elif isinstance(command, Replace):
                command.reply(RuntimeError(f"the engine stopped before adapter {command.adapter.name!r} was replaced"))
            elif isinstance(command, (Score, ScoreMany)):
                command.reply(RuntimeError("the engine stopped before the prompt was scored"))
        while self._scoring:
            self._scoring.popleft().reply(RuntimeError("the engine stopped before the sequences were scored"))
        for handle in waiting:
            by_handle[handle] = [self._abort_event(handle, i) for i in range(handle.request.n)]
        self._waiting.clear()
        batch = [(handle, events, True) for handle, events in by_handle.items()]
        self._left.clear()
        self._uids.clear()
        self._count_active()
        if batch:
            self.deliver(batch)

    def _abort_event(self, handle: Handle, row: int, text: str = "") -> TokenEvent:
        adapter = handle.adapter
        version = self.version if adapter.policy else self._label(adapter)
        return TokenEvent(
            row=row,
            token=NO_TOKEN,
            logprob=0.0,
            version=version,
            text=text,
            finish_reason="abort",
            adapter=adapter.name,
        )

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

    def prefix_cache_stats(self) -> dict[str, float]:
        """Hit rate, tokens saved and memory of the prefix cache (zeros while it is off)."""
        return dict(STATS_OFF) if self._prefix is None else self._prefix.stats()

    def median_pause(self) -> float:
        pauses = self.swap_pauses()
        return statistics.median(pauses) if pauses else 0.0
