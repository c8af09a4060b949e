"""What the engine accepts: one request's limits (`validate`) and the work it holds at once (`Admission`).

In: GenerateRequests and the [engine] limits. Out: RequestError naming the field (HTTP 400) for a request that could
never run, EngineBusy (HTTP 429) for one that cannot run now. A request's cost is computed from its sizes alone, so
it is checked before anything is built for its rows: n x (prompt + max_tokens) KV-cache tokens, the most its rows
can ever hold. Lives on the event loop (no locks); waiters are woken by every release.
"""

from collections.abc import Sequence

import anyio

from paraloop.config import EngineConfig
from paraloop.engine.filtering import MAX_TEMPERATURE
from paraloop.messages import GenerateRequest, SamplingParams


class EngineBusy(Exception):
    """The engine holds as much work as it may (HTTP 429)."""


class RequestError(ValueError):
    """A request field is invalid (HTTP 400). `field` names it, e.g. "top_p"."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def kv_tokens(request: GenerateRequest) -> int:
    """KV-cache tokens a request may hold at its longest: every row, prompt and completion."""
    return request.n * (len(request.prompt_tokens) + request.params.max_tokens)


def check_sizes(*, n: int, params: SamplingParams, config: EngineConfig, prompt_tokens: int | None = None) -> None:
    """The size limits of a request, each O(1) or O(number of stop strings): callers run this before they
    allocate per row, per token or per prompt token. `prompt_tokens` None: not known yet (not tokenized)."""
    if not 1 <= n <= config.max_n:
        raise RequestError("n", f"must be between 1 and {config.max_n} (engine.max_n), got {n}")
    if not 1 <= params.max_tokens <= config.max_tokens_limit:
        raise RequestError(
            "max_tokens",
            f"must be between 1 and {config.max_tokens_limit} (engine.max_tokens_limit), got {params.max_tokens}",
        )
    if prompt_tokens is not None:
        if prompt_tokens == 0:
            raise RequestError("prompt", "the prompt is empty")
        if prompt_tokens > config.max_prompt_tokens:
            raise RequestError(
                "prompt",
                f"{prompt_tokens} tokens, more than engine.max_prompt_tokens={config.max_prompt_tokens}",
            )
        cost = n * (prompt_tokens + params.max_tokens)
        if cost > config.max_kv_tokens:
            raise RequestError(
                "n" if n > 1 else "max_tokens",
                f"n x (prompt + max_tokens) = {n} x ({prompt_tokens} + {params.max_tokens}) = {cost} KV-cache "
                f"tokens, more than engine.max_kv_tokens={config.max_kv_tokens}",
            )
    if not 0 <= params.top_logprobs <= config.max_top_logprobs:
        raise RequestError(
            "top_logprobs",
            f"must be between 0 and {config.max_top_logprobs} (engine.max_top_logprobs), got {params.top_logprobs}",
        )
    if len(params.stop) > config.max_stop_strings:
        raise RequestError(
            "stop", f"{len(params.stop)} stop strings, more than engine.max_stop_strings={config.max_stop_strings}"
        )
    if any(not s for s in params.stop):
        raise RequestError("stop", "stop strings must not be empty")
    longest = max((len(s) for s in params.stop), default=0)
    if longest > config.max_stop_string_chars:
        raise RequestError(
            "stop",
            f"a stop string of {longest} characters, longer than engine.max_stop_string_chars="
            f"{config.max_stop_string_chars}",
        )
    if len(params.stop_token_ids) > config.max_stop_token_ids:
        raise RequestError(
            "stop_token_ids",
            f"{len(params.stop_token_ids)} ids, more than engine.max_stop_token_ids={config.max_stop_token_ids}",
        )


def validate(request: GenerateRequest, *, config: EngineConfig, vocab: int) -> None:
    """Raise RequestError naming the first invalid field: sizes first, then the values they bound."""
    p = request.params
    check_sizes(n=request.n, params=p, config=config, prompt_tokens=len(request.prompt_tokens))
    bad = [t for t in request.prompt_tokens if not 0 <= t < vocab]
    if bad:
        raise RequestError("prompt", f"token id {_short(bad[0])} is outside the vocabulary [0, {vocab})")
    if not 0 <= p.temperature <= MAX_TEMPERATURE:  # also rejects NaN
        raise RequestError("temperature", f"must be between 0 and {MAX_TEMPERATURE:g}, got {p.temperature}")
    if not 0 < p.top_p <= 1:
        raise RequestError("top_p", f"must be in (0, 1], got {p.top_p}")
    if p.top_k < 0:
        raise RequestError("top_k", f"must be >= 0 (0: off), got {_short(p.top_k)}")
    if not 0 <= p.min_p < 1:
        raise RequestError("min_p", f"must be in [0, 1), got {p.min_p}")
    bad = [t for t in p.stop_token_ids if not 0 <= t < vocab]
    if bad:
        raise RequestError("stop_token_ids", f"token id {_short(bad[0])} is outside the vocabulary [0, {vocab})")
    if p.grammar is not None and p.ignore_eos:
        raise RequestError(
            "ignore_eos",
            "cannot be combined with constrained output (response_format, tool_choice): "
            "a complete answer allows only the end of the sequence",
        )


def _short(value: int) -> str:
    """An int for a message; Python refuses to print ints of more than 4300 digits (and nobody reads them)."""
    return str(value) if abs(value) < 10**30 else f"{'-' if value < 0 else ''}(a {value.bit_length()}-bit integer)"


class Admission:
    """Requests (count) and KV-cache tokens the engine holds, waiting or running, against their bounds.

    HTTP requests are refused when there is no room (`admit`); the engine's own batches (the mock environment's)
    wait for room (`admit_batch`), and while one waits new HTTP requests are refused, so it is not starved.
    """

    def __init__(self, *, max_requests: int, max_kv_tokens: int) -> None:
        self.max_requests = max_requests
        self.max_kv_tokens = max_kv_tokens
        self.requests = 0
        self.kv_tokens = 0
        self._batches_waiting = 0
        self._freed: anyio.Event | None = None  # made on the event loop by the first waiter

    def admit(self, request: GenerateRequest) -> int:
        """Take room for one request now or raise EngineBusy; returns its cost for `release`."""
        cost = kv_tokens(request)
        if self._batches_waiting:
            raise EngineBusy("the engine is finishing its work to admit a rollout batch")
        if self.requests + 1 > self.max_requests:
            raise EngineBusy(f"the engine queue is full ({self.max_requests} requests waiting or running)")
        if self.kv_tokens + cost > self.max_kv_tokens:
            raise EngineBusy(
                f"the engine holds {self.kv_tokens} of engine.max_kv_tokens={self.max_kv_tokens} KV-cache tokens "
                f"and this request needs {cost}"
            )
        self._take(1, cost)
        return cost

    async def admit_batch(self, requests: Sequence[GenerateRequest]) -> int:
        """Wait for room for all of `requests` together; RequestError if they could never fit. Returns the cost."""
        cost = sum(kv_tokens(r) for r in requests)
        if len(requests) > self.max_requests:
            raise RequestError(
                "n",
                f"a batch of {len(requests)} requests, more than server.max_concurrent_requests={self.max_requests}",
            )
        if cost > self.max_kv_tokens:
            raise RequestError(
                "max_tokens",
                f"a batch needing {cost} KV-cache tokens, more than engine.max_kv_tokens={self.max_kv_tokens}",
            )
        self._batches_waiting += 1
        try:
            while self.requests + len(requests) > self.max_requests or self.kv_tokens + cost > self.max_kv_tokens:
                if self._freed is None:
                    self._freed = anyio.Event()
                await self._freed.wait()
        finally:
            self._batches_waiting -= 1
        self._take(len(requests), cost)
        return cost

    def release(self, count: int, cost: int) -> None:
        self.requests -= count
        self.kv_tokens -= cost
        if self._freed is not None:
            self._freed.set()
            self._freed = None

    def _take(self, count: int, cost: int) -> None:
        self.requests += count
        self.kv_tokens += cost
