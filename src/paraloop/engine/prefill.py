"""Copies of a prompt's KV cache, so the rows that start from one prefill never write into each other.

In: a prompt cache (one entry per layer), e.g. a leader row's prompt KV or a prefix-cache match. Out: independent
copies of it for BatchGenerator.insert(caches=...). Runs on the engine thread.
"""

import copy
from typing import Any

from mlx_lm.models.cache import KVCache


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
