"""The engine worker's drain swaps (sync mode) in every order the events can arrive, each under a deadline.

A Swap(drain=True) that arrives while rows decode holds new rows, lets the running rows finish, then applies: the
moment they finish, whether or not another command ever arrives (an Atropos environment with a full queue sends
nothing, and the run used to hang there forever).
"""

import threading
from functools import partial
from typing import Any

import paraloop  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import anyio
import pytest

from paraloop.engine import Engine
from paraloop.engine.worker import Handle, Insert, Stop, Swap
from paraloop.lora import adapter_arrays
from paraloop.messages import TokenEvent
from support import until
from support.engines import changed_adapter, make_engine, prompts, request

DEADLINE_S = 60  # the whole test; the tiny model decodes these rows in well under a second
LONG = 500  # max_tokens of rows that only end by being cancelled or aborted (the engine's limit here: 512)


def run_engine(engine: Engine, body) -> Any:
    """Run the engine actor, await body(engine, tg) under the deadline, then stop the engine."""

    async def main() -> Any:
        with anyio.fail_after(DEADLINE_S):
            async with anyio.create_task_group() as tg:
                await tg.start(engine.run)
                result = await body(engine, tg)
                tg.cancel_scope.cancel()
        return result

    return anyio.run(main)


async def first_events(events: Any, count: int) -> list[TokenEvent]:
    out = []
    async for event in events:
        out.append(event)
        if len(out) == count:
            break
    return out


def test_a_drain_swap_that_arrives_while_rows_decode_applies_when_they_finish_with_no_request_following(
    tiny_model_path,
):
    engine, model = make_engine(tiny_model_path)
    new = changed_adapter(model, seed=1)
    prompt = prompts(engine.tokenizer)[0]

    async def body(engine: Engine, tg: Any) -> tuple[list[TokenEvent], Any]:
        events: list[TokenEvent] = []
        swapped: list[Any] = []

        async def swap() -> None:
            swapped.append(await engine.swap_adapter(new, version=1, drain=True))

        async for event in engine.generate(request(prompt, n=2, temperature=0, max_tokens=30, ignore_eos=True)):
            events.append(event)
            if len(events) == 1:
                tg.start_soon(swap)
                await until(lambda: engine.stats()["swap_waiting"] == 1, "the drain swap to wait")
        # The rows are done and nothing else will ever be posted: the swap must land by itself.
        await until(lambda: bool(swapped), "the swap to land by itself")
        return events, swapped[0]

    events, swapped = run_engine(engine, body)
    assert swapped.version == 1 and engine.version == 1
    assert len(events) == 60 and {e.version for e in events} == {0}  # no row mixed two versions
    assert engine.stats()["swap_waiting"] == 0


def test_requests_arriving_while_a_drain_swap_waits_start_on_the_new_version(tiny_model_path):
    engine, model = make_engine(tiny_model_path)
    new = changed_adapter(model, seed=2)
    prompt = prompts(engine.tokenizer)[0]

    async def body(engine: Engine, tg: Any) -> tuple[list[TokenEvent], list[TokenEvent]]:
        running = engine.generate(request(prompt, temperature=0, max_tokens=40, ignore_eos=True))
        first = await first_events(running, 1)
        tg.start_soon(partial(engine.swap_adapter, new, 1, drain=True))
        await until(lambda: engine.stats()["swap_waiting"] == 1, "the drain swap to wait")
        late: list[TokenEvent] = []

        async def late_request() -> None:
            async for event in engine.generate(request(prompt, temperature=0, max_tokens=5, ignore_eos=True)):
                late.append(event)

        tg.start_soon(late_request)
        rest = [event async for event in running]
        await until(lambda: len(late) == 5, "the late request's 5 events", within=60)
        return first + rest, late

    old_rows, late = run_engine(engine, body)
    assert {e.version for e in old_rows} == {0} and len(old_rows) == 40
    assert {e.version for e in late} == {1}


def test_a_drain_swap_before_any_insert_applies_at_once(tiny_model_path):
    engine, model = make_engine(tiny_model_path)
    new = changed_adapter(model, seed=3)
    prompt = prompts(engine.tokenizer)[0]

    async def body(engine: Engine, tg: Any) -> list[Any]:
        swapped = await engine.swap_adapter(new, version=1, drain=True)
        assert swapped.version == 1 and engine.version == 1
        return await engine.complete(request(prompt, max_tokens=3, ignore_eos=True))

    rows = run_engine(engine, body)
    assert rows[0].versions == [1, 1, 1]


def test_a_drain_swap_superseded_while_draining_is_refused_and_the_newer_one_lands(tiny_model_path):
    engine, model = make_engine(tiny_model_path)
    v1, v2 = changed_adapter(model, seed=4), changed_adapter(model, seed=5)
    prompt = prompts(engine.tokenizer)[0]

    async def body(engine: Engine, tg: Any) -> tuple[list[Any], list[Any]]:
        outcomes: dict[int, Any] = {}

        async def swap(arrays: Any, version: int) -> None:
            try:
                outcomes[version] = await engine.swap_adapter(arrays, version=version, drain=True)
            except ValueError as e:
                outcomes[version] = e

        running = engine.generate(request(prompt, temperature=0, max_tokens=25, ignore_eos=True))
        first = await first_events(running, 1)
        tg.start_soon(swap, v1, 1)
        await until(lambda: engine.stats()["swap_waiting"] == 1, "the drain swap to wait")
        tg.start_soon(swap, v2, 2)
        await until(lambda: 1 in outcomes, "swap 1's outcome", within=60)
        assert engine.version == 0  # the rows still decode: nothing applied yet
        rest = [event async for event in running]
        await until(lambda: 2 in outcomes, "swap 2's outcome", within=60)
        return first + rest, [outcomes[1], outcomes[2]]

    events, (first, second) = run_engine(engine, body)
    assert isinstance(first, ValueError) and "superseded by adapter version 2" in str(first)
    assert second.version == 2 and engine.version == 2
    assert {e.version for e in events} == {0} and len(events) == 25


def test_cancelling_the_last_running_row_while_a_drain_swap_waits_applies_it_at_once(tiny_model_path):
    engine, model = make_engine(tiny_model_path)
    new = changed_adapter(model, seed=6)
    prompt = prompts(engine.tokenizer)[0]

    async def body(engine: Engine, tg: Any) -> float:
        swapped: list[Any] = []

        async def swap() -> None:
            swapped.append(await engine.swap_adapter(new, version=1, drain=True))

        running = engine.generate(request(prompt, n=2, max_tokens=LONG, ignore_eos=True))
        await first_events(running, 1)
        tg.start_soon(swap)
        await until(lambda: engine.stats()["swap_waiting"] == 1, "the drain swap to wait")
        await running.aclose()  # the client left: its Cancel is the last command that will ever arrive
        await until(lambda: bool(swapped), "the swap", within=60)
        return engine.stats()["generated_tokens"]

    generated = run_engine(engine, body)
    assert engine.version == 1 and engine.stats()["active_rows"] == 0
    assert generated < 2 * LONG  # applied when the rows were cancelled, not after they would have finished


def test_stopping_the_engine_while_a_drain_swap_waits_refuses_the_swap_and_aborts_the_rows(tiny_model_path):
    engine, model = make_engine(tiny_model_path)
    new = changed_adapter(model, seed=7)
    prompt = prompts(engine.tokenizer)[0]

    async def main() -> tuple[list[Any], list[Any]]:
        swap_outcome: list[Any] = []
        rows: list[Any] = []
        engine_scope = anyio.CancelScope()

        async def run(*, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
            with engine_scope:
                await engine.run(task_status=task_status)

        async def swap() -> None:
            try:
                swap_outcome.append(await engine.swap_adapter(new, version=1, drain=True))
            except RuntimeError as e:
                swap_outcome.append(e)

        async def consume() -> None:
            rows.extend(await engine.complete(request(prompt, n=2, max_tokens=LONG, ignore_eos=True)))

        with anyio.fail_after(DEADLINE_S):
            async with anyio.create_task_group() as tg:
                await tg.start(run)
                tg.start_soon(consume)
                await until(lambda: engine.stats()["active_rows"] == 2, "both rows decoding")
                tg.start_soon(swap)
                await until(lambda: engine.stats()["swap_waiting"] == 1, "the drain swap to wait")
                engine_scope.cancel()
        return swap_outcome, rows

    swap_outcome, rows = anyio.run(main)
    assert isinstance(swap_outcome[0], RuntimeError) and "stopped" in str(swap_outcome[0])
    assert [r.finish_reason for r in rows] == ["abort", "abort"]
    assert engine.version == 0


def test_commands_taken_together_with_a_stop_are_answered_not_dropped(tiny_model_path):
    """Stop, Insert and Swap already in the inbox when the thread starts are read in one take: the request
    behind the Stop ends with "abort" events and the swap is refused, so neither caller waits forever."""
    engine, model = make_engine(tiny_model_path)
    worker = engine._worker
    delivered: list[tuple[Handle, list[TokenEvent], bool]] = []
    worker.deliver = delivered.extend
    replies: list[Any] = []
    handle = Handle(
        request=request(prompts(engine.tokenizer)[0], n=2, max_tokens=4), send=None, adapter=engine.adapters.default
    )
    arrays = dict(adapter_arrays(model))
    for command in (Stop(), Insert((handle,)), Swap(arrays=arrays, version=1, reply=replies.append)):
        assert worker.post(command)
    thread = threading.Thread(target=worker.main, args=(lambda: None,), daemon=True)
    thread.start()
    thread.join(timeout=DEADLINE_S)
    assert not thread.is_alive()
    assert worker.error is None
    [(got, events, finished)] = delivered
    assert got is handle and finished and [e.finish_reason for e in events] == ["abort", "abort"]
    assert len(replies) == 1 and isinstance(replies[0], RuntimeError)
    assert not worker.post(Stop())  # closed: later commands are refused, not queued


@pytest.mark.parametrize("drain", [False, True])
def test_a_swap_posted_after_the_engine_stopped_is_refused(tiny_model_path, drain):
    engine, model = make_engine(tiny_model_path)
    arrays = dict(adapter_arrays(model))

    async def main() -> None:
        with anyio.fail_after(DEADLINE_S):
            async with anyio.create_task_group() as tg:
                await tg.start(engine.run)
                tg.cancel_scope.cancel()
            with pytest.raises(RuntimeError, match="stopped"):
                await engine.swap_adapter(arrays, version=1, drain=drain)

    anyio.run(main)
