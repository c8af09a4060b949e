"""The rollout fetcher with dynamic sampling: it keeps drawing until a batch holds only groups with signal, gives up
after max_draws (filling with zero-signal groups), and says in the batch's metrics how many draws it took."""

import anyio

from support import group

from paraloop.messages import RolloutBatch
from paraloop.run.buffer import RolloutBuffer
from paraloop.run.fetcher import run_fetcher


async def source_of(batches: list[list[list[float]]]):
    for groups in batches:
        yield RolloutBatch(groups=[group(s) for s in groups], source="mock")


def run(coroutine):
    async def main():
        return await coroutine

    return anyio.run(main, backend="asyncio")


async def fetch(batches: list[list[list[float]]], *, max_draws: int | None, count: int) -> list[RolloutBatch]:
    """Run the fetcher (async mode: no credits) on a finite source and collect `count` learner batches."""
    buffer = RolloutBuffer(batch_size=4, drop_zero_signal=max_draws is not None)
    send, receive = anyio.create_memory_object_stream[RolloutBatch](1)
    out = []
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: run_fetcher(
                    source_of(batches), send, buffer=buffer, version=lambda: 0, credits=None, max_draws=max_draws
                )
            )
            async with receive:
                for _ in range(count):
                    out.append(await receive.receive())
            tg.cancel_scope.cancel()
    return out


def test_dynamic_sampling_keeps_drawing_until_the_batch_has_only_signal():
    draws = [[[1, 1], [0, 1]], [[0, 0], [2, 2]], [[1, 0], [5, 5]], [[0, 3], [0, 2]]]
    first, second = run(fetch(draws, max_draws=8, count=2))
    assert [g.scores for g in first.groups] == [[0, 1], [1, 0]]
    assert first.metrics == {"zero_signal_groups": 4.0, "filled_zero_signal": 0.0, "sampling_draws": 3.0}
    assert [g.scores for g in second.groups] == [[0, 3], [0, 2]] and second.metrics["sampling_draws"] == 1.0


def test_dynamic_sampling_gives_up_after_max_draws_and_fills():
    draws = [[[1, 1], [0, 0]]] * 5 + [[[0, 1], [1, 0]]]
    (batch,) = run(fetch(draws, max_draws=2, count=1))
    assert [g.scores for g in batch.groups] == [[1, 1], [0, 0]], "bounded: no third draw"
    assert batch.metrics == {"zero_signal_groups": 4.0, "filled_zero_signal": 2.0, "sampling_draws": 2.0}


def test_without_dynamic_sampling_zero_signal_groups_train_as_they_come():
    (batch,) = run(fetch([[[1, 1], [0, 0]]], max_draws=None, count=1))
    assert [g.scores for g in batch.groups] == [[1, 1], [0, 0]] and batch.metrics == {}


def test_groups_of_mixed_sizes_that_cannot_fill_a_batch_exactly_close_it_short_instead_of_spinning():
    # batch_size 4: groups of 3 rows never add up to 4; the buffer holds 6 sequences and takes none exactly
    first, second = run(fetch([[[0, 1, 0]], [[1, 0, 1]], [[0, 0, 1]]], max_draws=None, count=2))
    assert [g.scores for g in first.groups] == [[0, 1, 0]]
    assert [g.scores for g in second.groups] == [[1, 0, 1]]
