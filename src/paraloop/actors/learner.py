"""The learner actor: RolloutBatch in, a new adapter version out.

Inbox: `batches` (from the rollout fetcher). Each batch is one GRPO step on the learner's own MLX thread; the new
adapter (evaluated arrays, shared by reference) goes to the publisher, step metrics to the monitor, and checkpoint
snapshots to the checkpointer on schedule. /control drives it through `LearnerControl` (pause, single step,
snapshot, stop). It returns after `total_steps` or a stop, having written a final checkpoint.
"""

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from paraloop.checkpoint import step_dir_name
from paraloop.messages import (
    AdapterPublished,
    CheckpointWritten,
    RolloutBatch,
    SaveCheckpoint,
    StepFinished,
)
from paraloop.mlx_thread import MlxThread
from paraloop.state import RunState

log = logging.getLogger("paraloop.learner")


class ControlError(RuntimeError):
    """A /control request that does not fit the run's state (answered 409)."""


class LearnerControl:
    """Pause / resume / single-step / stop, shared by /control and the signal handler."""

    def __init__(self, state: RunState) -> None:
        self.state = state
        self._changed = anyio.Event()
        self._permits = 0
        self._step_waiters: list[ObjectSendStream[StepFinished]] = []
        self._receive_scope: anyio.CancelScope | None = None
        self.snapshot: Callable[[], Any] | None = None  # set by the learner: async () -> CheckpointWritten

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def pause(self) -> None:
        self.state.paused = True
        self._notify()

    def resume(self) -> None:
        self.state.paused = False
        self._notify()

    def stop(self) -> None:
        """Finish the step in flight, write a final checkpoint, end the run."""
        self.state.stopping = True
        if self._receive_scope is not None and not self.state.learner_busy:
            self._receive_scope.cancel()
        self._notify()

    async def step_once(self) -> StepFinished:
        """While paused: run exactly one learner step and return its result."""
        if not self.state.paused:
            raise ControlError("the run is not paused: POST /control/pause first")
        if self.state.stopping:
            raise ControlError("the run is stopping")
        send, receive = anyio.create_memory_object_stream[StepFinished](1)
        self._step_waiters.append(send)
        self._permits += 1
        self._notify()
        async with receive:
            return await receive.receive()

    async def wait_turn(self) -> bool:
        """Return True when the learner may take its next step, False when the run is stopping."""
        while True:
            if self.state.stopping:
                return False
            if not self.state.paused:
                return True
            if self._permits:
                self._permits -= 1
                return True
            await self._changed.wait()

    def step_done(self, done: StepFinished) -> None:
        waiters, self._step_waiters = self._step_waiters, []
        for send in waiters:
            send.send_nowait(done)
            send.close()


class Learner:
    def __init__(
        self,
        trainer: Any,
        thread: MlxThread,
        *,
        state: RunState,
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
        stale_policy: str = "drop",
    ) -> None:
        self.trainer = trainer
        self.thread = thread
        self.state = state
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
        self.max_staleness = max_staleness
        self.stale_policy = stale_policy
        control.snapshot = self.checkpoint_now

    async def run(self) -> None:
        async with self.published, self.checkpoints, self.finished, self.batches:
            while self.trainer.step_count < self.total_steps:
                batch = await self._receive()
                # Gate after receiving: a pause that came while we waited for the batch holds it, untrained.
                if batch is None or not await self.control.wait_turn():
                    break
                await self._step(batch)
            # Graceful end (steps done, /control/stop or a signal): the last state goes to disk before we return.
            # On an error elsewhere we are cancelled instead, and the newest periodic checkpoint stands.
            await self.checkpoint_now(final=True)
            if self.credits is not None:
                self.credits.close()
        log.info("learner finished at step %d (version %d)", self.trainer.step_count, self.trainer.version)

    async def _receive(self) -> RolloutBatch | None:
        with anyio.CancelScope() as scope:
            self.control._receive_scope = scope
            try:
                return await self.batches.receive()
            except anyio.EndOfStream:
                return None
            finally:
                self.control._receive_scope = None
        return None  # cancelled by stop()

    def _drop_stale(self, batch: RolloutBatch) -> RolloutBatch:
        """async mode: groups more than max_staleness versions behind are dropped (policy "drop") or kept for the
        trainer's capped importance weights (policy "cap"). Groups of unknown version (Atropos) are kept."""
        if self.max_staleness is None or self.stale_policy != "drop":
            return batch
        current = self.trainer.version
        fresh = [g for g in batch.groups if not g.versions or current - min(g.versions) <= self.max_staleness]
        dropped = len(batch.groups) - len(fresh)
        if not dropped:
            return batch
        self.state.dropped_stale += dropped
        log.info("dropped %d rollout group(s) more than %d versions old", dropped, self.max_staleness)
        return msgspec.structs.replace(batch, groups=fresh, dropped_stale=batch.dropped_stale + dropped)

    async def _step(self, batch: RolloutBatch) -> None:
        self.state.dropped_stale += batch.dropped_stale  # dropped upstream (the rollout buffer)
        batch = self._drop_stale(batch)
        if not batch.groups:
            if self.credits is not None:
                await self.credits.send(self.trainer.version)
            return
        self.state.learner_busy = True
        try:
            result = await self.thread.call(self.trainer.step, batch)
            adapter = None if result.skipped else await self.thread.call(self.trainer.adapter)
        finally:
            self.state.learner_busy = False
        if batch.source_state is not None:
            self.source_state = batch.source_state
        step, version = self.trainer.step_count, self.trainer.version
        metrics = dict(result.metrics)
        metrics["dropped_stale"] = float(batch.dropped_stale)
        if batch.source_step is not None:
            metrics["source_step"] = float(batch.source_step)
        done = StepFinished(step=step, version=version, metrics=metrics, skipped=result.skipped)
        if adapter is not None:
            await self.published.send(AdapterPublished(version=version, step=step, arrays=adapter, metrics=metrics))
        elif self.credits is not None:
            await self.credits.send(version)  # nothing to swap: the next rollout may start now
        await self.finished.send(done)
        self.control.step_done(done)
        if self.save_every_step or (self.checkpoint_interval and step % self.checkpoint_interval == 0):
            if step < self.total_steps:  # the final checkpoint is written on the way out
                await self._send_checkpoint(reply=None)

    async def _send_checkpoint(self, reply: ObjectSendStream[CheckpointWritten] | None) -> None:
        def snapshot() -> tuple[dict, dict | None, dict]:
            return self.trainer.adapter(), self.trainer.reference(), self.trainer.state()

        adapter, reference, trainer_state = await self.thread.call(snapshot)
        await self.checkpoints.send(
            SaveCheckpoint(
                step=self.trainer.step_count,
                version=self.trainer.version,
                adapter=adapter,
                reference=reference,
                optimizer_state=trainer_state["optimizer"],
                trainer_state={"trainer": trainer_state["trainer"], "metrics": self.state.last_metrics,
                               "source_state": self.source_state},
                reply=reply,
            )
        )

    async def checkpoint_now(self, final: bool = False) -> CheckpointWritten | None:
        """Snapshot the trainer between steps and wait until the checkpoint is on disk."""
        last = self.state.last_checkpoint
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
