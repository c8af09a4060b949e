"""What many tests share: a free TCP port, waiting for a condition under a deadline, a rollout group.

Wait for the event that makes a check true (`until`), never for a fixed time: a sleep followed by a check that
something did *not* happen passes vacuously on a machine too slow for the thing to have happened yet.
"""

import socket
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import anyio

from paraloop.messages import ScoredGroup

T = TypeVar("T")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a process that must be told its port before it starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def until(predicate: Callable[[], Any], what: str, *, within: float = 20.0, every: float = 0.01) -> None:
    """Return once `predicate()` is true; AssertionError naming `what` after `within` seconds."""
    deadline = anyio.current_time() + within
    while not predicate():
        if anyio.current_time() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {within} s")
        await anyio.sleep(every)


def until_blocking(
    predicate: Callable[[], T], what: str, *, within: float = 20.0, every: float = 0.1,
    ignoring: tuple[type[BaseException], ...] = (),
) -> T:
    """`until` for a test without an event loop (waiting on a subprocess): returns the predicate's first true
    value; an exception in `ignoring` (e.g. OSError while a server starts) counts as not yet."""
    deadline = time.monotonic() + within
    while True:
        try:
            if value := predicate():
                return value
        except ignoring:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {within} s")
        time.sleep(every)


def group(scores: Sequence[float] = (0.0, 1.0), *, tag: int = 1, version: int | None = None) -> ScoredGroup:
    """A valid rollout group, one sequence [tag, 5, 6] per score with its first token the prompt; `tag` tells
    groups apart, `version` is the adapter version every sequence was sampled with (None: unknown)."""
    n = len(scores)
    return ScoredGroup(tokens=[[tag, 5, 6]] * n, masks=[[-100, 5, 6]] * n, scores=[float(s) for s in scores],
                       versions=None if version is None else [version] * n)
