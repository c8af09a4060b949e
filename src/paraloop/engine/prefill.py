"""Prefill a prompt once and fork its KV cache, so the n rows of one request decode from a single prefill.

In: the model and the prompt's tokens (all but the last, which each row feeds as its first decode input).
Out: an evaluated prompt cache, and independent copies of it for BatchGenerator.insert(caches=...).
Runs on the engine thread.
"""

import copy
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache, make_prompt_cache


def prefill(model: nn.Module, tokens: list[int], *, step: int) -> list[Any]:
    """Run `tokens` through the model in chunks of `step`; return the evaluated cache."""
    cache = make_prompt_cache(model)
    for start in range(0, len(tokens), step):
        model(mx.array(tokens[start : start + step])[None], cache=cache)
        mx.eval([c.state for c in cache])
    return cache


def fork_cache(cache: list[Any]) -> list[Any]:
    """A copy of a prompt cache whose arrays are distinct objects, so rows decoded from one prefill never write
    into each other (MLX slice assignment `a[...] = b` mutates the array object in place)."""
    out = []
    for c in cache:
        if type(c) is KVCache and c.keys is not None:
            d = KVCache()
            # Views of exactly `offset` positions (no copy): d's first update allocates new arrays.
            d.keys, d.values, d.offset = c.keys[..., : c.offset, :], c.values[..., : c.offset, :], c.offset
            out.append(d)
        else:  # other cache kinds: a deep copy is always safe
            out.append(copy.deepcopy(c))
    return out
