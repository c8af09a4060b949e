"""The rollout fetcher actor: a rollout source in, RolloutBatch to the learner out, through the rollout buffer.

The source is the built-in mock environment or the Atropos API client; both are async iterators of RolloutBatch.
Their groups go into the RolloutBuffer, which forms learner batches (exactly batch_size sequences, groups never
split), drops groups too stale for the adapter now training, and orders by priority when configured (with
`abs_advantage` it looks one source batch ahead, so there is a choice).

In sync mode the fetcher asks the source for the next batch only after a credit: the publisher sends one when the
previous step's adapter is serving (strictly on-policy). In async mode it keeps generating while the learner steps,
held back only by the bounded outbox. Returns when the learner stops listening or the source ends.
"""

import logging
from collections.abc import AsyncIterator, Callable

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from paraloop.messages import RolloutBatch
from paraloop.run.buffer import RolloutBuffer

log = logging.getLogger("paraloop.fetcher")


async def run_fetcher(
    source: AsyncIterator[RolloutBatch],
    out: ObjectSendStream[RolloutBatch],
    *,
    buffer: RolloutBuffer,
    version: Callable[[], int],
    credits: ObjectReceiveStream[int] | None,
) -> None:
    lookahead = buffer.batch_size if buffer.priority != "fifo" else 0
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
                batch = None
                while batch is None:
                    if buffer.sequences < buffer.batch_size + lookahead or len(buffer) == 0:
                        try:
                            buffer.put_batch(await anext(source))
                        except StopAsyncIteration:
                            log.info("rollout source ended")
                            batch = buffer.take(version=version(), partial=True)
                            if batch is not None and batch.groups:
                                await out.send(batch)
                            return
                    batch = buffer.take(version=version())
                await out.send(batch)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return  # the learner finished while we were sending
        finally:
            if credits is not None:
                credits.close()
