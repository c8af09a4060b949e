"""Per-row token sampling and the log-probabilities every generated token records.

In: one row's (1, vocab) log-softmax at temperature 1 (what mlx-lm's BatchGenerator hands a sampler) and that
row's SamplingParams. Out: the sampled token id, drawn with the row's own PRNG key, so a seeded request samples
the same tokens whatever else shares the batch. `token_logprobs` turns a step's rows back into the numbers the
learner needs, log_softmax(logits / T), in one batched computation.

Filters (filtering.py) follow vLLM's order: temperature, then top-k, top-p and min-p on the tempered distribution. A
filtered
row's recorded log-probs are of the distribution it sampled from: log_softmax(logits / T) renormalised over the
kept set (vLLM's processed log-probs), and each token records the kept set's size `kept` (0: the full
vocabulary), which the learner needs to score it over the same set (sampling-mask replay, learn/logprobs.py). The
kept set of every filter is a prefix of the tokens in descending-logit order, so its size describes it.
"""

from typing import Any

import mlx.core as mx
import numpy as np

from paraloop.engine.filtering import (
    FILTERED_LOGPROB,
    Filters,
    effective_temperature,
    filter_row,
    kept_logsumexp,
    unseeded_seed,
)
from paraloop.messages import SamplingParams


def row_keys(*, n: int, seed: int | None, engine_seed: int, counter: int) -> list[mx.array]:
    """`n` PRNG keys. A request seed fixes the keys of all its rows (row i always gets the same key); without
    one, keys come from the engine seed and a counter the engine advances for every key it makes."""
    if seed is None:
        base = mx.random.key(unseeded_seed(engine_seed, counter))
    else:
        base = mx.random.key(seed % 2**64)
    return list(mx.random.split(base, n)) if n > 1 else [base]


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def filter_logits(logits: mx.array, *, top_k: int, top_p: float, min_p: float) -> mx.array:
    """Set to -inf every logit that top-k, top-p (nucleus) or min-p rules out. `logits` is (rows, vocab)."""
    vocab = logits.shape[-1]
    neg_inf = mx.array(-float("inf"), dtype=logits.dtype)
    if 0 < top_k < vocab:
        kth = mx.sort(logits, axis=-1)[:, vocab - top_k : vocab - top_k + 1]
        logits = mx.where(logits < kth, neg_inf, logits)
    if top_p < 1.0:
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        order = mx.argsort(-logprobs, axis=-1)
        sorted_probs = mx.exp(mx.take_along_axis(logprobs, order, axis=-1))
        # Keep a token when the mass strictly before it is below top_p (the most likely token always survives).
        before = mx.cumsum(sorted_probs, axis=-1) - sorted_probs
        # The first sorted token is kept even when top_p underflows in float32 (a denormal top_p compares as 0).
        keep_sorted = (before < top_p) | (mx.arange(logits.shape[-1]) == 0)
        keep = mx.put_along_axis(mx.zeros(logits.shape, dtype=mx.bool_), order, keep_sorted, axis=-1)
        logits = mx.where(keep, logits, neg_inf)
    if min_p > 0.0:
        # p >= min_p * p_max  <=>  logit >= max logit + log(min_p)
        threshold = mx.max(logits, axis=-1, keepdims=True) + mx.log(mx.array(min_p, dtype=logits.dtype))
        logits = mx.where(logits < threshold, neg_inf, logits)
    return logits


class RowSampler:
    """Samples rows with one setting; holds a PRNG key and splits it once per call.

    Called by BatchGenerator on the engine thread with (rows, vocab) log-softmax; returns (rows,) tokens. A seeded
    row has a sampler of its own (called with its single row); unseeded rows with one setting share one.
    """

    def __init__(self, params: SamplingParams, key: mx.array) -> None:
        self.temperature = effective_temperature(params.temperature)
        self.top_k = params.top_k
        self.top_p = params.top_p
        self.min_p = params.min_p
        self.key = key

    def __call__(self, logprobs: mx.array) -> mx.array:
        if self.temperature == 0:
            return greedy(logprobs)
        self.key, step_key = mx.random.split(self.key)
        logits = logprobs * (1.0 / self.temperature)
        logits = filter_logits(logits, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p)
        return mx.random.categorical(logits, axis=-1, key=step_key)


def token_logprobs(
    logprobs: list[np.ndarray],
    tokens: list[int],
    temperatures: list[float],
    top_k: int,
    filters: list[Filters | None] | None = None,
) -> tuple[list[float], list[list[int]] | None, list[list[float]] | None, list[int]]:
    """log_softmax(logits / T) of each row's token, plus the `top_k` most likely alternatives of the same
    distribution (ids and logprobs, most likely first; None when top_k is 0), plus each row's kept-set size.
    A row with `filters` reports the distribution it sampled from: renormalised over the tokens its filters keep
    (alternatives outside them read FILTERED_LOGPROB), and the kept set's size; others report 0 (full vocabulary).

    `logprobs` are the rows' (vocab,) log-softmax at T = 1, as NumPy views of BatchGenerator's evaluated arrays;
    log_softmax(lp / T) == log_softmax(logits / T). A temperature of 0 (greedy) reports T = 1.
    This runs in NumPy on purpose: an MLX op here would queue on the generation stream behind the next decode step
    (which BatchGenerator has already started with async_eval) and make every step wait for the next one.
    """
    chosen: list[float] = []
    ids: list[list[int]] = []
    vals: list[list[float]] = []
    kept: list[int] = []
    for i, (lp, token, t) in enumerate(zip(logprobs, tokens, temperatures, strict=True)):
        if t in (0.0, 1.0):
            scaled = lp  # already normalised at T = 1
        else:
            z = lp.astype(np.float32) / np.float32(t)
            peak = z.max()
            scaled = z - (peak + np.log(np.exp(z - peak).sum(dtype=np.float64)).astype(np.float32))
        row_filter = filters[i] if filters is not None else None
        keep = None
        if row_filter is not None:
            top_k_, top_p, min_p = row_filter
            keep = filter_row(scaled, top_k=top_k_, top_p=top_p, min_p=min_p)
            scaled = scaled - np.float32(kept_logsumexp(scaled, keep))
        kept.append(int(keep.sum()) if keep is not None else 0)
        chosen.append(float(scaled[token]))
        if top_k > 0:
            top = np.argpartition(-scaled, top_k - 1)[:top_k]
            top = top[np.argsort(-scaled[top], kind="stable")]
            ids.append(top.tolist())
            values = scaled[top].astype(np.float64)
            vals.append((values if keep is None else np.where(keep[top], values, FILTERED_LOGPROB)).tolist())
    if top_k <= 0:
        return chosen, None, None, kept
    return chosen, ids, vals, kept


class GrammarSampler:
    """A constrained row on mlx-lm's path: its logits masked by its grammar before the row's own sampler draws.

    The token drawn stays lazy until the next call (mlx-lm evaluates a step while the next is being built), so the
    grammar consumes it then; that `item()` waits for the previous step, the price of a mask that depends on it.
    """

    def __init__(self, params: SamplingParams, key: mx.array, grammar: Any) -> None:
        self.inner = RowSampler(params, key)
        self.grammar = grammar
        self._drawn: mx.array | None = None

    def __call__(self, logprobs: mx.array) -> mx.array:
        if self._drawn is not None:
            self.grammar.advance(self._drawn.item())
        allowed = mx.array(self.grammar.allowed(logprobs.shape[-1]))
        masked = mx.where(allowed, logprobs, mx.array(-float("inf"), dtype=logprobs.dtype))
        self._drawn = greedy(masked) if self.inner.temperature == 0 else self.inner(masked)
        return self._drawn
