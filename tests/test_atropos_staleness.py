"""max_staleness acts on Atropos rollouts in both modes, and a step whose groups are all dropped as stale trains
later instead of ending the run: the Atropos client fetches for as long as the run asks, not total_steps batches.

The run's actors on fakes (trainer, engine) with the real AtroposClient against an in-process fake of run-api that
hands out four batches, one per /batch call; the engine's ServedIndex knows which adapter version sampled each.
Batch 2 was sampled by adapter 0 and arrives when adapter 1 trains: with max_staleness = 0 it is dropped, so three
steps need all four batches. A client that stopped after total_steps (3) batches ended the run at step 2 with exit
0; in a distributed run rank 0's ended source stopped every rank at that step.
"""

import threading
from functools import partial

import anyio
import numpy as np
import pytest
from aiohttp import web
from support.run_fakes import LORA_CONFIG, FakeEngine, FakeTrainer, InlineThread, Rig, Run, settings
from support import group as support_group

from paraloop.atropos.client import AtroposClient
from paraloop.config import AtroposConfig
from paraloop.engine.served import ServedIndex
from paraloop.messages import AdapterPublished, CheckpointWritten, RolloutBatch, SaveCheckpoint, StepFinished
from paraloop.mlx_thread import MlxThread
from paraloop.run.buffer import RolloutBuffer
from paraloop.run.control import LearnerControl
from paraloop.run.fetcher import run_fetcher
from paraloop.run.learner import Learner
from paraloop.run.publisher import run_publisher
from paraloop.run.ranks import Coordinator
from paraloop.run.status import RunStatus
from paraloop.run.wiring import Parts

DEADLINE = 30
STEPS = 3
VERSIONS = [0, 0, 1, 2]  # the adapter that sampled batch 1, 2, 3, 4 (batch 2 arrives when adapter 1 trains)


def group(tag: int) -> dict:
    return {"tokens": [[tag, 5, 6], [tag, 5, 7]], "masks": [[-100, 5, 6], [-100, 5, 7]], "scores": [1.0, 0.0]}


class FakeApi:
    """run-api's trainer routes: /batch hands out batch k = groups (2k-1, 2k) once each, in order, then null."""

    def __init__(self) -> None:
        self.batches = [[group(2 * k + 1), group(2 * k + 2)] for k in range(len(VERSIONS))]
        self.handed = 0

    async def batch(self, request: web.Request) -> web.Response:
        if self.handed == len(self.batches):
            return web.json_response({"batch": None})
        self.handed += 1
        return web.json_response({"batch": self.batches[self.handed - 1]})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/register", lambda r: web.json_response({"uuid": 1234}))
        app.router.add_get("/batch", self.batch)
        app.router.add_get("/info", lambda r: web.json_response({"batch_size": 4, "max_token_len": 512}))
        app.router.add_get("/status", lambda r: web.json_response({"current_step": self.handed, "queue_size": 0}))
        return app


def served() -> ServedIndex:
    """What the engine recorded while serving: each batch's completions with the adapter version that sampled them."""
    index = ServedIndex(64)
    for k, version in enumerate(VERSIONS):
        for tag in (2 * k + 1, 2 * k + 2):
            for completion in ([5, 6], [5, 7]):
                index.record([tag], completion, [version, version], [0, 0], stopped=False)
    return index


async def serve_api(api: FakeApi) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(api.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def client(url: str, tmp_path) -> AtroposClient:
    return AtroposClient(
        AtroposConfig(api_url=url, poll_interval=0.01, max_backoff=0.05),
        batch_size=4,
        token_budget=4096,
        total_steps=STEPS,
        checkpoint_dir=str(tmp_path),
        served=served(),
    )


def tags(batch: RolloutBatch) -> list[int]:
    return [g.tokens[0][0] for g in batch.groups]


def run(scenario) -> None:
    async def main() -> None:
        with anyio.fail_after(DEADLINE):
            await scenario()

    anyio.run(main)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_step_whose_groups_are_all_stale_is_reported_and_the_run_trains_every_step(tmp_path, mode):
    trainer, engine, api, runs = FakeTrainer(), FakeEngine(), FakeApi(), []

    async def scenario():
        runner, url = await serve_api(api)
        try:
            source = client(url, tmp_path)
            config = settings(
                tmp_path,
                rl_training={"mode": mode, "total_steps": STEPS, "max_staleness": 0, "atropos": {"api_url": url}},
            )
            runs.append(
                Run(
                    config,
                    Parts(
                        trainer=trainer,
                        thread=InlineThread(),
                        engine=engine,
                        source=source.batches(),
                        source_status=source.status,
                        adapter_config=LORA_CONFIG,
                    ),
                )
            )
            await runs[0]()
        finally:
            await runner.cleanup()

    run(scenario)
    assert runs[0].error is None, runs[0].error
    assert [tags(b) for b in trainer.trained] == [[1, 2], [5, 6], [7, 8]], "batch 2 dropped, not the run's end"
    versions = [g.versions for b in trainer.trained for g in b.groups]
    assert versions == [[0, 0]] * 2 + [[1, 1]] * 2 + [[2, 2]] * 2, "each trained by the adapter that sampled it"
    assert trainer.step_count == STEPS and engine.swaps == [1, 2, 3]
    status = runs[0].status
    assert status.dropped_stale == 2
    assert [h["dropped_stale"] for h in status.history] == [0.0, 2.0, 0.0], "step 2 reports the groups dropped"


# --- two ranks in one process ------------------------------------------------------------------------------------


class Exchange:
    """The ranks' collectives in one process: each rank's learner thread puts its value and blocks until every
    rank has, as MLX's all-gather does (a rank that never comes breaks the barrier after the deadline)."""

    def __init__(self, size: int) -> None:
        self.barrier = threading.Barrier(size, timeout=DEADLINE)
        self.slots: list = [None] * size

    def all(self, rank: int, value):
        self.slots[rank] = value
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before every rank has read them all
        return out


class ThreadRanks:
    """distributed.Ranks' collectives, over an Exchange."""

    def __init__(self, exchange: Exchange, rank: int, size: int) -> None:
        self.exchange, self.rank, self.size = exchange, rank, size

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def table(self, row: np.ndarray, name: str = "table") -> np.ndarray:
        return np.stack(self.exchange.all(self.rank, row))

    def gather(self, blob: bytes, name: str = "gather") -> list[bytes]:
        return self.exchange.all(self.rank, blob)

    def differing(self, value: str, name: str = "compare") -> tuple[list[int], list[str]]:
        values = self.exchange.all(self.rank, value)
        return [r for r, v in enumerate(values) if v != values[0]], values


async def rank(r: int, ranks: ThreadRanks, tmp_path, url: str | None, results: dict) -> None:
    """One rank's learner, publisher and (rank 0) fetcher, as run/wiring.py wires a sync-mode rank."""
    trainer, engine, thread = FakeTrainer(), FakeEngine(), MlxThread(f"rank{r}")
    status = RunStatus(total_steps=STEPS, mode="sync", run_dir=str(tmp_path))
    control = LearnerControl(status)
    batches_send, batches_recv = anyio.create_memory_object_stream[RolloutBatch](1)
    published_send, published_recv = anyio.create_memory_object_stream[AdapterPublished](1)
    ckpt_send, ckpt_recv = anyio.create_memory_object_stream[SaveCheckpoint](2)
    finished_send, finished_recv = anyio.create_memory_object_stream[StepFinished](64)
    credits_send, credits_recv = anyio.create_memory_object_stream[int](1) if url else (None, None)
    coordinator = Coordinator(
        ranks, thread, status, control, source=url is not None, checksum_interval=1, run_dir=tmp_path / f"rank{r}"
    )
    learner = Learner(
        trainer,
        thread,
        status=status,
        control=control,
        total_steps=STEPS,
        checkpoint_interval=0,
        save_every_step=False,
        batches=batches_recv,
        published=published_send,
        checkpoints=ckpt_send,
        finished=finished_send,
        credits=credits_send.clone() if credits_send else None,
        max_staleness=0,
        ranks=coordinator,
    )

    async def checkpoints() -> None:
        async for request in ckpt_recv:
            if request.reply is not None:
                async with request.reply:
                    await request.reply.send(CheckpointWritten(step=request.step, path=f"step_{request.step}"))

    async def finished() -> None:
        async for done in finished_recv:
            status.record_step(done)

    try:
        async with anyio.create_task_group() as tg:
            if url is not None:
                buffer = RolloutBuffer(batch_size=4, max_staleness=0)
                tg.start_soon(
                    partial(
                        run_fetcher,
                        client(url, tmp_path).batches(),
                        batches_send,
                        buffer=buffer,
                        version=lambda: trainer.version,
                        credits=credits_recv,
                    )
                )
            else:
                batches_send.close()  # a follower makes no rollouts: the coordinator brings rank 0's
            async with anyio.create_task_group() as training:
                training.start_soon(learner.run)
                training.start_soon(
                    partial(
                        run_publisher, published_recv, engine=engine, status=status, credits=credits_send, drain=True
                    )
                )
                training.start_soon(checkpoints)
                training.start_soon(finished)
            tg.cancel_scope.cancel()
    finally:
        thread.close()
    results[r] = (trainer, status)


def test_on_two_ranks_a_step_whose_groups_are_all_stale_on_rank_0_does_not_end_either_rank(tmp_path):
    api, results = FakeApi(), {}

    async def scenario():
        runner, url = await serve_api(api)
        exchange = Exchange(2)
        try:
            async with anyio.create_task_group() as tg:
                for r in (0, 1):
                    tg.start_soon(rank, r, ThreadRanks(exchange, r, 2), tmp_path, url if r == 0 else None, results)
        finally:
            await runner.cleanup()

    run(scenario)
    for r in (0, 1):
        trainer, status = results[r]
        assert [tags(b) for b in trainer.trained] == [[1, 2], [5, 6], [7, 8]], f"rank {r}"
        assert trainer.step_count == STEPS and status.history[1]["dropped_stale"] == 2.0, f"rank {r}"


def test_groups_of_a_batch_the_learner_dropped_whole_are_reported_with_the_next_step(tmp_path):
    """async mode: a batch taken fresh may be stale by the time the learner gets to it; dropped whole, it trains no
    step, and its groups count in the next step's dropped_stale (not only in the status)."""
    rig = Rig(tmp_path, total_steps=3, trainer=FakeTrainer(step_count=2), max_staleness=0, mode="async")
    stale = RolloutBatch(
        groups=[support_group((0.0, 1.0), prompt=(1,), version=1), support_group((0.0, 1.0), prompt=(2,), version=1)],
        source="atropos",
        dropped_stale=1,
    )  # one more dropped upstream, before this batch was formed
    fresh = RolloutBatch(
        groups=[support_group((0.0, 1.0), prompt=(3,), version=2), support_group((0.0, 1.0), prompt=(4,), version=2)],
        source="atropos",
    )

    async def scenario():
        async with anyio.create_task_group() as tg:
            await tg.start(rig.run)
            await rig.batches.send(stale)
            await rig.batches.send(fresh)  # the learner's streams close when it ends, and the rig's tasks with them

    run(scenario)
    (done,) = rig.steps
    assert [tags(b) for b in rig.trainer.trained] == [[3, 4]] and done.step == 3
    assert done.metrics["dropped_stale"] == 3.0 and rig.status.dropped_stale == 3
