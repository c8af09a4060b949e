"""One dedicated thread per actor for MLX work.

MLX streams are thread-local (since mlx 0.31.2), so an actor's model loading, forward passes and evaluation must all
happen on the same thread: a one-worker executor, never a pooled thread. Each call is atomic (shielded from
cancellation, as a half-applied optimizer step is worse than a late stop) and followed by a cancellation checkpoint,
so a loop of compute-only calls still stops promptly.
"""

import asyncio
import contextlib
import contextvars
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import anyio
import anyio.lowlevel

T = TypeVar("T")


class ComputeThread(Protocol):
    """Where an actor's MLX work runs: an MlxThread (tests: run_fakes.InlineThread, on the event loop)."""

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T: ...

    def close(self) -> None: ...


class MlxThread:
    def __init__(self, name: str) -> None:
        self.name = name
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        ctx = contextvars.copy_context()
        with anyio.CancelScope(shield=True):
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(self._pool, lambda: ctx.run(fn, *args, **kwargs))
        await anyio.lowlevel.checkpoint_if_cancelled()
        return result

    def close(self) -> None:
        """Destroy the thread's MLX streams on the thread itself, then join it. Calls are shielded, so it is idle by
        the time its actor is done. A thread's streams left for MLX's own exit-time cleanup can abort the process
        ("terminate called without an active exception", ml-explore/mlx#3126: call `mx.clear_streams()` at the end
        of every thread that used MLX)."""
        with contextlib.suppress(RuntimeError):  # closed already
            self._pool.submit(end_mlx_thread).result()
        self._pool.shutdown(wait=True, cancel_futures=True)


def end_mlx_thread() -> None:
    """Finish the calling thread's MLX work and destroy its streams (before the thread or the process ends)."""
    import mlx.core as mx

    mx.synchronize()
    mx.clear_streams()
