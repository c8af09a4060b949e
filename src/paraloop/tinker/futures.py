"""Tinker's futures: every training and sampling call returns a request id at once; retrieve_future fetches it.

In: submitted work (a coroutine function), retrieve_future polls. Out: a result kept until it is fetched... and
beyond, for `retention_s`, so a client that lost its connection and polls again still gets it (the SDK polls one
future until it has an answer; several polls of a finished future get the same answer). Bounds: at most
`max_pending` unfinished futures (one more: FuturesFull, answered 429, which the SDK backs off and retries) and at
most 4 * max_pending finished ones (the oldest go first). A poll of an unfinished future waits up to `wait_s` for
it, then answers try_again (the SDK polls again at once).

Training work is keyed by its training client: one queue per client, each run in the order it was submitted (Tinker
promises a client's calls run in the order it made them), the clients served round-robin, one call at a time (the
learner thread is one): a client that submits a hundred chunks delays another's next call by one chunk, not a
hundred. Sampling work (no key) runs concurrently: the engine batches it.
"""

import itertools
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc

log = logging.getLogger("paraloop.tinker")

Work = Callable[[], Awaitable["Result"]]


@dataclass
class Result:
    """What a future resolves to: a JSON object, protobuf bytes, or an error in the SDK's shape."""

    json: dict[str, Any] | None = None
    proto: bytes | None = None
    error: str | None = None
    category: str = "user"  # "user": the request was wrong; "server": paraloop failed


class UserError(ValueError):
    """Work that fails because of what was asked: the future answers {"error", "category": "user"}."""


class FuturesFull(RuntimeError):
    """Too many unfinished futures (HTTP 429)."""


@dataclass(eq=False)
class Future:
    done: anyio.Event = field(default_factory=anyio.Event)
    result: Result | None = None
    finished_at: float = 0.0


class Futures:
    def __init__(self, *, max_pending: int, retention_s: float, wait_s: float) -> None:
        self.max_pending = max_pending
        self.retention_s = retention_s
        self.wait_s = wait_s
        self._futures: OrderedDict[str, Future] = OrderedDict()
        self._pending = 0
        self._ids = itertools.count(1)
        self._tg: anyio.abc.TaskGroup | None = None
        self._queues: OrderedDict[str, deque[tuple[Future, Work]]] = OrderedDict()  # non-empty, next client first
        self._wake = anyio.Event()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run submitted work until cancelled: keyed work round-robin over the keys, the rest concurrently."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started()
            while True:
                if not self._queues:
                    self._wake = anyio.Event()
                    await self._wake.wait()
                    continue
                key, queue = self._queues.popitem(last=False)
                future, work = queue.popleft()
                if queue:
                    self._queues[key] = queue  # to the back: every other waiting client goes first
                await self._settle(future, work)

    def submit(self, work: Work, *, key: str | None) -> str:
        """Start `work` (key None: now, concurrently; else after the key's earlier work, round-robin with other
        keys); returns its request id. Raises FuturesFull."""
        assert self._tg is not None, "Futures.run() is not running"
        self._forget_old()
        if self._pending >= self.max_pending:
            raise FuturesFull(
                f"{self._pending} requests are unfinished (tinker.max_pending = {self.max_pending}); "
                "retry once some have finished"
            )
        request_id = f"req-{next(self._ids)}"
        future = self._futures[request_id] = Future()
        self._pending += 1
        if key is None:
            self._tg.start_soon(self._settle, future, work)
        else:
            self._queues.setdefault(key, deque()).append((future, work))
            self._wake.set()
        return request_id

    def resolved(self, result: Result) -> str:
        """A future that is already finished (work done at submission)."""
        request_id = f"req-{next(self._ids)}"
        future = self._futures[request_id] = Future(result=result, finished_at=time.monotonic())
        future.done.set()
        return request_id

    async def _settle(self, future: Future, work: Work) -> None:
        try:
            result = await work()
        except UserError as e:
            result = Result(error=str(e), category="user")
        except Exception as e:  # a bug in paraloop: the SDK reports it, and the server keeps serving
            log.exception("tinker request failed")
            result = Result(error=f"{type(e).__name__}: {e}", category="server")
        future.result, future.finished_at = result, time.monotonic()
        self._pending -= 1
        future.done.set()

    async def retrieve(self, request_id: str) -> Result | None:
        """The result, waiting up to wait_s for it; None: not finished yet. KeyError: no such future (or expired)."""
        future = self._futures[request_id]
        with anyio.move_on_after(self.wait_s):
            await future.done.wait()
        return future.result

    def _forget_old(self) -> None:
        now = time.monotonic()
        keep = 4 * self.max_pending
        finished = [(k, f) for k, f in self._futures.items() if f.result is not None]
        for i, (key, future) in enumerate(finished):
            if now - future.finished_at > self.retention_s or len(finished) - i > keep:
                del self._futures[key]
