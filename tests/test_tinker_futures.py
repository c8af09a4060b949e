"""The futures of `paraloop tinker`: per-client order, round-robin between clients, bounds and retention."""

import anyio
import pytest

from paraloop.tinker.futures import Futures, FuturesFull, Result, UserError

pytestmark = pytest.mark.anyio


def recorder(log: list[str], name: str, *, hold: anyio.Event | None = None):  # noqa: ANN201
    async def work() -> Result:
        if hold is not None:
            await hold.wait()
        log.append(name)
        return Result(json={"name": name})

    return work


async def test_clients_take_turns_and_each_keeps_its_order() -> None:
    futures = Futures(max_pending=32, retention_s=60, wait_s=5)
    log: list[str] = []
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(futures.run)
            ids = [futures.submit(recorder(log, f"a{i}"), key="a") for i in range(4)]
            ids += [futures.submit(recorder(log, f"b{i}"), key="b") for i in range(2)]
            ids += [futures.submit(recorder(log, "c0"), key="c")]
            results = [await futures.retrieve(i) for i in ids]
            tg.cancel_scope.cancel()
    assert log == ["a0", "b0", "c0", "a1", "b1", "a2", "a3"]
    assert [r.json["name"] for r in results] == ["a0", "a1", "a2", "a3", "b0", "b1", "c0"]


async def test_unkeyed_work_runs_concurrently_with_keyed_work() -> None:
    futures = Futures(max_pending=32, retention_s=60, wait_s=5)
    log: list[str] = []
    hold = anyio.Event()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(futures.run)
            slow = futures.submit(recorder(log, "train", hold=hold), key="a")
            sample = futures.submit(recorder(log, "sample"), key=None)
            assert (await futures.retrieve(sample)).json == {"name": "sample"}  # not behind the held training call
            hold.set()
            assert (await futures.retrieve(slow)).json == {"name": "train"}
            tg.cancel_scope.cancel()


async def test_bounds_waits_errors_and_retention() -> None:
    futures = Futures(max_pending=2, retention_s=0.2, wait_s=0.05)
    hold = anyio.Event()

    async def refuse() -> Result:
        raise UserError("data[0]: bad")

    async def crash() -> Result:
        raise RuntimeError("boom")

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(futures.run)
            first = futures.submit(recorder([], "x", hold=hold), key="a")
            futures.submit(recorder([], "y", hold=hold), key=None)
            with pytest.raises(FuturesFull, match="tinker.max_pending = 2"):
                futures.submit(recorder([], "z"), key="b")
            assert await futures.retrieve(first) is None  # not finished within wait_s: the SDK polls again
            hold.set()
            assert (await futures.retrieve(first)).json == {"name": "x"}
            assert (await futures.retrieve(first)).json == {"name": "x"}  # a client that polls again gets it again
            user, server = futures.submit(refuse, key="a"), futures.submit(crash, key="a")
            assert (await futures.retrieve(user)) == Result(error="data[0]: bad", category="user")
            failed = await futures.retrieve(server)
            assert failed.category == "server" and "boom" in failed.error
            await anyio.sleep(0.3)
            futures.submit(recorder([], "later"), key="a")  # submitting forgets results past retention_s
            with pytest.raises(KeyError):
                await futures.retrieve(first)
            tg.cancel_scope.cancel()
