"""The publisher actor: AdapterPublished in, the engine serving that version out.

The engine takes the arrays between two decode steps (a pointer swap: no lock, no disk, no copy) and reports the
pause it took. In sync mode each swap also gives the rollout fetcher its next credit, so the next rollout starts on the
new version. Returns when the learner closes its outbox. While the engine holds a swap it has not applied,
`status.swap_pending_since` says since when (the watchdog's sign that the engine has work).
"""

import logging
import time
from typing import Any, Protocol

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from paraloop.messages import AdapterPublished, AdapterSwapped
from paraloop.run.status import RunStatus

log = logging.getLogger("paraloop.publisher")


class Swapping(Protocol):
    """The engine as the publisher sees it: engine.Engine (tests: run_fakes.FakeEngine)."""

    async def swap_adapter(self, arrays: dict[str, Any], version: int, *, drain: bool = False) -> AdapterSwapped: ...


async def run_publisher(
    inbox: ObjectReceiveStream[AdapterPublished],
    *,
    engine: Swapping,
    status: RunStatus,
    credits: ObjectSendStream[int] | None,
    drain: bool,
) -> None:
    async with inbox:
        async for published in inbox:
            status.swap_pending_since = time.monotonic()
            try:
                swapped = await engine.swap_adapter(published.arrays, published.version, drain=drain)
            finally:
                status.swap_pending_since = None
            status.record_swap(swapped)
            log.debug("serving version %d (decode paused %.3f ms)", swapped.version, swapped.pause_s * 1e3)
            if credits is not None:
                try:
                    await credits.send(swapped.version)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    credits = None  # the fetcher is done (the source ended or the learner stopped taking batches)
    if credits is not None:
        credits.close()
