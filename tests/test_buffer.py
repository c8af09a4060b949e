"""The rollout buffer: batches of exactly batch_size sequences without splitting groups, fifo or most-signal-first
order, staleness dropped or kept for capping (and counted), a token budget, and a bounded size."""

import pytest
import support

from paraloop.run.buffer import RolloutBuffer, signal
from paraloop.messages import RolloutBatch, ScoredGroup


def group(scores, *, length=4, **fields) -> ScoredGroup:
    """A group with one sequence per score: 2 prompt tokens, then completion tokens; `length` tokens in all."""
    return support.group(scores, prompt=[7, 7], completion=[7] * (length - 2), **fields)


def scores_of(batch: RolloutBatch) -> list[list[float]]:
    return [g.scores for g in batch.groups]


def test_fifo_batches_hold_exactly_batch_size_sequences_in_arrival_order():
    buffer = RolloutBuffer(batch_size=4)
    buffer.put(group([0, 1]))
    assert buffer.take() is None  # 2 of 4 sequences: wait
    assert len(buffer) == 1
    buffer.put(group([2, 3]))
    buffer.put(group([4, 5]))
    batch = buffer.take()
    assert scores_of(batch) == [[0, 1], [2, 3]]
    assert batch.source == "mock" and batch.dropped_stale == 0
    assert buffer.take() is None
    assert buffer.stats()["taken"] == 2 and buffer.stats()["batches"] == 1 and buffer.sequences == 2


def test_groups_are_never_split_and_a_later_group_may_complete_the_batch():
    buffer = RolloutBuffer(batch_size=8)
    for scores in ([0, 1, 0, 1], [0, 1, 0, 1, 0, 1], [1, 0, 1, 0]):
        buffer.put(group(scores))
    batch = buffer.take()
    assert [len(g.scores) for g in batch.groups] == [4, 4]
    assert len(buffer) == 1 and buffer.sequences == 6


def test_partial_drains_what_is_left():
    buffer = RolloutBuffer(batch_size=8)
    buffer.put(group([0, 1]))
    assert buffer.take() is None
    assert scores_of(buffer.take(partial=True)) == [[0, 1]]
    assert buffer.take(partial=True) is None


def test_a_group_larger_than_a_batch_is_refused():
    buffer = RolloutBuffer(batch_size=4)
    with pytest.raises(ValueError, match="a group of 8 sequences can never fit a batch of 4"):
        buffer.put(group([0, 1] * 4))


def test_signal_is_the_mean_absolute_deviation_and_zero_for_equal_scores():
    assert signal(group([1, 1, 1, 1])) == 0.0
    assert signal(group([0, 1])) == pytest.approx(0.5)
    assert signal(group([0, 0, 0, 1])) == pytest.approx(0.375)
    # per-token advantages, when sent, are averaged over trained positions only
    given = group([0, 0], advantages=[[9.0, 9.0, 1.0, -1.0], [9.0, 9.0, 0.5, 0.5]])
    assert signal(given) == pytest.approx(0.75)


def test_abs_advantage_takes_the_strongest_signal_first_ties_by_arrival():
    buffer = RolloutBuffer(batch_size=2, priority="abs_advantage")
    for scores in ([1, 1], [0, 0.5], [0, 1], [1, 0], [0, 0.2]):
        buffer.put(group(scores))
    order = [scores_of(buffer.take())[0] for _ in range(5)]
    assert order == [[0, 1], [1, 0], [0, 0.5], [0, 0.2], [1, 1]]


def test_zero_signal_groups_are_dropped_and_counted_when_asked():
    buffer = RolloutBuffer(batch_size=2, drop_zero_signal=True)
    assert buffer.put(group([1, 1])) is False
    assert buffer.put(group([0, 1])) is True
    assert buffer.stats()["dropped_zero_signal"] == 1 and buffer.stats()["received"] == 2
    assert scores_of(buffer.take()) == [[0, 1]]


def test_stale_groups_are_dropped_counted_and_reported_in_the_next_batch():
    buffer = RolloutBuffer(batch_size=2, max_staleness=1, stale_policy="drop")
    buffer.put(group([0, 1], version=3))  # 2 behind version 5: stale
    buffer.put(group([0, 2], version=4))  # 1 behind: fine
    buffer.put(group([0, 3]))  # no versions (Atropos): never stale
    buffer.put(group([0, 4], version=5))
    first = buffer.take(version=5)
    assert scores_of(first) == [[0, 2]] and first.dropped_stale == 1
    assert buffer.stats()["dropped_stale"] == 1
    second = buffer.take(version=5)
    assert scores_of(second) == [[0, 3]] and second.dropped_stale == 0
    assert buffer.take(version=7) is None  # version 5 is now 2 behind: dropped, nothing left
    assert buffer.stats()["dropped_stale"] == 2 and len(buffer) == 0


def test_staleness_is_judged_against_the_version_at_take_time():
    buffer = RolloutBuffer(batch_size=2, max_staleness=0)
    buffer.put(group([0, 1], version=2))
    buffer.put(group([0, 2]))
    assert scores_of(buffer.take(version=2)) == [[0, 1]]
    buffer.put(group([0, 3], version=2))
    batch = buffer.take(version=3)
    assert scores_of(batch) == [[0, 2]] and batch.dropped_stale == 1
    assert len(buffer) == 0


def test_cap_policy_keeps_stale_groups_and_counts_them_when_taken():
    buffer = RolloutBuffer(batch_size=4, max_staleness=1, stale_policy="cap")
    buffer.put(group([0, 1], version=0))
    buffer.put(group([0, 2], version=2))
    batch = buffer.take(version=2)
    assert scores_of(batch) == [[0, 1], [0, 2]] and batch.dropped_stale == 0
    assert buffer.stats()["capped_stale"] == 1 and buffer.stats()["dropped_stale"] == 0


def test_overflow_drops_the_oldest_groups_and_counts_them():
    buffer = RolloutBuffer(batch_size=2, max_groups=3)
    for i in range(5):
        buffer.put(group([i, i + 1]))
    assert len(buffer) == 3 and buffer.stats()["dropped_overflow"] == 2
    assert scores_of(buffer.take()) == [[2, 3]]


def test_overflow_drops_the_oldest_even_when_priority_would_keep_it():
    buffer = RolloutBuffer(batch_size=2, max_groups=2, priority="abs_advantage")
    buffer.put(group([0, 10]))  # strongest signal, but oldest
    buffer.put(group([0, 1]))
    buffer.put(group([0, 2]))
    assert [scores_of(buffer.take())[0] for _ in range(2)] == [[0, 2], [0, 1]]


def test_token_budget_closes_a_batch_early_but_takes_an_oversized_group_alone():
    buffer = RolloutBuffer(batch_size=8, max_batch_tokens=40)
    buffer.put(group([0, 1], length=10))  # 2 rows x 10
    buffer.put(group([0, 2], length=10))  # 4 x 10 = 40: fits
    buffer.put(group([0, 3], length=10))  # 6 x 10 = 60: over
    batch = buffer.take()
    assert scores_of(batch) == [[0, 1], [0, 2]]
    buffer.put(group([0, 4], length=30))  # padded to the longest row: 4 x 30 > 40
    assert scores_of(buffer.take()) == [[0, 3]]
    assert scores_of(buffer.take()) == [[0, 4]]  # 2 x 30 = 60 alone: taken at once, nothing could join it
    buffer.put(group([0, 5], length=10))
    assert buffer.take() is None  # 20 of 40 tokens, 2 of 8 sequences: wait for more


def test_put_batch_keeps_the_source_and_upstream_stale_counts():
    buffer = RolloutBuffer(batch_size=4)
    kept = buffer.put_batch(
        RolloutBatch(groups=[group([0, 1]), group([1, 0])], source="atropos", source_step=7, dropped_stale=2)
    )
    assert kept == 2
    batch = buffer.take()
    assert (batch.source, batch.source_step, batch.dropped_stale) == ("atropos", 7, 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2, "priority": "lifo"}, "priority"),
        ({"batch_size": 2, "max_staleness": -1}, "max_staleness"),
        ({"batch_size": 2, "stale_policy": "keep"}, "stale_policy"),
        ({"batch_size": 2, "max_groups": 0}, "max_groups"),
        ({"batch_size": 2, "max_batch_tokens": 0}, "max_batch_tokens"),
    ],
)
def test_bad_settings_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RolloutBuffer(**kwargs)


# --- dynamic sampling ------------------------------------------------------------------------------------------------


def test_zero_signal_groups_wait_in_a_bounded_reserve_and_fill_only_when_asked():
    buffer = RolloutBuffer(batch_size=4, drop_zero_signal=True)
    for scores in ([1, 1], [0, 0], [2, 2], [0, 1]):
        buffer.put(group(scores))
    assert buffer.take() is None, "one group with signal cannot fill the batch"
    batch = buffer.take(fill=True)
    assert scores_of(batch) == [[0, 1], [1, 1]], "signal first, then the oldest reserved group that fits"
    assert batch.metrics == {"zero_signal_groups": 3.0, "filled_zero_signal": 1.0}
    assert buffer.stats()["filled_zero_signal"] == 1 and buffer.stats()["dropped_zero_signal"] == 3
    for _ in range(10):  # the reserve keeps at most one batch's worth, newest
        buffer.put(group([3, 3]))
    assert len(buffer._reserve) == 4
    assert buffer.take(fill=True).metrics == {"zero_signal_groups": 10.0, "filled_zero_signal": 2.0}


def test_reserved_groups_go_stale_like_queued_ones():
    buffer = RolloutBuffer(batch_size=2, drop_zero_signal=True, max_staleness=1)
    buffer.put(group([1, 1], version=0))
    buffer.put(group([2, 2], version=3))
    assert scores_of(buffer.take(version=3, fill=True)) == [[2, 2]]
