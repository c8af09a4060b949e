"""The decode step on the CPU backend: mlx-lm's BatchGenerator, with sampling and log-probs done in NumPy.

Why: MLX's CPU kernels compute exp, log and the random bits of `categorical` one element at a time, while NumPy's
are vectorised. For a batch of 32 rows over SmolLM2's 49,152-token vocabulary, mlx-lm's log_softmax + categorical
cost as much as a fifth of the whole step; the same work in NumPy costs a few milliseconds (docs/benchmarks.md).
(mx.compile does not change that: it fuses elementwise ops into one loop, but the exp, log and random bits in it
stay MLX's element-at-a-time functions, and the log-sum-exp reduction is not fused at all.)
So on the CPU a decode step evaluates the logits and samples every row here: one vectorised exp pass over the
batch gives every row's log-normaliser (the log-probs the learner needs) and its sampling weights. Metal and CUDA
keep mlx-lm's lazy, pipelined path (`engine.decode = "mlx-lm"`); cpu_kernels.py speeds up the forward itself.

In: the (rows, vocab) float32 logits of one step and one NumpySampler per row. Out: each row's next token and a
RowLogprobs (its log-prob under log_softmax(logits / T) and the top alternatives), which the BatchGenerator hands
back as the `logprobs` of that token's Response. A seeded row draws from its own PRNG, so it samples the same
tokens whatever else shares the batch. Runs on the engine thread.
"""

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.generate import BatchGenerator

from paraloop.engine.batches import (
    RoutedGenerationBatch,
    RoutedPromptBatch,
    fit_cache_growth,
    generation_left,
    routed,
)
from paraloop.engine.filtering import FILTERED_LOGPROB, effective_temperature, filter_row, unseeded_seed
from paraloop.messages import SamplingParams

_BLOCK = 1024  # tokens per block of the two-level inverse-CDF draw


@dataclass(frozen=True, slots=True)
class RowLogprobs:
    """What a row records for one sampled token: its log-prob and the `top` most likely alternatives (of the
    distribution it sampled from), and the size of the kept set it was sampled from (0: the full vocabulary)."""

    chosen: float
    top: list[tuple[int, float]] | None = None
    kept: int = 0


class NumpySampler:
    """One row's (or, unseeded, a setting's) sampling parameters and PRNG, for `sample_rows`."""

    def __init__(self, params: SamplingParams, rng: np.random.Generator, grammar: Any = None) -> None:
        self.grammar = grammar  # engine/grammar.RowGrammar: the row samples only what it allows
        self.temperature = effective_temperature(params.temperature)  # under GREEDY_BELOW: greedy
        self.top_k, self.top_p, self.min_p = params.top_k, params.top_p, params.min_p
        self.top_logprobs = params.top_logprobs
        self.filtered = params.top_k > 0 or params.top_p < 1.0 or params.min_p > 0.0
        self.rng = rng


def row_generators(*, n: int, seed: int | None, engine_seed: int, counter: int) -> list[np.random.Generator]:
    """`n` independent PRNGs: from the request seed (row i always gets the same one), else from the engine seed
    and a counter the engine advances for every generator it makes."""
    base = [seed % 2**64] if seed is not None else [unseeded_seed(engine_seed, counter), 1]
    return [np.random.Generator(np.random.PCG64([*base, row])) for row in range(n)]


def sample_rows(logits: np.ndarray, samplers: list[NumpySampler]) -> tuple[np.ndarray, list[RowLogprobs]]:
    """One token per row of `logits` (rows, vocab) and its RowLogprobs; greedy rows (T = 0) take the argmax and
    report log-probs at T = 1. A row of non-finite logits gets its argmax (NaN log-probs), never an exception."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        return _sample_rows(logits, samplers)


def _sample_rows(logits: np.ndarray, samplers: list[NumpySampler]) -> tuple[np.ndarray, list[RowLogprobs]]:
    temps = np.array([s.temperature or 1.0 for s in samplers], np.float32)
    scaled = logits if (temps == 1.0).all() else logits / temps[:, None]
    peak = scaled.max(axis=1, keepdims=True)
    weights = np.exp(scaled - peak)  # one vectorised pass: normalisers and sampling weights of every row
    lse = peak[:, 0] + np.log(weights.sum(axis=1, dtype=np.float64)).astype(np.float32)
    tokens = np.empty(len(samplers), np.uint32)
    keeps: list[np.ndarray | None] = [None] * len(samplers)
    for i, s in enumerate(samplers):
        tokens[i], keeps[i], total = _sample_row(scaled[i], weights[i], s)
        if s.grammar is not None:
            s.grammar.advance(tokens[i])
        if keeps[i] is not None:  # the kept set's normaliser: log-probs of the distribution sampled from
            lse[i] = peak[i, 0] + np.float32(np.log(total))
    rows = np.arange(len(samplers))
    chosen = (scaled[rows, tokens] - lse).tolist()
    out = []
    for i, s in enumerate(samplers):
        top = None
        if s.top_logprobs:
            k = s.top_logprobs
            ids = np.argpartition(-scaled[i], k - 1)[:k]
            ids = ids[np.argsort(-scaled[i][ids], kind="stable")]
            values = (scaled[i][ids] - lse[i]).astype(np.float64)
            if keeps[i] is not None:
                values = np.where(keeps[i][ids], values, FILTERED_LOGPROB)
            top = list(zip(ids.tolist(), values.tolist(), strict=True))
        out.append(RowLogprobs(chosen[i], top, int(keeps[i].sum()) if keeps[i] is not None else 0))
    return tokens, out


def _sample_row(z: np.ndarray, w: np.ndarray, s: NumpySampler) -> tuple[int, np.ndarray | None, float]:
    """One row's token from its tempered logits `z` and weights `w`, the kept set it was drawn from (a mask over the
    vocabulary; None: all of it) and that set's total weight. With a grammar, the row samples among the tokens it
    allows (indexed, not masked: often a handful of a vocabulary's tokens), and the filters apply to those (as vLLM
    applies logits processors first), so top-p keeps a nucleus of allowed tokens; such a row records no kept set
    (the learner cannot rebuild a grammar's mask), and its log-probs stay the unconstrained distribution's."""
    ids = None
    if s.grammar is not None:
        ids = np.flatnonzero(s.grammar.allowed(z.shape[0]))
        z, w = z[ids], w[ids]
    keep, total = None, 0.0
    if s.temperature == 0:
        token = int(np.argmax(z))
    else:
        if s.filtered:
            keep = filter_row(z, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p)
            w = np.where(keep, w, 0.0)
        total = float(w.sum(dtype=np.float64))
        if np.isfinite(total) and total > 0:
            token = _draw(w, s.rng.random())
        else:  # non-finite logits (or every allowed weight underflowed): the argmax rather than fail the step
            token = int(np.nanargmax(z)) if not np.isnan(z).all() else 0
            keep = None
    if ids is not None:
        return int(ids[token]), None, 0.0
    return token, keep, total


def _draw(weights: np.ndarray, u: float) -> int:
    """The token whose cumulative weight first exceeds u * total (inverse-CDF sampling). Block sums in float64
    pick the block, then only that block is cumulated: one pass over the row instead of a float64 cumsum of it."""
    blocks = -(-weights.shape[0] // _BLOCK)
    padded = np.zeros(blocks * _BLOCK, np.float32)
    padded[: weights.shape[0]] = weights
    sums = np.cumsum(padded.reshape(blocks, _BLOCK).sum(axis=1, dtype=np.float64))
    target = u * sums[-1]
    block = min(int(np.searchsorted(sums, target, side="right")), blocks - 1)
    part = padded[block * _BLOCK : (block + 1) * _BLOCK]
    inside = np.cumsum(part, dtype=np.float64)
    before = sums[block - 1] if block else 0.0
    index = int(np.searchsorted(inside, target - before, side="right"))
    if index >= _BLOCK or part[index] == 0:  # rounding put the target at the block's very end
        index = int(np.flatnonzero(part)[-1])
    return block * _BLOCK + index


class NumpyGenerationBatch(RoutedGenerationBatch):
    """mlx-lm's GenerationBatch with the sampling step in NumPy: the logits are evaluated every step (MLX's own
    path samples lazily and overlaps the next step with reading this one; on the CPU that overlap is worth less
    than the sampling costs)."""

    def _step(self) -> tuple[list[int], list[Any]]:
        if any(self.logits_processors):
            raise ValueError("logits processors are not supported by the NumPy sampling path")
        self._current_tokens = self._next_tokens
        self._current_logprobs = self._next_logprobs
        inputs = self._current_tokens
        fit_cache_growth(self.prompt_cache, 1, generation_left(self))
        with routed(self):
            logits = self.model(inputs[:, None], cache=self.prompt_cache)[:, -1, :]
        mx.eval(logits)
        tokens, self._next_logprobs = sample_rows(np.asarray(logits), self.samplers)
        self._next_tokens = mx.array(tokens)
        inputs = inputs.tolist()
        for sti, ti in zip(self.tokens, inputs, strict=True):
            sti.append(ti)
        return inputs, self._current_logprobs


class NumpyPromptBatch(RoutedPromptBatch):
    """Hands finished prompts to a NumpyGenerationBatch (split() keeps this class: it copies `self.__class__`)."""

    generation_class = NumpyGenerationBatch


def make_generator(model: nn.Module, *, numpy_sampling: bool, **kwargs: Any) -> BatchGenerator:
    """mlx-lm's BatchGenerator whose batches route each forward pass's rows to their adapters (batches.py); with
    numpy_sampling, they also sample in NumPy."""
    gen = BatchGenerator(model, **kwargs)
    if not (hasattr(gen, "_prompt_batch") and hasattr(gen, "_generation_batch")):
        raise RuntimeError(
            "this mlx-lm's BatchGenerator has no _prompt_batch/_generation_batch (its internals changed): paraloop "
            "needs them to route rows to their adapters and to sample in NumPy"
        )
    prompt_class, generation_class = (
        (NumpyPromptBatch, NumpyGenerationBatch) if numpy_sampling else (RoutedPromptBatch, RoutedGenerationBatch)
    )
    gen._prompt_batch = prompt_class.empty(model, gen.sampler, prefill_step_size=gen.prefill_step_size)
    gen._generation_batch = generation_class.empty(model, gen.sampler)
    return gen
