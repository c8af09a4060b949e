"""Who prefills what: the state of requests that share one prefill (the engine thread's bookkeeping, no MLX).

A request's first row is its *leader*: it prefills what the prefix cache did not have. Its other rows wait for the
leader's prompt KV (`rows`), and so do other requests whose prompts share most of it (`held`): they are admitted
again once it is in the cache. `waiting_for` decides whether a request should wait for a leader at all.
"""

from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Leader:
    """The first row of a request, prefilling the part of its prompt that was not cached."""

    handle: Any  # the request (worker.Handle)
    tokens: list[int]  # the prompt but its last token: what the row's cache holds once prefilled
    adapter: Any  # the adapter it prefills with (adapters.Adapter): only requests for the same one wait for it
    epoch: int  # the policy epoch it prefills under: its KV is cached only if no swap came in between
    rows: list[int]  # the request's other row indices, started from this row's prompt KV
    samplers: list[Any]  # every row's sampler, by row index
    held: list[Any] = field(default_factory=list)  # other requests waiting for its prompt KV


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    return next(i for i in range(n) if a[i] != b[i])


def waiting_for(leaders: list[Leader], head: list[int], cached: int, *, adapter: Any, epoch: int) -> Leader | None:
    """The leader of this adapter and epoch whose prompt KV would cover the most of `head` beyond its `cached`
    tokens, if that is at least half of what `head` has left to prefill (less is not worth the wait: prefilling it
    alongside the leader costs about as much). Leaders of another adapter, or of an older epoch, are skipped: their
    KV is not this request's (or will not be cached)."""
    best, best_shared = None, 0
    for leader in leaders:
        if leader.adapter is adapter and leader.epoch == epoch:
            shared = common_prefix(head, leader.tokens)
            if shared > best_shared:
                best, best_shared = leader, shared
    gain = best_shared - cached
    return best if best is not None and gain > 0 and gain >= (len(head) - cached) // 2 else None
