"""The run as `paraloop run` wires it (run.wiring.run_actors), on fakes: the hang of issue #11 is seen by the
watchdog (and how fast), stall_timeout ends the run with a final checkpoint, an actor that raises ends the run
with its error, and a checkpoint directory that cannot be written does not stop training."""

import errno
import logging
import time
from pathlib import Path

import aiohttp
import anyio
import pytest
from support.run_fakes import FakeEngine, FakeTrainer, FeedSource, Run, batch, parts, settings
from support import until

from paraloop import checkpoint
from paraloop.checkpoint import latest_checkpoint, list_checkpoints, read_checkpoint
from paraloop.run.checkpointer import CheckpointFailed
from paraloop.run.watchdog import RunStalled

DEADLINE = 30


async def get(port: int, path: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}{path}") as resp:
        return resp.status, await resp.json()


async def post(port: int, path: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session, session.post(f"http://127.0.0.1:{port}{path}") as resp:
        return resp.status, await resp.json()


def run(scenario) -> None:
    async def main() -> None:
        with anyio.fail_after(DEADLINE):
            await scenario()

    anyio.run(main)


def test_the_parked_drain_swap_is_reported_on_health_and_status_with_the_stacks_once(tmp_path, caplog, capsys):
    """Issue #11's hang: the engine took a drain swap and never applied it (no request followed). Step 1 trained,
    adapter 1 never serves, everything waits. The watchdog names the engine within engine_stall_s."""
    stall_s = 1.0
    config = settings(tmp_path, watchdog={"engine_stall_s": stall_s})
    engine, source = FakeEngine(park_swaps=True), FeedSource()
    the_run = Run(config, parts(FakeTrainer(), engine, source))

    async def scenario():
        async with anyio.create_task_group() as tg:
            tg.start_soon(the_run)
            await until(lambda: the_run.port, "HTTP")
            assert await get(the_run.port, "/health") == (200, {"status": "ok", "adapter_version": 0})
            await source.send.send(batch(1, 2))
            await until(lambda: engine.parked_at is not None, "the swap to park")
            with caplog.at_level(logging.ERROR, logger="paraloop.watchdog"):
                while (answer := await get(the_run.port, "/health"))[0] == 200:  # noqa: ASYNC110 - polling HTTP
                    await anyio.sleep(0.02)
                detected = time.monotonic() - engine.parked_at
                code, body = answer
                assert code == 503 and body["error"]["code"] == "stalled"
                assert body["error"]["message"].startswith("stalled: engine: no decode step")
                assert "an adapter swap waiting" in body["error"]["message"]
                _, status = await get(the_run.port, "/control/status")
                assert list(status["stalled"]) == ["engine"] and status["stalled"]["engine"]["for_s"] > stall_s
                assert status["step"] == 1 and status["serving_version"] == 0
                # Later ticks see the same stall: the stacks are logged once per stall, not at each tick.
                seen = status["stalled"]["engine"]["for_s"]
                await until(
                    lambda: the_run.status.stalled.get("engine", {}).get("for_s", 0) > seen + 2 * stall_s / 4,
                    "two more watchdog ticks on the stall",
                )
            dumps = [r for r in caplog.records if "Every thread's stack" in r.getMessage()]
            assert len(dumps) == 1
            assert "--- thread MainThread" in dumps[0].getMessage() and "--- asyncio task" in dumps[0].getMessage()
            assert "swap_adapter" in dumps[0].getMessage(), "the parked swap shows in the asyncio stacks"
            tg.cancel_scope.cancel()
        with capsys.disabled():
            print(f"\n[watchdog] parked drain swap detected after {detected:.2f} s (engine_stall_s = {stall_s})")
        tick = 0.25  # the watchdog looks every stall_s / 4: it saw the last progress up to a tick before the park
        assert stall_s - tick <= detected < stall_s + 1.0

    run(scenario)


def test_stall_timeout_ends_the_run_with_a_final_checkpoint(tmp_path):
    config = settings(tmp_path, watchdog={"engine_stall_s": 0.5, "stall_timeout": 1.5})
    engine, source = FakeEngine(park_swaps=True), FeedSource()
    the_run = Run(config, parts(FakeTrainer(), engine, source))

    async def scenario():
        async with anyio.create_task_group() as tg:
            tg.start_soon(the_run)
            await source.send.send(batch(1, 2))
            await until(lambda: engine.parked_at is not None or the_run.ended.is_set(), "the swap to park")
            assert the_run.error is None or isinstance(the_run.error, RunStalled), the_run.error
            await the_run.ended.wait()
        took = time.monotonic() - engine.parked_at
        assert isinstance(the_run.error, RunStalled) and "engine" in the_run.error.parts
        assert 1.3 <= took < 4.0
        assert the_run.exits == [], "an engine stall needs no hard exit: the engine thread stops on request"

    run(scenario)
    final = read_checkpoint(latest_checkpoint(tmp_path))
    assert final.step == 1, "the trained step was saved before the run ended"


@pytest.mark.parametrize("failing", ["source", "trainer", "swap"])
def test_an_actor_that_raises_ends_the_run_with_its_error(tmp_path, failing):
    config = settings(tmp_path)
    engine = FakeEngine(fail_swap=ValueError("injected swap failure") if failing == "swap" else None)
    source = FeedSource()
    trainer = FakeTrainer(fail_at=2 if failing == "trainer" else None)
    the_run = Run(config, parts(trainer, engine, source))

    async def scenario():
        async with anyio.create_task_group() as tg:
            tg.start_soon(the_run)
            if failing != "swap":
                await source.send.send(batch(1, 2))
            if failing == "source":
                await source.send.send(ConnectionResetError("injected source failure"))
            else:
                await source.send.send(batch(3, 4))
            await the_run.ended.wait()

    run(scenario)
    assert the_run.error is not None and f"injected {failing} failure" in str(the_run.error)


def test_a_last_checkpoint_that_cannot_be_written_ends_the_run_with_an_error(tmp_path, monkeypatch):
    config = settings(tmp_path, rl_training={"total_steps": 1})
    monkeypatch.setattr("paraloop.run.checkpointer.FIRST_BACKOFF_S", 0.01)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_checkpoint", full)
    the_run = Run(config, parts(FakeTrainer(), FakeEngine(), source := FeedSource()))

    async def scenario():
        async with anyio.create_task_group() as tg:
            tg.start_soon(the_run)
            await source.send.send(batch(1, 2))
            await the_run.ended.wait()

    run(scenario)
    assert isinstance(the_run.error, CheckpointFailed) and "No space left" in str(the_run.error)


def partial_dirs(run_dir: Path) -> list[str]:
    return [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_training_and_serving_go_on_while_checkpoints_cannot_be_written(tmp_path, monkeypatch):
    """A full disk, injected in-process at the file write (a chmod'ed directory does not stop root, and CI has no
    small filesystem to fill): mlx's safetensors writer fails the way it does on ENOSPC."""
    import mlx.core as mx

    real_save = mx.save_safetensors
    disk_full = [True]

    def save_safetensors(path, arrays, metadata=None):
        if disk_full[0]:
            with open(path, "wb") as f:
                f.write(b"\0" * 100)  # part of a file, as a full disk leaves it
            raise RuntimeError("[write] Unable to write 8 bytes to file.")
        return real_save(path, arrays, metadata=metadata)

    monkeypatch.setattr(mx, "save_safetensors", save_safetensors)
    monkeypatch.setattr("paraloop.run.checkpointer.FIRST_BACKOFF_S", 0.05)
    monkeypatch.setattr("paraloop.run.checkpointer.MAX_BACKOFF_S", 0.2)
    config = settings(tmp_path, checkpoint={"save_every_step": True})
    trainer, source = FakeTrainer(), FeedSource()
    the_run = Run(config, parts(trainer, FakeEngine(), source))

    async def scenario():
        async with anyio.create_task_group() as tg:
            tg.start_soon(the_run)
            await until(lambda: the_run.port, "HTTP")
            for tag in range(1, 6):
                await source.send.send(batch(tag, tag))
            await until(lambda: trainer.step_count == 5, "five steps while no checkpoint can be written")
            assert list_checkpoints(tmp_path) == []
            # An attempt in progress has its temporary dir; a failed one removes it before the next.
            await until(lambda: not partial_dirs(tmp_path), "a failed attempt to remove what it wrote")
            _, status = await get(the_run.port, "/control/status")
            assert (
                status["checkpoint_error"]["failures"] >= 2 and "Unable to write" in status["checkpoint_error"]["error"]
            )
            assert (await get(the_run.port, "/health"))[0] == 200, "serving is not stalled by it"
            code, body = await post(the_run.port, "/control/snapshot")
            assert code == 503 and "Unable to write" in body["error"]["message"]
            disk_full[0] = False  # space freed: the next retry writes the newest step
            await until(
                lambda: the_run.status.checkpoint_error is None and the_run.status.last_checkpoint,
                "the retried checkpoint",
            )
            await source.send.send(batch(9, 9))
            await until(lambda: trainer.step_count == 6, "a sixth step")
            assert (await post(the_run.port, "/control/stop"))[0] == 200
            await the_run.ended.wait()

    run(scenario)
    assert the_run.error is None
    steps = [read_checkpoint(p).step for p in list_checkpoints(tmp_path)]
    assert steps[-1] == 6 and all(s >= 5 for s in steps), "the failed steps were superseded, not written late"
    assert partial_dirs(tmp_path) == [], "nothing partial is left by the failed attempts"
