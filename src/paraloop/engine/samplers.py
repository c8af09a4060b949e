"""The samplers of a request's rows, MLX's or NumPy's, and the log-probs a decode step hands back from either.

In: a request's SamplingParams and its row count; later, the Responses of one decode step. Out: one sampler per
row (sampling.py's for mlx-lm's decode step, cpu_decode.py's NumpySampler for the CPU one), and each response's
token log-prob, top alternatives and kept-set size. The one module that knows both paths, so they need not know
each other. Runs on the engine thread.
"""

from typing import Any

import numpy as np

from paraloop.engine.cpu_decode import NumpySampler, RowLogprobs, row_generators
from paraloop.engine.filtering import Filters, effective_temperature
from paraloop.engine.grammar import row_grammars
from paraloop.engine.sampling import GrammarSampler, RowSampler, greedy, row_keys, token_logprobs
from paraloop.messages import SamplingParams

MAX_SHARED_SAMPLERS = 64  # distinct unseeded sampling settings kept for sharing


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
        if params.grammar is not None:
            return self._constrained(params, n)
        if not self.numpy and effective_temperature(params.temperature) == 0:
            return [greedy] * n
        if params.seed is not None:
            if self.numpy:
                generators = row_generators(n=n, seed=params.seed, engine_seed=0, counter=0)
                return [NumpySampler(params, g) for g in generators]
            return [RowSampler(params, k) for k in row_keys(n=n, seed=params.seed, engine_seed=0, counter=0)]
        setting = (
            params.temperature,
            params.top_p,
            params.top_k,
            params.min_p,
            params.top_logprobs if self.numpy else 0,
        )
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
    if responses and isinstance(responses[0].logprobs, RowLogprobs):
        rows = [r.logprobs for r in responses]
        return [r.chosen for r in rows], [r.top for r in rows], [r.kept for r in rows]
    # NumPy views of the evaluated rows: no MLX op may queue behind the decode step already in flight.
    chosen, ids, vals, kept = token_logprobs(
        [np.asarray(r.logprobs) for r in responses],
        [r.token for r in responses],
        temperatures,
        max(top_logprobs, default=0),
        filters,
    )
    if ids is None or vals is None:
        return chosen, [None] * len(responses), kept
    return chosen, [list(zip(i, v, strict=True)) for i, v in zip(ids, vals, strict=True)], kept
