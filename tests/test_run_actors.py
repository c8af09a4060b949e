"""Each actor of `paraloop run` driven through its own streams with small fakes, under a deadline, in the orders
in which events can arrive: pause, single step, stop and snapshot against a batch arriving or a step in flight;
stop during a swap; end of stream from the source; the sync-mode credit loop; a checkpoint requested while one
is being written."""

import itertools
import threading
from functools import partial
from pathlib import Path

import anyio
import pytest
from anyio import wait_all_tasks_blocked
from support.run_fakes import FakeEngine, FakeTrainer, FeedSource, InlineThread, LORA_CONFIG, Rig, batch, tags
from support import group, until

from paraloop.checkpoint import read_checkpoint, write_checkpoint
from paraloop.messages import (
    AdapterPublished,
    CheckpointWritten,
    RolloutBatch,
    SaveCheckpoint,
    StepFinished,
)
from paraloop.run.buffer import RolloutBuffer
from paraloop.run.checkpointer import run_checkpointer
from paraloop.run.control import ControlError, LearnerControl
from paraloop.run.fetcher import run_fetcher
from paraloop.run.journal import Consumed
from paraloop.run.learner import Learner
from paraloop.run.main import error_of
from paraloop.mlx_thread import MlxThread
from paraloop.run.publisher import run_publisher
from paraloop.run.status import RunStatus

DEADLINE = 10


def run(scenario) -> None:
    async def main() -> None:
        with anyio.fail_after(DEADLINE):
            await scenario()

    anyio.run(main)


# --- learner and /control -----------------------------------------------------------------------------------------


async def single_step(rig: Rig, answers: list[int]) -> None:
    """A single-step request (started in a task group): the step that answers it goes to `answers`."""
    answers.append((await rig.control.step_once()).step)


def test_a_pause_while_waiting_for_a_batch_holds_it_untrained_until_resume(tmp_path):
    async def scenario():
        rig = Rig(tmp_path)
        async with anyio.create_task_group() as tg:
            await tg.start(rig.run)
            await wait_all_tasks_blocked()  # the learner waits for a batch
            rig.control.pause()
            await rig.batches.send(batch(1, 2))
            await wait_all_tasks_blocked()
            assert rig.trainer.trained == [] and rig.status.step == 0, "a paused learner holds the batch"
            rig.control.resume()
            await until(lambda: rig.done == [1], "the held batch's step")
            assert tags(rig.trainer.trained[0]) == [1, 2]
            rig.control.stop()
        assert rig.saved[-1].step == 1 and rig.saved[-1].reply is not None, "the final checkpoint"

    run(scenario)


EVENTS = ("pause", "step", "batch", "stop")


def expected(order: tuple[str, ...]) -> tuple[int, str]:
    """What the learner must do for events in `order`: (batches trained, the /control/step answer)."""
    paused = stopping = held = False
    permits = trained = 0
    answer = "none"
    for event in order:
        if event == "pause":
            paused = True
        elif event == "step":
            if not paused or stopping:
                answer = "409"
            else:
                permits, answer = permits + 1, "waiting"
                if held:
                    held, permits, trained, answer = False, permits - 1, trained + 1, "step 1"
        elif event == "batch":
            if stopping:
                continue  # the learner has gone
            if paused and not permits:
                held = True
            else:
                trained += 1
                if paused:
                    permits, answer = permits - 1, "step 1"
        elif event == "stop":
            stopping = True
            if answer == "waiting":
                answer = "409"  # the run stopped before another step
    return trained, answer


@pytest.mark.parametrize("order", list(itertools.permutations(EVENTS)), ids="-".join)
def test_pause_step_stop_and_a_batch_in_every_order(tmp_path, order):
    """Whatever the order, the learner ends, trains exactly what the rules allow, and /control/step is answered."""

    async def scenario():
        rig = Rig(tmp_path)
        answer = ["none"]

        async def step() -> None:
            answer[0] = "waiting"
            try:
                done = await rig.control.step_once()
                answer[0] = f"step {done.step}"
            except ControlError:
                answer[0] = "409"

        async with anyio.create_task_group() as tg:
            await tg.start(rig.run)
            for event in order:
                await wait_all_tasks_blocked()
                if event == "pause":
                    rig.control.pause()
                elif event == "step":
                    tg.start_soon(step)
                elif event == "batch":
                    try:
                        rig.batches.send_nowait(batch(1, 2))
                    except anyio.BrokenResourceError:
                        pass  # the learner has already stopped
                elif event == "stop":
                    rig.control.stop()
            await wait_all_tasks_blocked()
        trained, want = expected(order)
        assert len(rig.trainer.trained) == trained
        assert answer[0] == want
        assert rig.saved and rig.saved[-1].step == trained, "a final checkpoint of what was trained"

    run(scenario)


def test_a_stop_during_a_step_ends_the_learner_after_it_without_waiting_for_another_batch(tmp_path):
    """Regression: a stop that came while the step ran left the learner waiting for a batch that (from a quiet
    Atropos environment) might never come."""

    async def scenario():
        thread = InlineThread()
        thread.gate = anyio.Event()
        rig = Rig(tmp_path, thread=thread)
        async with anyio.create_task_group() as tg:
            await tg.start(rig.run)
            await rig.batches.send(batch(1, 2))
            await until(lambda: thread.entered == 1, "the step to start")
            rig.control.stop()
            thread.gate.set()
            await rig.ended.wait()
        assert rig.done == [1] and rig.saved[-1].step == 1

    run(scenario)


def test_a_single_step_permit_spent_on_an_all_stale_batch_waits_for_the_next_batch(tmp_path):
    async def scenario():
        rig = Rig(tmp_path, trainer=FakeTrainer(step_count=5), max_staleness=0)
        stale = RolloutBatch(groups=[group([0.0, 1.0], version=3)], source="mock")
        answers = []
        async with anyio.create_task_group() as tg:
            await tg.start(rig.run)
            rig.control.pause()
            tg.start_soon(single_step, rig, answers)
            await wait_all_tasks_blocked()
            await rig.batches.send(stale)
            await wait_all_tasks_blocked()
            assert rig.trainer.trained == [] and rig.status.dropped_stale == 1
            await rig.batches.send(batch(2, 3, source="mock"))
            await until(lambda: answers, "the single step")
            rig.control.stop()
        assert answers == [6] and len(rig.trainer.trained) == 1

    run(scenario)


def test_two_single_steps_take_two_steps_each_answered_with_its_own(tmp_path):
    async def scenario():
        rig = Rig(tmp_path)
        answers = []
        async with anyio.create_task_group() as tg:
            await tg.start(rig.run)
            rig.control.pause()
            tg.start_soon(single_step, rig, answers)
            tg.start_soon(single_step, rig, answers)
            for tag in (1, 2, 3):
                await wait_all_tasks_blocked()
                with anyio.move_on_after(0.2):
                    await rig.batches.send(batch(tag, tag))
            await wait_all_tasks_blocked()
            assert sorted(answers) == [1, 2] and len(rig.trainer.trained) == 2, "two permits, two steps, no more"
            rig.control.stop()

    run(scenario)


def test_a_snapshot_during_a_step_is_of_that_step_with_its_own_source_position(tmp_path):
    """Regression: a /control/snapshot queued behind a running step got the trainer after the step but the
    source position (and journal) from before it, so a resume would have replayed a batch."""

    class HeldTrainer(FakeTrainer):
        release = threading.Event()

        def step(self, b):
            self.release.wait(DEADLINE)
            return super().step(b)

    async def scenario():
        thread = MlxThread("test-learner")
        rig = Rig(tmp_path, trainer=HeldTrainer(), thread=thread, consumed=Consumed())
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(rig.run)
                await rig.batches.send(batch(1, 2, source_state={"next_group": 2}, consumes=[(0, 0, 2), (0, 1, 2)]))
                await until(lambda: rig.status.learner_busy, "the step to start")
                written = []
                tg.start_soon(lambda: _append(written, rig.control.snapshot()))
                await wait_all_tasks_blocked()  # the snapshot now waits behind the step (for the learner's state)
                HeldTrainer.release.set()
                await until(lambda: written, "the snapshot")
                rig.control.stop()
        finally:
            thread.close()
        snap = next(s for s in rig.saved if s.step == written[0].step)
        assert snap.step == 1
        assert snap.trainer_state["source_state"] == {"next_group": 2}
        assert snap.trainer_state["journal"] == {"below": 1, "partial": {}}

    run(scenario)


async def _append(out: list, awaitable) -> None:
    out.append(await awaitable)


# --- publisher ------------------------------------------------------------------------------------------------------


def test_a_stop_during_a_swap_ends_the_run_after_the_swap_is_applied(tmp_path):
    async def scenario():
        engine = FakeEngine(gate=anyio.Event())
        rig = Rig(tmp_path, engine=engine)
        async with anyio.create_task_group() as tg:
            await tg.start(rig.run)
            await rig.batches.send(batch(1, 2))
            await until(lambda: rig.status.swap_pending_since is not None, "the swap to be handed over")
            rig.control.stop()
            await rig.ended.wait()  # the learner wrote its final checkpoint and closed its outbox
            assert engine.swaps == [] and rig.saved[-1].step == 1
            engine.gate.set()
        assert engine.swaps == [1] and rig.status.serving_version == 1, "the last adapter still went live"
        assert rig.status.swap_pending_since is None

    run(scenario)


def test_a_failing_swap_raises_out_of_the_publisher(tmp_path):
    async def scenario():
        rig = Rig(tmp_path, engine=FakeEngine(fail_swap=ValueError("adapter shapes differ")))
        async with anyio.create_task_group() as tg:
            await tg.start(rig.run)
            await rig.batches.send(batch(1, 2))

    with pytest.raises(BaseExceptionGroup) as info:
        run(scenario)
    assert isinstance(error_of(info.value), ValueError) and "adapter shapes differ" in str(error_of(info.value))


# --- fetcher and buffer ---------------------------------------------------------------------------------------------


def test_end_of_stream_from_the_source_trains_what_is_left_and_ends_the_learner(tmp_path):
    async def scenario():
        rig = Rig(tmp_path)
        source = FeedSource()
        buffer = RolloutBuffer(batch_size=4)
        async with anyio.create_task_group() as tg:
            await tg.start(rig.run)
            tg.start_soon(lambda: run_fetcher(source, rig.batches, buffer=buffer, version=lambda: 0, credits=None))
            await source.send.send(batch(1, 2))
            await source.send.send(batch(3))
            source.send.close()
            await rig.ended.wait()
        assert [tags(b) for b in rig.trainer.trained] == [[1, 2], [3]], "the partial batch is trained too"
        assert rig.saved[-1].step == 2

    run(scenario)


def test_the_sync_credit_loop_fetches_each_batch_only_once_the_previous_adapter_serves(tmp_path):
    async def scenario():
        engine = FakeEngine()
        status = RunStatus(total_steps=4, mode="sync", run_dir=str(tmp_path))
        control = LearnerControl(status)
        trainer = FakeTrainer()
        batches_send, batches_recv = anyio.create_memory_object_stream[RolloutBatch](1)
        published_send, published_recv = anyio.create_memory_object_stream[AdapterPublished](1)
        ckpt_send, ckpt_recv = anyio.create_memory_object_stream[SaveCheckpoint](2)
        finished_send, finished_recv = anyio.create_memory_object_stream[StepFinished](64)
        credits_send, credits_recv = anyio.create_memory_object_stream[int](1)
        learner = Learner(
            trainer,
            InlineThread(),
            status=status,
            control=control,
            total_steps=4,
            checkpoint_interval=0,
            save_every_step=False,
            batches=batches_recv,
            published=published_send,
            checkpoints=ckpt_send,
            finished=finished_send,
            credits=credits_send.clone(),
        )
        serving_at_pull = []

        async def source():
            for tag in range(1, 100):
                serving_at_pull.append(engine.version)
                yield batch(tag, tag)

        async def checkpoints():
            async for request in ckpt_recv:
                if request.reply is not None:
                    async with request.reply:
                        await request.reply.send(CheckpointWritten(step=request.step, path="p"))

        async def drain():
            async for _ in finished_recv:
                pass

        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: run_fetcher(
                    source(),
                    batches_send,
                    buffer=RolloutBuffer(batch_size=4),
                    version=lambda: trainer.version,
                    credits=credits_recv,
                )
            )
            async with anyio.create_task_group() as training:
                training.start_soon(learner.run)
                training.start_soon(
                    lambda: run_publisher(
                        published_recv, engine=engine, status=status, credits=credits_send, drain=True
                    )
                )
                training.start_soon(checkpoints)
                training.start_soon(drain)
            await wait_all_tasks_blocked()
            tg.cancel_scope.cancel()
        assert engine.swaps == [1, 2, 3, 4]
        # Batch k was generated while adapter k-1 served: never ahead of the newest adapter.
        assert serving_at_pull[:4] == [0, 1, 2, 3]
        assert len(serving_at_pull) <= 5

    run(scenario)


def test_the_buffer_regroups_and_reorders_but_every_journaled_group_is_consumed_once():
    buffer = RolloutBuffer(batch_size=4, priority="abs_advantage")
    source_batches = [
        RolloutBatch(
            groups=[group((0.0, 1.0) if i % 2 else (1.0, 1.0), prompt=[10 * b + i]) for i in range(3)], source="atropos"
        )
        for b in range(4)
    ]
    consumed = []
    for seq, b in enumerate(source_batches):
        buffer.put_batch(b, journal_seq=seq)
        while (taken := buffer.take()) is not None:
            assert len(taken.consumes) == len(taken.groups)
            consumed += taken.consumes
    while (taken := buffer.take(partial=True)) is not None:
        consumed += taken.consumes
    assert sorted(consumed) == [(s, i, 3) for s in range(4) for i in range(3)]


def test_replayed_groups_are_taken_before_anything_fetched_later():
    buffer = RolloutBuffer(batch_size=2, priority="abs_advantage")
    buffer.put(group([0.0, 0.0], prompt=[1]), journal_id=(7, 0, 1), replayed=True)  # no signal, yet first
    buffer.put(group([0.0, 1.0], prompt=[2]), journal_id=(8, 0, 1))
    buffer.put(group([0.0, 1.0], prompt=[3]), journal_id=(9, 0, 1), replayed=True)
    assert tags(buffer.take()) == [3]  # two replayed groups of 2 sequences: one per batch
    assert tags(buffer.take()) == [1]
    assert tags(buffer.take()) == [2]


# --- checkpointer ---------------------------------------------------------------------------------------------------


def snapshot(step: int, reply=None) -> SaveCheckpoint:
    trainer = FakeTrainer(step_count=step)
    state = trainer.state()
    return SaveCheckpoint(
        step=step,
        version=step,
        adapter=trainer.adapter(),
        reference=None,
        optimizer_state=state["optimizer"],
        trainer_state={"trainer": state["trainer"]},
        reply=reply,
    )


def checkpointer(inbox, run_dir: Path, status: RunStatus, **options):
    """The checkpointer on `inbox` (to start in a task group), writing safetensors adapters under `run_dir`."""
    return partial(
        run_checkpointer,
        inbox,
        run_dir=str(run_dir),
        adapter_config=LORA_CONFIG,
        adapter_format="safetensors",
        keep_last=None,
        config={},
        status=status,
        **options,
    )


def test_a_checkpoint_requested_while_one_is_being_written_is_written_after_it(tmp_path):
    release = threading.Event()

    def slow_write(*args, **kwargs):
        release.wait(DEADLINE)
        return write_checkpoint(*args, **kwargs)

    async def scenario():
        status = RunStatus(total_steps=10, mode="sync", run_dir=str(tmp_path))
        send, receive = anyio.create_memory_object_stream[SaveCheckpoint](2)
        reply_send, reply_receive = anyio.create_memory_object_stream[CheckpointWritten](1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(checkpointer(receive, tmp_path, status, write=slow_write))
            await send.send(snapshot(1))  # periodic: nobody waits for it
            await until(lambda: status.checkpoint_writing_since is not None, "the first write")
            await send.send(snapshot(2, reply=reply_send))  # /control/snapshot while step 1 is written
            release.set()
            async with reply_receive:
                written = await reply_receive.receive()
            send.close()
        assert written.step == 2 and written.error is None and Path(written.path).name == "step_000002"
        assert read_checkpoint(tmp_path / "checkpoints" / "step_000001").step == 1
        assert read_checkpoint(tmp_path).step == 2 and status.last_checkpoint == written.path

    run(scenario)


def test_a_read_only_checkpoint_directory_is_reported_retried_and_leaves_nothing_partial(tmp_path, monkeypatch, caplog):
    """Read-only, injected in-process at the rename that publishes a checkpoint (chmod does not stop root)."""
    import errno
    import os

    import paraloop.checkpoint as ckpt

    real_rename = os.rename
    read_only = [True]

    def rename(src, dst):
        if read_only[0]:
            raise OSError(errno.EROFS, "Read-only file system", str(dst))
        return real_rename(src, dst)

    monkeypatch.setattr(ckpt.os, "rename", rename)
    monkeypatch.setattr("paraloop.run.checkpointer.FIRST_BACKOFF_S", 0.05)

    async def scenario():
        status = RunStatus(total_steps=10, mode="sync", run_dir=str(tmp_path))
        send, receive = anyio.create_memory_object_stream[SaveCheckpoint](2)
        reply_send, reply_receive = anyio.create_memory_object_stream[CheckpointWritten](1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(checkpointer(receive, tmp_path, status))
            await send.send(snapshot(3, reply=reply_send))
            async with reply_receive:
                failed = await reply_receive.receive()
            assert failed.error and "Read-only" in failed.error and failed.path == ""
            await until(lambda: status.checkpoint_error and status.checkpoint_error["failures"] >= 2, "retries")
            leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir()]
            assert leftovers == [], f"a failed write leaves nothing: {leftovers}"
            read_only[0] = False
            await until(lambda: status.checkpoint_error is None, "the retried write")
            send.close()
        assert read_checkpoint(tmp_path).step == 3 and status.last_checkpoint.endswith("step_000003")

    with caplog.at_level("ERROR", logger="paraloop.checkpointer"):
        run(scenario)
    assert sum("could not be written" in r.getMessage() for r in caplog.records) == 1, "logged once per streak"
