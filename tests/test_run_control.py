"""/control's state machine and routes, driven over real HTTP with a scripted learner: single steps (and their
timeout), pause racing a step in flight, stop waking waiters, the 409s of /control/snapshot, and the run status
that /control/status and /metrics read (rejected_groups included)."""

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import anyio
import pytest

from support import group, scored_data, until

from paraloop.atropos.client import AtroposClient
from paraloop.config import AtroposConfig, Settings
from paraloop.messages import CheckpointWritten, StepFinished
from paraloop.run.control import LearnerControl, control_routes, run_families
from paraloop.run.status import RunStatus
from paraloop.server.app import make_app, start_http
from paraloop.server.metrics import Metrics

DEADLINE_S = 20


class ScriptedLearner:
    """The learner's side of LearnerControl, one step per batch the test hands it (the real loop: receive a
    batch, wait for its turn, step, report)."""

    def __init__(self, control: LearnerControl) -> None:
        self.control = control
        self.send, self.batches = anyio.create_memory_object_stream[int](8)
        self.steps = 0
        self.taken = 0  # batches received
        self.at_gate = False  # waiting in wait_turn with its last batch
        self.stepping = anyio.Event()  # set while a step "computes"; the test ends it with finish_step
        self._finish = anyio.Event()

    async def run(self, *, hold_steps: bool = False, before_compute_s: float = 0.0) -> None:
        async for _ in self.batches:
            self.taken, self.at_gate = self.taken + 1, True
            if not await self.control.wait_turn():
                return
            self.at_gate = False
            await anyio.sleep(before_compute_s)  # a turn taken before the compute (the trainer's lock, a gather)
            self.control.status.learner_busy = True
            if hold_steps:
                self.stepping.set()
                await self._finish.wait()
                self.stepping, self._finish = anyio.Event(), anyio.Event()
            self.steps += 1
            self.control.status.learner_busy = False
            self.control.step_done(StepFinished(step=self.steps, version=self.steps, metrics={"loss": 0.5}))

    def finish_step(self) -> None:
        self._finish.set()


@asynccontextmanager
async def control_server(
    *, hold_steps: bool = False, before_compute_s: float = 0.0
) -> AsyncIterator[tuple[Any, LearnerControl, ScriptedLearner]]:
    status = RunStatus(total_steps=100, mode="sync", run_dir="runs/x")
    control = LearnerControl(status)
    learner = ScriptedLearner(control)
    app = make_app(None, settings=Settings(), extra_routes=control_routes(status, control))
    runner, port = await start_http(app, "127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http, anyio.create_task_group() as tg:
            tg.start_soon(lambda: learner.run(hold_steps=hold_steps, before_compute_s=before_compute_s))
            yield http, control, learner
            tg.cancel_scope.cancel()
    finally:
        await runner.cleanup()


async def post(http: aiohttp.ClientSession, path: str) -> tuple[int, dict]:
    async with http.post(path) as resp:
        return resp.status, await resp.json()


async def single_step(http: aiohttp.ClientSession, answers: list, query: str = "?timeout=10") -> None:
    """POST /control/step (started in a task group): its (status, body) goes to `answers`."""
    answers.append(await post(http, f"/control/step{query}"))


def scenario(fn: Callable[..., Awaitable[None]], **server: Any) -> None:
    async def main() -> None:
        with anyio.fail_after(DEADLINE_S):
            async with control_server(**server) as (http, control, learner):
                await fn(http, control, learner)

    anyio.run(main)


async def held(learner: ScriptedLearner, batch: int) -> bool:
    """True when the learner, having received its `batch`-th batch, waits at the gate (wait_turn) once every task
    is blocked: the step it would take were the gate open has had every chance to start."""
    await until(
        lambda: learner.taken == batch and learner.at_gate,
        f"the learner at the gate with batch {batch}",
        within=DEADLINE_S / 2,
    )
    await anyio.wait_all_tasks_blocked()
    return learner.at_gate


def test_a_single_step_waits_for_a_batch_and_answers_its_metrics():
    async def run(http, control, learner):
        assert (await post(http, "/control/step"))[0] == 409  # not paused
        control.pause()
        answers = []

        async with anyio.create_task_group() as tg:
            tg.start_soon(single_step, http, answers)
            await until(control.may_step, "the single-step request to wait")  # no batch yet
            await learner.send.send(1)
        status, body = answers[-1]
        assert status == 200 and body == {"step": 1, "adapter_version": 1, "skipped": False, "metrics": {"loss": 0.5}}
        await learner.send.send(2)  # paused again: this batch is held, no second step
        assert await held(learner, 2) and learner.steps == 1

    scenario(run)


def test_a_single_step_without_rollouts_times_out_504_and_leaves_nothing_behind():
    async def run(http, control, learner):
        control.pause()
        status, body = await post(http, "/control/step?timeout=0.2")
        assert status == 504
        assert body["error"]["code"] == "step_timeout" and body["error"]["param"] == "timeout"
        assert body["error"]["type"] == "timeout_error" and "no step was taken" in body["error"]["message"]
        await learner.send.send(1)  # a batch after the timeout: the withdrawn request takes no step
        assert await held(learner, 1) and learner.steps == 0

    scenario(run)


@pytest.mark.parametrize("value", ["0", "-1", "abc", "nan", "inf", "1e9"])
def test_a_bad_step_timeout_is_400_naming_it(value):
    async def run(http, control, learner):
        control.pause()
        status, body = await post(http, f"/control/step?timeout={value}")
        assert status == 400 and body["error"]["param"] == "timeout", body

    scenario(run)


def test_a_step_in_flight_at_pause_does_not_answer_a_later_single_step():
    async def run(http, control, learner):
        await learner.send.send(1)
        await learner.stepping.wait()  # step 1 computes, started before the pause
        control.pause()
        answers = []

        async with anyio.create_task_group() as tg:
            tg.start_soon(single_step, http, answers)
            await until(control.may_step, "the single-step request to wait")
            learner.finish_step()  # step 1 ends: it was not asked for
            await until(lambda: learner.steps == 1, "step 1 to end")
            assert control.may_step() and not answers, (
                "the step in flight answered a single-step request made after it began"
            )
            await learner.send.send(2)
            await learner.stepping.wait()
            learner.finish_step()
        assert answers == [(200, {"step": 2, "adapter_version": 2, "skipped": False, "metrics": {"loss": 0.5}})]

    scenario(run, hold_steps=True)


def test_the_pause_holds_once_no_step_is_decided_or_computing():
    async def run(http, control, learner):
        await learner.send.send(1)
        await learner.stepping.wait()
        control.pause()  # step 1 computes: the pause has not taken hold yet
        assert control.status.paused and not control.status.learner_held
        learner.finish_step()
        await until(lambda: control.status.learner_held, "the pause to hold")
        assert learner.steps == 1
        answers = []

        async with anyio.create_task_group() as tg:
            tg.start_soon(single_step, http, answers)
            await learner.send.send(2)
            await learner.stepping.wait()
            assert not control.status.learner_held, "a single step computes"
            learner.finish_step()
        assert answers[0][0] == 200 and control.status.learner_held
        assert (await post(http, "/control/resume"))[0] == 200 and not control.status.learner_held
        assert (await post(http, "/control/pause"))[0] == 200 and control.status.learner_held, "no batch waits"

    scenario(run, hold_steps=True)


@pytest.mark.parametrize("ending", ["timeout", "stop"])
def test_a_single_step_the_learner_took_is_answered_even_before_it_computes(ending):
    """The learner took the turn (its trainer lock or a distributed run's gather comes before the compute): the
    step will be taken, so neither the request's timeout nor a stop withdraws it."""

    async def run(http, control, learner):
        control.pause()
        answers = []

        async with anyio.create_task_group() as tg:
            tg.start_soon(single_step, http, answers, "?timeout=0.3")
            await until(control.may_step, "the single-step request to wait")
            await learner.send.send(1)  # the turn is taken now; the compute starts 0.6 s later
            await until(lambda: not control.status.learner_held, "the learner to take its turn")
            if ending == "stop":
                control.stop()
        assert learner.steps == 1
        assert answers == [(200, {"step": 1, "adapter_version": 1, "skipped": False, "metrics": {"loss": 0.5}})]

    scenario(run, before_compute_s=0.6)


def test_stop_answers_a_waiting_single_step_409_at_once():
    async def run(http, control, learner):
        control.pause()
        answers = []

        async with anyio.create_task_group() as tg:
            tg.start_soon(single_step, http, answers, "")  # the default timeout: 600 s
            await until(control.may_step, "the single-step request to wait")
            control.stop()
        status, body = answers[0]
        assert status == 409 and "stopping" in body["error"]["message"]
        assert not await control.wait_turn()  # and the learner is told to stop

    scenario(run)


def test_snapshot_answers_409_when_no_learner_runs_or_the_run_stops():
    async def run(http, control, learner):
        status, body = await post(http, "/control/snapshot")  # the learner has not registered yet
        assert status == 409 and body["error"]["message"] == "the learner is not running"

        async def written() -> CheckpointWritten | None:
            return CheckpointWritten(step=3, path="runs/x/checkpoints/step_000003")

        control.snapshot = written
        assert await post(http, "/control/snapshot") == (200, {"step": 3, "path": "runs/x/checkpoints/step_000003"})

        async def shutting_down() -> None:
            return None  # what checkpoint_now answers once the checkpointer has closed

        control.snapshot = shutting_down
        status, body = await post(http, "/control/snapshot")
        assert status == 409 and "final checkpoint" in body["error"]["message"]
        control.snapshot = written
        control.stop()
        status, body = await post(http, "/control/snapshot")
        assert status == 409 and body["error"]["code"] == "conflict"

    scenario(run)


def wire_group(**changes: Any) -> dict:
    return scored_data(group([1.0, 0.0], prompt=[11, 12, 13], completions=[[40], [50, 51]], env_id=3), **changes)


def test_rejected_groups_counts_what_the_atropos_client_rejects():
    async def main() -> dict:
        # nothing listens on port 9: the client's /status call after the batch fails fast and is only logged
        client = AtroposClient(
            AtroposConfig(api_url="http://127.0.0.1:9"),
            batch_size=4,
            token_budget=512,
            total_steps=2,
            checkpoint_dir="runs/x",
        )
        ragged = wire_group(masks=[[-100, -100, -100, 40]])  # one mask row for two sequences
        batch = await client._translate([wire_group(), ragged, wire_group(scores=[float("nan"), 1.0])])
        assert batch is not None and len(batch.groups) == 1
        return client

    client = anyio.run(main)
    status = RunStatus(total_steps=2, mode="sync", run_dir="runs/x", source_status=client.status)
    assert status.snapshot()["rejected_groups"] == 2
    metrics = Metrics()
    metrics.add_collector(lambda: run_families(status))
    assert "paraloop_rejected_groups_total 2.0" in metrics.text().decode().splitlines()
    assert status.snapshot()["source"]["per_env"]["3"]["rejected"] == 2
