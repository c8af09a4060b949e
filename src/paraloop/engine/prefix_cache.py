"""A prefix cache: the KV caches of token prefixes, shared by every request whose prompt starts with one.

In: token ids with the per-layer keys and values the model computed for them (a prompt once prefilled, a row once
finished: prompt + completion), under one adapter identity and version. Out: for a new prompt, the length of its
longest cached prefix and that prefix's KV as fresh `KVCache`s (views and concatenations: the stored arrays are
never written). Runs on the engine thread only; the statistics are plain numbers other threads may read.

Layout: one radix tree per `CacheKey` (adapter identity, adapter version); each node holds a segment of tokens and
that segment's keys/values per layer, (1, kv_heads, len, head_dim) each. Entries made under one key never serve
another, and a swap `retire`s all of the adapter's trees at once (unreachable in O(1)); `release_retired` frees
them after the swap pause. Memory is bounded by `max_bytes`: past it, the least recently used leaves go first (a node is
touched after its descendants, so the oldest node in the LRU order is always a leaf). Only plain `KVCache` layers
are cached (not rotating, quantized or state-space caches): `supports` says whether a model's are.
"""

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache

CacheKey = tuple[str, int]  # (adapter identity, adapter version): KV made under one key serves only that key
BASE_ADAPTER = "default"  # the identity of the engine's one adapter slot (or of the bare base model)


def supports(cache: list[Any]) -> bool:
    """True when every layer of a model's prompt cache is a plain KVCache (what this cache can store)."""
    return bool(cache) and all(type(c) is KVCache for c in cache)


def _bytes_per_token(cache: list[KVCache]) -> int:
    return sum((c.keys.nbytes + c.values.nbytes) // c.keys.shape[2] for c in cache)


class _Node:
    __slots__ = ("children", "keys", "nbytes", "parent", "tokens", "values")

    def __init__(self, tokens: tuple[int, ...], keys: list[mx.array], values: list[mx.array], parent: "_Node | None"):
        self.tokens = tokens
        self.keys = keys
        self.values = values
        self.parent = parent
        self.children: dict[int, _Node] = {}
        self.nbytes = sum(a.nbytes for a in keys) + sum(a.nbytes for a in values)


@dataclass
class Match:
    """The longest cached prefix of some tokens: `length` tokens along `path` ((node, tokens used) per node)."""

    length: int = 0
    path: list[tuple[_Node, int]] = field(default_factory=list)


def _common(segment: tuple[int, ...], tokens: list[int], start: int) -> int:
    """How many leading tokens of `segment` equal tokens[start:]."""
    end = min(len(segment), len(tokens) - start)
    if tuple(tokens[start : start + end]) == segment[:end]:
        return end
    for k in range(end):
        if segment[k] != tokens[start + k]:
            return k
    return end


class PrefixCache:
    """Radix trees of KV segments keyed by CacheKey, bounded in bytes; see the module docstring."""

    def __init__(self, *, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.max_bytes = max_bytes
        self._roots: dict[CacheKey, _Node] = {}
        self._lru: OrderedDict[_Node, None] = OrderedDict()  # every non-root node, least recently used first
        self._retired: list[_Node] = []
        self._nbytes = 0  # exact at every moment; `nbytes` is published once an operation is done
        # Statistics (read from other threads; replaced whole).
        self.nbytes = 0
        self.stored_tokens = 0
        self.evictions = 0
        self.lookups = 0  # requests resolved against the cache
        self.hits = 0  # ... that reused at least one cached token
        self.prompt_tokens = 0  # prefill-able prompt tokens of those requests
        self.cached_tokens = 0  # ... taken from the cache instead of prefilled

    # --- reading ----------------------------------------------------------------------------------------------------

    def lookup(self, key: CacheKey, tokens: list[int]) -> Match:
        """The longest prefix of `tokens` cached under `key` (marks it recently used)."""
        match = Match()
        node = self._roots.get(key)
        while node is not None and match.length < len(tokens):
            child = node.children.get(tokens[match.length])
            if child is None:
                break
            used = _common(child.tokens, tokens, match.length)
            match.path.append((child, used))
            match.length += used
            node = child if used == len(child.tokens) else None
        if match.path:
            self._touch(match.path[-1][0])
        return match

    @staticmethod
    def kv(match: Match) -> list[KVCache]:
        """The matched prefix as one KVCache per layer (offset = match.length); empty for an empty match."""
        if not match.path:
            return []
        out = []
        for layer in range(len(match.path[0][0].keys)):
            parts_k = [node.keys[layer][..., :used, :] for node, used in match.path]
            parts_v = [node.values[layer][..., :used, :] for node, used in match.path]
            cache = KVCache()
            cache.keys = parts_k[0] if len(parts_k) == 1 else mx.concatenate(parts_k, axis=2)
            cache.values = parts_v[0] if len(parts_v) == 1 else mx.concatenate(parts_v, axis=2)
            cache.offset = match.length
            out.append(cache)
        return out

    def record(self, *, prompt_tokens: int, cached_tokens: int) -> None:
        """Count one request: how many of its prefill-able tokens came from the cache."""
        self.lookups += 1
        self.hits += cached_tokens > 0
        self.prompt_tokens += prompt_tokens
        self.cached_tokens += cached_tokens

    # --- writing ----------------------------------------------------------------------------------------------------

    def insert(self, key: CacheKey, tokens: list[int], cache: list[Any]) -> int:
        """Store the KV of `tokens` (cache: one KVCache per layer holding exactly them); returns how many tokens
        were new. The new part is copied out of `cache` (evaluated asynchronously), so `cache` may be freed."""
        if not tokens or not supports(cache) or any(c.offset != len(tokens) for c in cache):
            return 0
        node = self._roots.setdefault(key, _Node((), [], [], None))
        start = 0
        while start < len(tokens):
            child = node.children.get(tokens[start])
            if child is None:
                break
            used = _common(child.tokens, tokens, start)
            if used < len(child.tokens):
                child = self._split(child, used)
            node, start = child, start + used
        added = len(tokens) - start
        if added and added * _bytes_per_token(cache) <= self.max_bytes:
            keys = [mx.contiguous(c.keys[..., start : len(tokens), :]) for c in cache]
            values = [mx.contiguous(c.values[..., start : len(tokens), :]) for c in cache]
            mx.async_eval(keys, values)
            leaf = _Node(tuple(tokens[start:]), keys, values, node)
            node.children[leaf.tokens[0]] = leaf
            self._lru[leaf] = None
            self._nbytes += leaf.nbytes
            self.stored_tokens += added
            node = leaf
        else:
            added = 0  # larger than the whole cache: not stored
        if node.parent is not None:
            self._touch(node)
        self._evict()
        self.nbytes = self._nbytes  # never above max_bytes for a reader
        return added

    def retire(self, adapter: str) -> None:
        """Make every tree of `adapter` unreachable (O(1) per tree), whatever its version: after a swap even a
        re-published version number may hold other arrays. release_retired frees them."""
        for key in [k for k in self._roots if k[0] == adapter]:
            self._retired.append(self._roots.pop(key))

    def release_retired(self) -> None:
        """Free the retired trees (outside the swap pause: it walks every node)."""
        while self._retired:
            stack = list(self._retired.pop().children.values())
            while stack:
                node = stack.pop()
                stack.extend(node.children.values())
                self._drop(node)
        self.nbytes = self._nbytes

    def clear(self) -> None:
        for key in list(self._roots):
            self._retired.append(self._roots.pop(key))
        self.release_retired()

    # --- internals --------------------------------------------------------------------------------------------------

    def _split(self, node: _Node, at: int) -> _Node:
        """Cut `node` after `at` tokens; returns the new first half, which becomes the parent of the second."""
        parent = node.parent
        assert parent is not None and 0 < at < len(node.tokens)
        head_k = [mx.contiguous(k[..., :at, :]) for k in node.keys]
        head_v = [mx.contiguous(v[..., :at, :]) for v in node.values]
        tail_k = [mx.contiguous(k[..., at:, :]) for k in node.keys]
        tail_v = [mx.contiguous(v[..., at:, :]) for v in node.values]
        mx.async_eval(head_k, head_v, tail_k, tail_v)
        head = _Node(node.tokens[:at], head_k, head_v, parent)
        parent.children[head.tokens[0]] = head
        self._nbytes -= node.nbytes
        node.tokens, node.keys, node.values, node.parent = node.tokens[at:], tail_k, tail_v, head
        node.nbytes = sum(a.nbytes for a in tail_k) + sum(a.nbytes for a in tail_v)
        head.children[node.tokens[0]] = node
        self._nbytes += head.nbytes + node.nbytes
        self._lru[head] = None  # after `node` (its descendant) in the order; _touch moves it on anyway
        return head

    def _touch(self, node: _Node) -> None:
        """Mark `node` and its ancestors most recently used, descendants first (so parents stay behind them)."""
        while node.parent is not None:
            self._lru.move_to_end(node)
            node = node.parent

    def _evict(self) -> None:
        while self._nbytes > self.max_bytes and self._lru:
            node = next(iter(self._lru))
            assert not node.children, "the least recently used node is always a leaf"
            del node.parent.children[node.tokens[0]]
            self._drop(node)
            self.evictions += 1

    def _drop(self, node: _Node) -> None:
        self._lru.pop(node, None)
        self._nbytes -= node.nbytes
        self.stored_tokens -= len(node.tokens)
        node.keys, node.values, node.children = [], [], {}

    # --- statistics -------------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        """Hit rate (cached over prefill-able prompt tokens), tokens saved, memory and counts."""
        return {
            "prefix_cache_hit_rate": self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0,
            "prefix_cache_tokens_saved": float(self.cached_tokens),
            "prefix_cache_prompt_tokens": float(self.prompt_tokens),
            "prefix_cache_lookups": float(self.lookups),
            "prefix_cache_hits": float(self.hits),
            "prefix_cache_bytes": float(self.nbytes),
            "prefix_cache_max_bytes": float(self.max_bytes),
            "prefix_cache_entries": float(len(self._lru)),
            "prefix_cache_stored_tokens": float(self.stored_tokens),
            "prefix_cache_evictions": float(self.evictions),
        }


STATS_OFF = {key: 0.0 for key in PrefixCache(max_bytes=1).stats()}  # what the engine reports with the cache off
