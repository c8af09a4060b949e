"""The prefix cache as a data structure: longest-prefix lookup over a radix tree, KV content, node splits, LRU
eviction under a byte bound, and retirement of an adapter's entries at a swap."""

import paraloop  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache, RotatingKVCache

from paraloop.engine.prefix_cache import BASE_ADAPTER, PrefixCache, supports

LAYERS, HEADS, DIM = 2, 2, 4
BYTES_PER_TOKEN = LAYERS * 2 * HEADS * DIM * 4  # keys and values, float32
V0, V1 = (BASE_ADAPTER, 0), (BASE_ADAPTER, 1)


def kv_of(tokens: list[int], *, salt: float = 0.0) -> list[KVCache]:
    """A fake model's KV for `tokens`: position t of layer l holds token t (+ l/10 in keys, - l/10 in values)."""
    out = []
    for layer in range(LAYERS):
        t = mx.array(tokens, dtype=mx.float32)[None, None, :, None] + salt
        cache = KVCache()
        cache.keys = mx.broadcast_to(t + layer / 10, (1, HEADS, len(tokens), DIM))
        cache.values = mx.broadcast_to(t - layer / 10, (1, HEADS, len(tokens), DIM))
        cache.offset = len(tokens)
        out.append(cache)
    return out


def assert_holds(cache: list[KVCache], tokens: list[int], *, salt: float = 0.0) -> None:
    expected = kv_of(tokens, salt=salt)
    assert len(cache) == LAYERS
    for got, want in zip(cache, expected, strict=True):
        assert got.offset == len(tokens)
        assert mx.array_equal(got.keys, want.keys).item() and mx.array_equal(got.values, want.values).item()


def test_lookup_finds_the_longest_cached_prefix_and_its_kv():
    cache = PrefixCache(max_bytes=10**6)
    system = [1, 2, 3, 4, 5, 6]
    assert cache.insert(V0, system + [7, 8], kv_of(system + [7, 8])) == 8
    assert cache.insert(V0, system + [9], kv_of(system + [9])) == 1  # splits the first entry after the system part
    assert cache.insert(V0, system + [7, 8], kv_of(system + [7, 8])) == 0  # already there

    for prompt, length in [
        (system + [7, 8, 10], 8),
        (system + [9, 9], 7),
        (system + [11], 6),
        ([1, 2, 99], 2),
        ([42], 0),
        (system[:4], 4),
    ]:
        match = cache.lookup(V0, prompt)
        assert match.length == length, prompt
        if length:
            assert_holds(PrefixCache.kv(match), prompt[:length])
        else:
            assert PrefixCache.kv(match) == []
    assert cache.nbytes == 9 * BYTES_PER_TOKEN and cache.stored_tokens == 9
    assert cache.stats()["prefix_cache_entries"] == 3  # system part, [7, 8], [9]


def test_kv_views_are_fresh_arrays_that_writes_to_a_row_cache_do_not_reach():
    cache = PrefixCache(max_bytes=10**6)
    cache.insert(V0, [1, 2, 3], kv_of([1, 2, 3]))
    row = PrefixCache.kv(cache.lookup(V0, [1, 2, 3]))
    for c in row:  # what a decode step does to a row's cache
        c.update_and_fetch(mx.zeros((1, HEADS, 1, DIM)), mx.zeros((1, HEADS, 1, DIM)))
    assert_holds(PrefixCache.kv(cache.lookup(V0, [1, 2, 3])), [1, 2, 3])


def test_entries_of_one_adapter_version_never_serve_another():
    cache = PrefixCache(max_bytes=10**6)
    cache.insert(V0, [1, 2, 3, 4], kv_of([1, 2, 3, 4]))
    assert cache.lookup(V1, [1, 2, 3, 4]).length == 0
    cache.insert(V1, [1, 2, 3], kv_of([1, 2, 3], salt=0.5))
    assert_holds(PrefixCache.kv(cache.lookup(V1, [1, 2, 3, 4])), [1, 2, 3], salt=0.5)
    assert_holds(PrefixCache.kv(cache.lookup(V0, [1, 2, 3, 4])), [1, 2, 3, 4])
    assert cache.lookup(("other", 0), [1, 2]).length == 0  # another adapter identity (multi-LoRA)

    cache.retire(BASE_ADAPTER)  # a swap: every tree of the adapter, even the newest version's
    assert cache.lookup(V0, [1, 2, 3]).length == 0 and cache.lookup(V1, [1, 2, 3]).length == 0
    assert cache.nbytes == 7 * BYTES_PER_TOKEN  # unreachable at once, freed after the swap's pause
    cache.release_retired()
    assert cache.nbytes == 0 and cache.stored_tokens == 0 and cache.stats()["prefix_cache_entries"] == 0


def test_memory_stays_bounded_and_the_least_recently_used_leaves_go_first():
    cache = PrefixCache(max_bytes=12 * BYTES_PER_TOKEN)
    system = [1, 2, 3, 4]
    for tail in ([10, 11], [20, 21], [30, 31]):
        cache.insert(V0, system + tail, kv_of(system + tail))
    assert cache.nbytes == 10 * BYTES_PER_TOKEN
    cache.lookup(V0, system + [10, 11])  # the oldest tail is used again
    cache.insert(V0, system + [40, 41, 42], kv_of(system + [40, 41, 42]))  # 13 tokens: one leaf must go
    assert cache.nbytes <= cache.max_bytes and cache.evictions == 1
    assert cache.lookup(V0, system + [20, 21]).length == 4  # the least recently used tail was dropped
    for tail in ([10, 11], [30, 31], [40, 41, 42]):
        assert cache.lookup(V0, system + tail).length == 4 + len(tail)
    # Whole branches go leaf first, the shared system part last.
    cache.insert(V0, [7] * 12, kv_of([7] * 12))
    assert cache.nbytes == 12 * BYTES_PER_TOKEN and cache.lookup(V0, system).length == 0
    assert cache.lookup(V0, [7] * 12).length == 12
    # An entry larger than the whole budget is not stored (and evicts nothing).
    assert cache.insert(V0, list(range(100, 113)), kv_of(list(range(100, 113)))) == 0
    assert cache.lookup(V0, [7] * 12).length == 12


def test_only_plain_kv_caches_are_supported():
    assert supports(kv_of([1]))
    assert not supports([RotatingKVCache(max_size=8)]) and not supports([])
    cache = PrefixCache(max_bytes=10**6)
    assert cache.insert(V0, [1, 2], kv_of([1])) == 0  # the cache does not hold exactly these tokens
    with pytest.raises(ValueError):
        PrefixCache(max_bytes=0)


def test_hit_statistics():
    cache = PrefixCache(max_bytes=10**6)
    cache.record(prompt_tokens=40, cached_tokens=0)
    cache.record(prompt_tokens=40, cached_tokens=30)
    stats = cache.stats()
    assert stats["prefix_cache_lookups"] == 2 and stats["prefix_cache_hits"] == 1
    assert stats["prefix_cache_tokens_saved"] == 30 and stats["prefix_cache_hit_rate"] == pytest.approx(30 / 80)
