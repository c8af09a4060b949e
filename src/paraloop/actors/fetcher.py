"""The rollout fetcher actor: a rollout source in, RolloutBatch to the learner out.

The source is the built-in mock environment or the Atropos API client; both are async iterators of RolloutBatch.
In sync mode the fetcher asks the source for the next batch only after a credit: the publisher sends one when the
previous step's adapter is serving (strictly on-policy). In async mode it keeps generating while the learner steps,
held back only by the bounded outbox. Returns when the learner stops listening or the source ends.
"""

import logging
from collections.abc import AsyncIterator

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from paraloop.messages import RolloutBatch

log = logging.getLogger("paraloop.fetcher")


async def run_fetcher(
    source: AsyncIterator[RolloutBatch],
    out: ObjectSendStream[RolloutBatch],
    *,
    credits: ObjectReceiveStream[int] | None,
) -> None:
    async with out:
        try:
            first = True
            while True:
                if credits is not None and not first:
                    try:
                        await credits.receive()
                    except anyio.EndOfStream:
                        return  # the learner is done
                first = False
                try:
                    batch = await anext(source)
                except StopAsyncIteration:
                    log.info("rollout source ended")
                    return
                await out.send(batch)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return  # the learner finished while we were sending
        finally:
            if credits is not None:
                credits.close()
