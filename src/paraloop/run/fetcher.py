"""The rollout fetcher actor: a rollout source in, RolloutBatch to the learner out, through the rollout buffer.

The source is the built-in mock environment, the Atropos API client or the run's agent sessions
(run/agent_sessions.py); each is an async iterator of RolloutBatch. Their groups go into the RolloutBuffer, which
forms learner batches (exactly batch_size sequences, groups never split), drops groups too stale for the adapter
now training, and orders by priority when configured (with `abs_advantage` it looks one source batch ahead, so
there is a choice).

With a journal (sources that cannot send a batch again: Atropos, agent sessions), each fetched batch is written to
it before it enters the buffer (agent sessions' batches come written already: `journal_seq`), and a resumed run's
unconsumed groups (`replay`) go into the buffer before anything is fetched (run/journal.py). A batch the journal
cannot take (disk full, read-only) is still trained: it is only not safe from a crash, which status and the log
say.

In sync mode the fetcher asks the source for the next batch only after a credit: the publisher sends one when the
previous step's adapter is serving (strictly on-policy). In async mode it keeps generating while the learner steps,
held back only by the bounded outbox. Returns when the learner stops listening or the source ends. When the buffer
holds a batch's sequences in groups of mixed sizes that no choice fills exactly, the batch closes short.

Dynamic sampling (`max_draws`, with a buffer that sets zero-signal groups aside): the fetcher keeps drawing source
batches until the learner batch is full of groups with signal; after `max_draws` draws it completes the batch with
zero-signal groups instead of drawing forever. The batch's metrics say how many draws it took.
"""

import logging
from collections.abc import AsyncIterator, Callable, Sequence

import anyio
import msgspec
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from paraloop.messages import RolloutBatch
from paraloop.run.buffer import RolloutBuffer
from paraloop.run.journal import Journal, Replay

log = logging.getLogger("paraloop.fetcher")


async def run_fetcher(
    source: AsyncIterator[RolloutBatch],
    out: ObjectSendStream[RolloutBatch],
    *,
    buffer: RolloutBuffer,
    version: Callable[[], int],
    credits: ObjectReceiveStream[int] | None,
    max_draws: int | None = None,
    journal: Journal | None = None,
    replay: Sequence[Replay] = (),
) -> None:
    lookahead = buffer.batch_size if buffer.priority != "fifo" else 0
    for entry in replay:
        count = len(entry.batch.groups)
        for index in entry.indices:
            buffer.put(
                entry.batch.groups[index],
                source=entry.batch.source,
                source_step=entry.batch.source_step,
                source_state=entry.batch.source_state,
                journal_id=(entry.seq, index, count),
                replayed=True,
            )
    if replay and journal is not None:
        journal.counts["replayed_groups"] += sum(len(e.indices) for e in replay)
        log.info(
            "replaying %d journaled group(s) fetched before the restart and not in its checkpoint",
            journal.counts["replayed_groups"],
        )
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
                batch, draws = None, 0
                while batch is None:
                    if buffer.sequences < buffer.batch_size + lookahead or len(buffer) == 0:
                        try:
                            fetched = await anext(source)
                            draws += 1
                        except StopAsyncIteration:
                            log.info("rollout source ended")
                            batch = buffer.take(version=version(), partial=True)
                            if batch is not None and batch.groups:
                                await out.send(batch)
                            return
                        seq = fetched.journal_seq
                        if seq is None:
                            seq = await _journal(journal, fetched)
                        buffer.put_batch(fetched, journal_seq=seq)
                    batch = buffer.take(version=version(), fill=max_draws is not None and draws >= max_draws)
                    if batch is None and buffer.sequences >= buffer.batch_size + lookahead:
                        # Groups of mixed sizes (agent sessions split into samples) that no choice of whole
                        # groups fills exactly: the batch closes short rather than waiting for ever.
                        batch = buffer.take(version=version(), partial=True)
                if max_draws is not None:
                    batch = msgspec.structs.replace(batch, metrics={**batch.metrics, "sampling_draws": float(draws)})
                    if batch.metrics.get("filled_zero_signal"):
                        log.warning(
                            "dynamic sampling: %d draws did not fill the batch with signal; %d zero-signal "
                            "group(s) fill it",
                            draws,
                            int(batch.metrics["filled_zero_signal"]),
                        )
                await out.send(batch)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return  # the learner finished while we were sending
        finally:
            if credits is not None:
                credits.close()


async def _journal(journal: Journal | None, batch: RolloutBatch) -> int | None:
    """Write `batch` to the journal before it is used; its entry number, or None (no journal, or it failed)."""
    if journal is None:
        return None
    try:
        # Shielded: a batch popped from the source is on disk or known not to be, never half way.
        with anyio.CancelScope(shield=True):
            return await anyio.to_thread.run_sync(journal.append, batch)
    except OSError as e:
        log.error(
            "could not journal a fetched batch (%s): training it anyway, but a crash before the next "
            "checkpoint would lose it",
            e,
        )
        return None
