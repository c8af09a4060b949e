"""Per-row token sampling and the log-probabilities every generated token records.

In: one row's (1, vocab) log-softmax at temperature 1 (what mlx-lm's BatchGenerator hands a sampler) and that
row's SamplingParams. Out: the sampled token id, drawn with the row's own PRNG key, so a seeded request samples
the same tokens whatever else shares the batch. `token_logprobs` turns a step's rows back into the numbers the
learner needs, log_softmax(logits / T), in one batched computation.

Filters follow vLLM's order: temperature, then top-k, top-p and min-p on the tempered distribution. A filtered
row's recorded log-probs are of the distribution it sampled from: log_softmax(logits / T) renormalised over the
kept set (vLLM's processed log-probs), and each token records the kept set's size `kept` (0: the full
vocabulary), which the learner needs to score it over the same set (sampling-mask replay, learn/logprobs.py). The
kept set of every filter is a prefix of the tokens in descending-logit order, so its size describes it.
"""

from typing import Any

import mlx.core as mx
import numpy as np

from paraloop.messages import SamplingParams

_GOLDEN = 0x9E3779B97F4A7C15  # spreads (engine seed, counter) over 64 bits
GREEDY_BELOW = 1e-5  # temperatures under this sample greedily, as vLLM does (1/T would overflow float32 soon after)
MAX_TEMPERATURE = 100.0  # above this every distribution is uniform to float32 precision, and 1e39 overflows it


def effective_temperature(temperature: float) -> float:
    """The temperature a row samples at: 0 (greedy) for anything below GREEDY_BELOW."""
    return 0.0 if temperature < GREEDY_BELOW else temperature
MAX_SHARED_SAMPLERS = 64  # distinct unseeded sampling settings kept for sharing
NUCLEUS_FIRST = 64  # filter_row's first guess at a top-p nucleus size (grown 8x until it holds top_p's mass)
FILTERED_LOGPROB = -9999.0  # an alternative outside the kept set (probability 0): vLLM's JSON stand-in for -inf

Filters = tuple[int, float, float]  # (top_k, top_p, min_p) of a row that samples with at least one of them


def row_filters(params: SamplingParams) -> Filters | None:
    """The filters a row samples with, or None (greedy rows and unfiltered ones sample the full vocabulary)."""
    if effective_temperature(params.temperature) == 0:
        return None
    if params.top_k > 0 or params.top_p < 1.0 or params.min_p > 0.0:
        return (params.top_k, params.top_p, params.min_p)
    return None


def filter_row(z: np.ndarray, *, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """The tokens top-k, top-p (nucleus) and min-p keep, as a bool mask over one row of tempered logits `z`
    (vLLM's order, as filter_logits)."""
    vocab = z.shape[0]
    keep = np.ones(vocab, bool)
    if 0 < top_k < vocab:
        keep &= z >= np.partition(z, vocab - top_k)[vocab - top_k]
    if top_p < 1.0:
        masked = np.where(keep, z, -np.inf)
        p = np.exp(masked - masked.max())
        p /= p.sum()
        # Sort only the most likely `m` tokens, m growing until their mass reaches top_p (the nucleus is a prefix
        # of the descending order): O(vocab) per row instead of a full sort, where nuclei are usually small.
        m = min(vocab, NUCLEUS_FIRST)
        while True:
            top = np.argpartition(-p, m - 1)[:m] if m < vocab else np.arange(vocab)
            order = top[np.argsort(-p[top], kind="stable")]
            mass = np.cumsum(p[order], dtype=np.float64)
            if m == vocab or mass[-1] >= top_p:
                break
            m = min(vocab, m * 8)
        before = mass - p[order]  # mass of the more likely tokens
        nucleus = np.zeros(vocab, bool)
        nucleus[order[before < top_p]] = True
        nucleus[order[0]] = True  # the most likely token always survives (whatever top_p's float rounding)
        keep &= nucleus
    if min_p > 0.0:
        masked = np.where(keep, z, -np.inf)
        keep &= z >= masked.max() + np.log(min_p)
    return keep


def kept_logsumexp(z: np.ndarray, keep: np.ndarray) -> float:
    """log sum_{kept} exp(z), summed in float64: the normaliser of the distribution a filtered row samples from."""
    peak = float(z[keep].max())
    return peak + float(np.log(np.exp(z[keep] - peak).sum(dtype=np.float64)))


def row_keys(*, n: int, seed: int | None, engine_seed: int, counter: int) -> list[mx.array]:
    """`n` PRNG keys. A request seed fixes the keys of all its rows (row i always gets the same key); without
    one, keys come from the engine seed and a counter the engine advances for every key it makes."""
    if seed is None:
        base = mx.random.key((engine_seed * _GOLDEN + counter) % 2**64)
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


class RowSamplers:
    """Makes the samplers of a request's rows: MLX ones for mlx-lm's decode step, NumPy ones for the CPU step.

    Greedy rows, and rows without a seed that sample alike, share one object: when every row of the batch shares
    it, mlx-lm samples the batch in one call instead of one per row (a shared sampler's draws depend on the
    batch's order). Seeded rows get their own key, so their samples do not depend on what else is in the batch.
    """

    def __init__(self, *, numpy: bool, engine_seed: int, eos: list[int] | None = None) -> None:
        self.numpy = numpy
        self.engine_seed = engine_seed
        self.eos = eos or []  # a failed grammar allows only these
        self._made = 0  # keys made for unseeded settings
        self._shared: dict[tuple, Any] = {}

    def __call__(self, params: SamplingParams, n: int) -> list[Any]:
        from paraloop.engine.cpu_decode import NumpySampler, row_generators  # it imports this module

        if params.grammar is not None:
            return self._constrained(params, n)
        if not self.numpy and effective_temperature(params.temperature) == 0:
            return [greedy] * n
        if params.seed is not None:
            if self.numpy:
                generators = row_generators(n=n, seed=params.seed, engine_seed=0, counter=0)
                return [NumpySampler(params, g) for g in generators]
            return [RowSampler(params, k) for k in row_keys(n=n, seed=params.seed, engine_seed=0, counter=0)]
        setting = (params.temperature, params.top_p, params.top_k, params.min_p,
                   params.top_logprobs if self.numpy else 0)  # fmt: skip
        if setting not in self._shared:
            if len(self._shared) >= MAX_SHARED_SAMPLERS:
                self._shared.clear()  # rows already inserted keep theirs; new rows get fresh ones
            if self.numpy:
                rng = row_generators(n=1, seed=None, engine_seed=self.engine_seed, counter=self._made)[0]
                self._shared[setting] = NumpySampler(params, rng)
            else:
                key = row_keys(n=1, seed=None, engine_seed=self.engine_seed, counter=self._made)[0]
                self._shared[setting] = RowSampler(params, key)
            self._made += 1
        return [self._shared[setting]] * n

    def _constrained(self, params: SamplingParams, n: int) -> list[Any]:
        """Each row its own grammar state, hence its own sampler (seeded as any row; unseeded: the counter's)."""
        from paraloop.engine.cpu_decode import NumpySampler, row_generators
        from paraloop.engine.grammar import row_grammars

        grammars = row_grammars(params.grammar, n, self.eos)
        seed, counter = (params.seed, 0) if params.seed is not None else (None, self._made)
        engine_seed = 0 if params.seed is not None else self.engine_seed
        self._made += params.seed is None
        if self.numpy:
            generators = row_generators(n=n, seed=seed, engine_seed=engine_seed, counter=counter)
            return [NumpySampler(params, g, grammar) for g, grammar in zip(generators, grammars, strict=True)]
        keys = row_keys(n=n, seed=seed, engine_seed=engine_seed, counter=counter)
        return [GrammarSampler(params, k, grammar) for k, grammar in zip(keys, grammars, strict=True)]


def step_logprobs(
    responses: list[Any], temperatures: list[float], top_logprobs: list[int], filters: list[Filters | None]
) -> tuple[list[float], list[list[tuple[int, float]] | None], list[int]]:
    """Each response's token log-prob, its top alternatives (None where not asked) and its kept-set size (0: the
    full vocabulary), from what a decode step handed back: RowLogprobs on the CPU path, full (vocab,)
    log-softmax rows on mlx-lm's (whose filters are re-applied here, in NumPy, to the same float32 row)."""
    from paraloop.engine.cpu_decode import RowLogprobs  # it imports this module

    if responses and isinstance(responses[0].logprobs, RowLogprobs):
        rows = [r.logprobs for r in responses]
        return [r.chosen for r in rows], [r.top for r in rows], [r.kept for r in rows]
    # NumPy views of the evaluated rows: no MLX op may queue behind the decode step already in flight.
    chosen, ids, vals, kept = token_logprobs([np.asarray(r.logprobs) for r in responses],
                                             [r.token for r in responses], temperatures,
                                             max(top_logprobs, default=0), filters)  # fmt: skip
    if ids is None or vals is None:
        return chosen, [None] * len(responses), kept
    return chosen, [list(zip(i, v, strict=True)) for i, v in zip(ids, vals, strict=True)], kept
