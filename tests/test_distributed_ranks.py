"""The pieces of a distributed run without a second process: the step-boundary decision, how the ranks' parts of a
batch are split and merged, the start state's configuration check, the watcher's heartbeats and deadlines, and
`paraloop launch`'s hosts and commands."""

import argparse
import json
import time

import anyio
import msgspec
import numpy as np
import pytest
from aiohttp import web

from paraloop.config import load_config
from paraloop.distributed import InFlight, PeerLost, RanksDiverged, chunk
from support import group, until

from paraloop.messages import RolloutBatch, StepFinished
from paraloop.run import launch
from paraloop.run.control import LearnerControl
from paraloop.run.peers import Watcher
from paraloop.run.ranks import (
    ENDED,
    FIELDS,
    MAY_STEP,
    PAUSED,
    READY,
    SNAPSHOT,
    STEP,
    STOPPING,
    Coordinator,
    StartReceiver,
    decide,
    has_source,
    local_batch_size,
    merge,
)
from paraloop.run.setup import SetupError
from paraloop.run.status import RunStatus


def table(*rows: dict[int, int], step: int = 3) -> np.ndarray:
    out = np.zeros((len(rows), FIELDS), np.int64)
    for r, row in enumerate(rows):
        out[r, STEP] = step
        for k, v in row.items():
            out[r, k] = v
    return out


def test_the_ranks_step_only_when_every_part_is_there_and_rank_0_allows():
    ready = {READY: 1}
    assert decide(table({**ready, MAY_STEP: 1}, ready)) == "step"
    assert decide(table({**ready, MAY_STEP: 1}, {})) == "wait", "rank 1's part has not come"
    assert decide(table({**ready, PAUSED: 1}, ready)) == "wait", "paused, no single-step permit"
    assert decide(table({**ready, PAUSED: 1, MAY_STEP: 1}, ready)) == "step", "a /control/step permit"
    assert decide(table({MAY_STEP: 1, SNAPSHOT: 1}, ready)) == "snapshot", "snapshots need no batch"
    assert decide(table({**ready, MAY_STEP: 1}, {**ready, STOPPING: 1})) == "stop", "any rank may ask to stop"
    assert decide(table({MAY_STEP: 1}, {ENDED: 1})) == "stop", "a source that ended"
    rows = table({**ready, MAY_STEP: 1}, ready)
    rows[1, STEP] = 4
    with pytest.raises(RanksDiverged, match=r"different learner steps: \[3, 4\]"):
        decide(rows)


class TickingRanks:
    """Rank 0's collectives for Coordinator.next_batch: every tick answers rank 0's row beside a ready rank 1
    (`on_tick` runs while a tick is in flight); a gather answers rank 1's part."""

    rank, size, is_root = 0, 2, True

    def __init__(self, on_tick):
        self.on_tick, self.ticks = on_tick, 0

    def table(self, row, name):
        self.ticks += 1
        self.on_tick(self.ticks)
        other = np.zeros(FIELDS, np.int64)
        other[STEP], other[READY] = row[STEP], 1
        return np.stack([row, other])

    def gather(self, blob, name):
        return [blob, msgspec.msgpack.encode(RolloutBatch(groups=[group([1.0])], source="mock"))]


class CallingThread:
    async def call(self, fn, *args):
        return fn(*args)


def test_the_pause_holds_only_after_a_tick_that_saw_it(tmp_path):
    """A tick under way when the pause comes still decides a step (every rank computed it from the same table):
    status.learner_held turns true only at the first tick whose row carried the pause."""
    status = RunStatus(total_steps=10, mode="sync", run_dir=str(tmp_path))
    control = LearnerControl(status)
    seen = {}

    def on_tick(n):
        if n == 1:
            control.pause()  # after rank 0 built its row: this tick was decided without the pause
        seen[n] = status.learner_held
        if n == 3:
            control.stop()

    coordinator = Coordinator(
        TickingRanks(on_tick), CallingThread(), status, control, source=False, checksum_interval=0, run_dir=tmp_path
    )

    async def main():
        with anyio.fail_after(10):
            batch = await coordinator.next_batch(None, 3)
            assert batch is not None and not status.learner_held, "the step decided before the pause is taken"
            control.step_done(StepFinished(step=4, version=4, metrics={}))
            assert await coordinator.next_batch(None, 4) is None

    anyio.run(main)
    # seen[n]: what /control/status said while tick n was in flight, i.e. after tick n - 1's decision
    assert seen == {1: False, 2: False, 3: True, 4: True}, "held from the first tick whose row carried the pause"


def test_the_parts_merge_in_rank_order_as_one_batch():
    parts = [
        RolloutBatch(groups=[group([0]), group([1])], source="mock", dropped_stale=1, source_state={"next_group": 8}),
        RolloutBatch(
            groups=[group([2])], source="mock", dropped_stale=2, source_state={"next_group": 8}, source_step=5
        ),
    ]
    wire = [msgspec.msgpack.decode(msgspec.msgpack.encode(p), type=RolloutBatch) for p in parts]
    batch = merge(wire)
    assert [g.scores[0] for g in batch.groups] == [0, 1, 2]
    assert batch.dropped_stale == 3 and batch.source_state == {"next_group": 8} and batch.source_step == 5
    assert merge([]) is None


def test_each_rank_makes_its_contiguous_part_of_the_mock_batch():
    for count in range(0, 9):
        for size in (1, 2, 3, 4):
            parts = [chunk(count, r, size) for r in range(size)]
            assert [i for p in parts for i in p] == list(range(count))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1

    class Ranks:
        def __init__(self, rank, size):
            self.rank, self.size, self.is_root = rank, size, rank == 0

    mock = load_config(overrides={"rl_training": {"batch_size": 16, "mock": {"group_size": 4}}})
    assert [local_batch_size(mock, Ranks(r, 3)) for r in range(3)] == [8, 4, 4]
    assert [local_batch_size(mock, Ranks(r, 5)) for r in range(5)] == [4, 4, 4, 4, 0]
    assert [has_source(mock, Ranks(r, 5)) for r in range(5)] == [True] * 4 + [False]
    atropos = load_config(overrides={"rl_training": {"batch_size": 16, "atropos": {"api_url": "http://x:1"}}})
    assert local_batch_size(atropos, Ranks(0, 2)) == 16, "rank 0 fetches whole batches"
    assert [has_source(atropos, Ranks(r, 2)) for r in range(2)] == [True, False]
    assert local_batch_size(mock, None) == 16 and has_source(mock, None)


def test_a_follower_refuses_a_configuration_that_differs_from_rank_0s():
    ours = load_config(overrides={"rl_training": {"learning_rate": 1e-4}})
    theirs = load_config(overrides={"rl_training": {"learning_rate": 1e-3, "kl_beta": 0.0}})

    class FakeRanks:
        rank = 1

        def broadcast(self, blob, name):
            return msgspec.msgpack.encode(
                {"rl_training": theirs.rl_training.model_dump(mode="json"), "adapter_config": None}
            )

    with pytest.raises(SetupError, match="rank 1: rl_training differs from rank 0's in kl_beta, learning_rate"):
        StartReceiver(FakeRanks(), ours).layout()
    assert StartReceiver(FakeRanks(), theirs).layout() is None


class FakeRanks:
    rank, size = 0, 2

    def __init__(self):
        self.seq, self.in_flight, self.failed = 7, None, None

    def fail(self, reason):
        self.failed = reason
        return self.in_flight is not None


def watcher(ranks, exits, **config):
    cfg = load_config(overrides={"distributed": {"heartbeat_interval": 0.05, "peer_timeout": 0.5, **config}})
    return Watcher(ranks, cfg.distributed, token=None, done=lambda: False, exit_=lambda c, m: exits.append((c, m)))


def test_a_collective_past_its_deadline_ends_the_process_naming_the_rank_behind():
    ranks, exits = FakeRanks(), []
    w = watcher(ranks, exits, collective_timeout=5.0)
    w.set_peers([{"rank": 0, "url": "http://a:1"}, {"rank": 1, "url": "http://b:2"}])
    w.answers[1] = {"collectives": 6, "in_collective": {"name": "reduce", "seq": 6}}
    ranks.in_flight = InFlight(7, "tick", time.monotonic() - 1)
    w._check_deadline()
    assert not exits, "within the deadline"
    ranks.in_flight = InFlight(7, "tick", time.monotonic() - 6)
    with pytest.raises(PeerLost):  # the fake exit returns; the real one never does
        w._check_deadline()
    code, message = exits[0]
    assert code == 1 and "collective tick #7 has waited 6 s" in message
    assert "rank 1 (http://b:2) is at collective #6 (reduce)" in message and ranks.failed


def test_heartbeats_keep_a_live_peer_and_lose_a_silent_one():
    async def main() -> None:
        await heartbeats()

    anyio.run(main)


async def heartbeats() -> None:
    asked: list[float] = []  # when the peer was pinged

    async def answer(request):
        asked.append(time.monotonic())
        return web.json_response({"rank": 1, "collectives": 3})

    app = web.Application()
    app.router.add_get("/ranks", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    ranks, exits = FakeRanks(), []
    w = watcher(ranks, exits)
    w.set_peers([{"rank": 1, "url": f"http://127.0.0.1:{port}"}])
    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                await tg.start(w.run)
                await until(lambda: asked and asked[-1] - asked[0] > 1.0, "heartbeats answered for twice peer_timeout")
                assert w.answers[1]["collectives"] == 3 and not w.errors
                tg.cancel_scope.cancel()
        await runner.cleanup()  # the peer goes away: no answer for peer_timeout ends the run, naming it
        w.set_peers([{"rank": 1, "url": f"http://127.0.0.1:{port}"}])
        with (
            anyio.fail_after(10),
            pytest.raises(
                PeerLost,
                match=r"rank 1 \(http://127.0.0.1:\d+\) has answered no "
                r"heartbeat for \d s",
            ),
        ):
            await w.run()
        assert not exits, "nothing was in flight: the run ends through its task group"
        assert "rank 1" in w.blame() and "unreachable" in w.blame()
    finally:
        await runner.cleanup()


def test_launch_reads_mlx_hostfiles_and_starts_remote_ranks_over_ssh(tmp_path):
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([{"ssh": "mac1", "ips": ["10.0.0.1"]}, {"ssh": "mac2", "ips": ["10.0.0.2"]}]))
    args = argparse.Namespace(hostfile=str(hostfile), hosts="127.0.0.1", n=1, python="/opt/py", cwd="/srv/run")
    hosts = launch.read_hosts(args)
    assert [(h.ssh, h.ip) for h in hosts] == [("mac1", "10.0.0.1"), ("mac2", "10.0.0.2")]
    ring = launch.ring_hostfile(hosts, 5000)
    assert json.loads(ring) == [["10.0.0.1:5000"], ["10.0.0.2:5001"]]
    cmd = launch.rank_command(1, hosts[1], ring, args, ["run", "c.toml"])
    assert cmd[:4] == ["ssh", "-tt", "-o", "LogLevel=QUIET"] and cmd[4] == "mac2"
    assert "MLX_RANK=1" in cmd[5] and "cd /srv/run" in cmd[5] and cmd[5].endswith("/opt/py -m paraloop run c.toml")
    local = launch.read_hosts(argparse.Namespace(hostfile=None, hosts="127.0.0.1", n=3))
    assert len(local) == 3 and all(h.local for h in local)
    with pytest.raises(SystemExit, match="at least 2 ranks"):
        launch.read_hosts(argparse.Namespace(hostfile=None, hosts="127.0.0.1", n=1))
    assert launch.exit_code(-9) == 137 and launch.exit_code(2) == 2


def test_the_benchmarks_scaling_arithmetic():
    from bench.distributed import allreduce_s, scaling

    # a ring all-reduce sends and receives 2 (N-1)/N of the bytes per rank, in 2 (N-1) latency-bound rounds
    assert allreduce_s(1.1e9, 2, 1.1e9, 0.0) == pytest.approx(1.0)
    assert allreduce_s(1.1e9, 4, 1.1e9, 0.0) == pytest.approx(1.5)
    assert allreduce_s(0, 4, 1.1e9, 1e-3) == pytest.approx(6e-3)
    expected = scaling(10.0, 10.4e6, 12e3)
    two = expected["10 Gb Ethernet (ring over TCP), 2 machines"]
    assert two["step_s"] == pytest.approx(5.0 + two["all_reduce_s"]) and 1.9 < two["speedup"] < 2.0
    assert two["step_s_at_5_percent"] == pytest.approx(19 * two["all_reduce_s"])
