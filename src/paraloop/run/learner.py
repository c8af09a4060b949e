"""The learner actor: RolloutBatch in, a new adapter version out.

Inbox: `batches` (from the rollout fetcher). Each batch is one GRPO step on the learner's own MLX thread; the new
adapter (evaluated arrays, shared by reference) goes to the publisher, step metrics to the monitor, and checkpoint
snapshots to the checkpointer on schedule. /control drives it through `LearnerControl` (pause, single step,
snapshot, stop). It returns after `total_steps` or a stop, having written a final checkpoint.

What a checkpoint keeps besides the trainer (the source's position, the journal groups consumed) changes together
with the trainer's step under one lock, so a snapshot taken while a step runs is of one step or the next, never a
mix of the two.
"""

import logging
import time
from pathlib import Path
from typing import Any, Protocol

import anyio
import mlx.core as mx
import msgspec
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from paraloop.checkpoint import step_dir_name
from paraloop.config import Staleness, StalePolicy
from paraloop.messages import (
    AdapterPublished,
    CheckpointWritten,
    RolloutBatch,
    SaveCheckpoint,
    StepFinished,
)
from paraloop.mlx_thread import ComputeThread
from paraloop.run.buffer import too_stale
from paraloop.run.control import LearnerControl
from paraloop.run.journal import Consumed
from paraloop.run.ranks import Coordinator
from paraloop.run.status import RunStatus

log = logging.getLogger("paraloop.learner")


class StepOutcome(Protocol):
    """What one trainer step reports (learn.trainer.StepResult)."""

    metrics: dict[str, float]
    skipped: bool


class Trainable(Protocol):
    """What the learner steps and checkpoints: learn.trainer.Trainer (tests: run_fakes.FakeTrainer). Called on the
    learner's thread only."""

    step_count: int  # steps done
    version: int  # the adapter version after them

    def step(self, batch: RolloutBatch) -> StepOutcome: ...

    def adapter(self) -> dict[str, mx.array]: ...  # evaluated: it leaves the thread

    def reference(self) -> dict[str, mx.array] | None: ...  # the KL reference (None: none)

    def state(self) -> dict[str, Any]: ...  # {"optimizer": arrays, "trainer": JSON}


class Learner:
    def __init__(
        self,
        trainer: Trainable,
        thread: ComputeThread,
        *,
        status: RunStatus,
        control: LearnerControl,
        total_steps: int,
        checkpoint_interval: int,
        save_every_step: bool,
        batches: ObjectReceiveStream[RolloutBatch],
        published: ObjectSendStream[AdapterPublished],
        checkpoints: ObjectSendStream[SaveCheckpoint],
        finished: ObjectSendStream[StepFinished],
        credits: ObjectSendStream[int] | None,
        max_staleness: int | None = None,
        stale_policy: StalePolicy = "drop",
        ranks: Coordinator | None = None,
        consumed: Consumed | None = None,
    ) -> None:
        self.trainer = trainer
        self.thread = thread
        self.status = status
        self.control = control
        self.total_steps = total_steps
        self.checkpoint_interval = checkpoint_interval
        self.save_every_step = save_every_step
        self.batches = batches
        self.published = published
        self.checkpoints = checkpoints
        self.finished = finished
        self.credits = credits
        self.source_state: dict[str, Any] | None = None  # the rollout source's position after the last batch trained
        self.staleness = Staleness(max_staleness, stale_policy)
        self.ranks = ranks  # run/ranks.Coordinator in a distributed run: the ranks decide each step together
        self.consumed = consumed  # journal groups trained or dropped so far (None: the source keeps no journal)
        self._dropped_untrained = 0  # groups of batches that lost every group: reported with the next step
        self._state = anyio.Lock()  # the trainer and what checkpoints keep with it change together
        control.snapshot = self.checkpoint_now if ranks is None else ranks.request_snapshot

    async def run(self) -> None:
        try:
            async with self.published, self.checkpoints, self.finished, self.batches:
                # A distributed run's ranks stop together: the coordinator's next_batch answers None for all.
                while self.trainer.step_count < self.total_steps and (
                    self.ranks is not None or not self.status.stopping
                ):
                    if self.ranks is not None:
                        batch = await self.ranks.next_batch(self, self.trainer.step_count)
                        if batch is None:
                            break
                        await self._step(batch)
                        continue
                    batch = await self._receive()
                    # Gate after receiving: a pause that came while we waited for the batch holds it, untrained.
                    if batch is None or not await self.control.wait_turn():
                        break
                    await self._step(batch)
                # Graceful end (steps done, /control/stop or a signal): the last state goes to disk before we
                # return. On an error elsewhere we are cancelled instead, and the newest checkpoint stands.
                if self.ranks is not None:
                    await self.ranks.end(self, self.trainer.step_count)
                else:
                    await self.checkpoint_now(final=True)
                if self.credits is not None:
                    self.credits.close()
        finally:
            self.control.finished()  # a /control/step still waiting gets its answer
        log.info("learner finished at step %d (version %d)", self.trainer.step_count, self.trainer.version)

    async def _receive(self) -> RolloutBatch | None:
        """The next batch, or None at end of stream or when a stop cancelled the wait."""
        with self.control.receiving():
            try:
                return await self.batches.receive()
            except anyio.EndOfStream:
                return None
        return None

    async def _train(self, batch: RolloutBatch) -> tuple[StepOutcome, dict[str, mx.array] | None]:
        """One optimizer step on the learner's thread, and what checkpoints keep with it."""
        async with self._state:
            self.status.learner_busy, self.status.learner_busy_since = True, time.monotonic()
            try:
                result = await self.thread.call(self.trainer.step, batch)
                adapter = None if result.skipped else await self.thread.call(self.trainer.adapter)
            finally:
                took = time.monotonic() - self.status.learner_busy_since
                self.status.slowest_step_s = max(self.status.slowest_step_s, took)
                self.status.learner_busy, self.status.learner_busy_since = False, None
            self._record(batch)
        return result, adapter

    def _record(self, batch: RolloutBatch) -> None:
        if batch.source_state is not None:
            self.source_state = batch.source_state
        if self.consumed is not None:
            self.consumed.add(batch.consumes)

    def _drop_stale(self, batch: RolloutBatch) -> RolloutBatch:
        """Groups more than max_staleness versions behind (async mode; Atropos rows in both modes) are dropped
        (policy "drop") or kept for the trainer's capped importance weights (policy "cap"). Groups of unknown
        version are kept. A step that loses every group trains nothing: the learner waits for the next batch."""
        if not self.staleness.drops:
            return batch
        fresh = [g for g in batch.groups if not too_stale(g, self.trainer.version, self.staleness.max_versions)]
        dropped = len(batch.groups) - len(fresh)
        if not dropped:
            return batch
        self.status.dropped_stale += dropped
        log.info("dropped %d rollout group(s) more than %d versions old", dropped, self.staleness.max_versions)
        return msgspec.structs.replace(batch, groups=fresh, dropped_stale=batch.dropped_stale + dropped)

    async def _step(self, batch: RolloutBatch) -> bool:
        """Train on `batch`; False when nothing was left to train (every group too stale)."""
        self.status.dropped_stale += batch.dropped_stale  # dropped upstream (the rollout buffer)
        batch = self._drop_stale(batch)
        if not batch.groups:
            self._dropped_untrained += batch.dropped_stale
            self.control.no_step()
            async with self._state:
                self._record(batch)  # its groups are consumed: dropped
            if self.credits is not None:
                await self.credits.send(self.trainer.version)
            return False
        result, adapter = await self._train(batch)
        step, version = self.trainer.step_count, self.trainer.version
        self.status.record_rollouts(batch, step, version)  # before StepFinished: the monitor logs them with it
        metrics = dict(result.metrics)
        metrics["dropped_stale"] = float(batch.dropped_stale + self._dropped_untrained)
        self._dropped_untrained = 0
        metrics.update(batch.metrics)  # how the batch was formed (dynamic sampling)
        if batch.source_step is not None:
            metrics["source_step"] = float(batch.source_step)
        done = StepFinished(step=step, version=version, metrics=metrics, skipped=result.skipped)
        if adapter is not None:
            await self.published.send(AdapterPublished(version=version, arrays=adapter))
        elif self.credits is not None:
            await self.credits.send(version)  # nothing to swap: the next rollout may start now
        await self.finished.send(done)
        self.control.step_done(done)
        due = self.save_every_step or bool(self.checkpoint_interval and step % self.checkpoint_interval == 0)
        if self.ranks is not None:
            await self.ranks.after_step(self.trainer, step, due)
            due = due and self.ranks.is_root  # rank 0 alone writes checkpoints
        if due and step < self.total_steps:  # the final checkpoint is written on the way out
            await self._send_checkpoint(reply=None)
        return True

    async def _send_checkpoint(self, reply: ObjectSendStream[CheckpointWritten] | None) -> None:
        def snapshot() -> tuple[dict, dict | None, dict]:
            return self.trainer.adapter(), self.trainer.reference(), self.trainer.state()

        async with self._state:
            adapter, reference, trainer_state = await self.thread.call(snapshot)
            kept = {
                "trainer": trainer_state["trainer"],
                "metrics": self.status.last_metrics,
                "source_state": self.source_state,
            }
            if self.consumed is not None:
                kept["journal"] = self.consumed.to_json()
            request = SaveCheckpoint(
                step=self.trainer.step_count,
                version=self.trainer.version,
                adapter=adapter,
                reference=reference,
                optimizer_state=trainer_state["optimizer"],
                trainer_state=kept,
                reply=reply,
            )
        await self.checkpoints.send(request)

    async def checkpoint_now(self, final: bool = False) -> CheckpointWritten | None:
        """Snapshot the trainer between steps and wait until the checkpoint is on disk."""
        last = self.status.last_checkpoint
        if final and last and Path(last).name == step_dir_name(self.trainer.step_count):
            return None  # this step is already on disk
        send, receive = anyio.create_memory_object_stream[CheckpointWritten](1)
        try:
            await self._send_checkpoint(reply=send)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            return None
        async with receive:
            try:
                return await receive.receive()
            except anyio.EndOfStream:
                return None
