"""Batch input in Atropos' convention: alignment, overrides, temperatures, validation, micro-batch plans."""

import math

import paraloop  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import numpy as np
import pytest
import support

from paraloop.learn.batch import collate, plan_micro_batches, row_temperatures, validate_group
from paraloop.messages import RolloutBatch, ScoredGroup


def group(**fields) -> ScoredGroup:
    """Prompt [10, 11], then [12, 13, 14] scored 1 and [20] scored 0; `fields` replace any of the group's fields."""
    return support.group(**{"scores": [1.0, 0.0], **fields}, prompt=[10, 11], completions=[[12, 13, 14], [20]])


def test_collate_shifts_tokens_and_masks_by_one():
    tb = collate(
        RolloutBatch(groups=[group(inference_logprobs=[[1.0, 1.0, -0.5, -0.6, -0.7], [1.0, 1.0, -0.2]])], source="mock")
    )
    np.testing.assert_array_equal(tb.input_ids, [[10, 11, 12, 13], [10, 11, 0, 0]])
    np.testing.assert_array_equal(tb.targets, [[11, 12, 13, 14], [11, 20, 0, 0]])
    np.testing.assert_array_equal(tb.mask, [[0, 1, 1, 1], [0, 1, 0, 0]])
    np.testing.assert_array_equal(tb.lengths, [4, 2])
    # inference_logprobs[1:] describes the target tokens; the 1.0 prompt placeholders never reach the loss
    np.testing.assert_allclose(tb.inference_logprobs, [[0, -0.5, -0.6, -0.7], [0, -0.2, 0, 0]])
    assert tb.has_inference.all() and not tb.has_ref.any() and not tb.has_advantages.any()
    np.testing.assert_array_equal(tb.group, [0, 0])


def test_collate_numbers_groups_and_keeps_absent_inputs_per_group():
    with_lp = group(ref_logprobs=[[1.0, 1.0, -1.0, -1.0, -1.0], [1.0, 1.0, -2.0]])
    tb = collate(RolloutBatch(groups=[group(), with_lp], source="atropos"))
    np.testing.assert_array_equal(tb.group, [0, 0, 1, 1])
    np.testing.assert_array_equal(tb.has_ref, [False, False, True, True])
    np.testing.assert_allclose(tb.scores, [1.0, 0.0, 1.0, 0.0])


def test_empty_advantages_list_means_absent():
    tb = collate(RolloutBatch(groups=[group(advantages=[])], source="atropos"))
    assert not tb.has_advantages.any()


def test_temperature_priority():
    g = group(
        overrides=[{"temperature": 0.5}, {}],
        generation_params={"temperature": 0.8},
        group_overrides={"temperature": 0.3},
    )
    assert row_temperatures(g) == [0.5, 0.8]
    assert row_temperatures(group(group_overrides={"temperature": 0.3})) == [0.3, 0.3]
    assert row_temperatures(group(overrides=[None, {"temperature": 2.0}])) == [1.0, 2.0]
    assert row_temperatures(group(generation_params={"temperature": 0})) == [
        1.0,
        1.0,
    ]  # greedy -> T = 1 logprobs
    tb = collate(RolloutBatch(groups=[g], source="atropos"))
    np.testing.assert_allclose(tb.temperature, [0.5, 0.8])


def test_set_advantage_to_zero_override():
    tb = collate(RolloutBatch(groups=[group(overrides=[{"set_advantage_to_zero": True}, {}])], source="x"))
    np.testing.assert_array_equal(tb.zero_advantage, [True, False])


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"tokens": [], "masks": [], "scores": []}, "empty group"),
        ({"scores": [1.0]}, "ragged group: 1 scores for 2"),
        ({"masks": [[-100, -100, 12, 13, 14]]}, "ragged group: 1 masks for 2"),
        (
            {"masks": [[-100, -100, 12, 13], [-100, -100, 20]]},
            r"masks\[0\] has length 4 but tokens\[0\] has length 5",
        ),
        (
            {"masks": [[-100, -100, 12, 99, 14], [-100, -100, 20]]},
            r"masks\[0\]\[3\] = 99 is neither -100 nor",
        ),
        ({"scores": [1.0, math.nan]}, r"scores\[1\] is not a finite number"),
        ({"scores": [math.inf, 0.0]}, r"scores\[0\] is not a finite number"),
        ({"tokens": [[10, 11, 12, 13, 14], []], "masks": [[-100] * 5, []]}, r"tokens\[1\] is empty"),
        ({"inference_logprobs": [[1.0] * 5]}, "inference_logprobs has 1 sequences"),
        ({"inference_logprobs": [[1.0] * 5, [1.0, 1.0]]}, r"inference_logprobs\[1\] has length 2"),
        ({"inference_logprobs": [[1.0] * 5, [1.0, 1.0, math.nan]]}, r"inference_logprobs\[1\] is not finite"),
        ({"advantages": [[0.0] * 5, [0.0] * 4]}, r"advantages\[1\] has length 4"),
        ({"ref_logprobs": [[0.0] * 5]}, "ref_logprobs has 1 sequences"),
        ({"overrides": [{}]}, "1 overrides for 2"),
        ({"overrides": [{"temperature": -1.0}, {}]}, r"overrides\[0\] temperature must be a number >= 0"),
        ({"generation_params": {"temperature": "hot"}}, "generation_params temperature"),
    ],
)
def test_validate_group_names_the_problem(kw, message):
    with pytest.raises(ValueError, match=message):
        validate_group(group(**kw))


def test_prompt_placeholders_may_be_anything_finite_or_not():
    """Only trained positions of inference_logprobs must be finite (prompt positions are placeholders)."""
    validate_group(group(inference_logprobs=[[math.nan, 1.0, -0.1, -0.1, -0.1], [1.0, 1.0, -0.3]]))


def test_collate_names_the_bad_group():
    with pytest.raises(ValueError, match="group 1: scores"):
        collate(RolloutBatch(groups=[group(), group(scores=[0.0, math.nan])], source="x"))
    with pytest.raises(ValueError, match="empty batch"):
        collate(RolloutBatch(groups=[], source="x"))


def test_micro_batches_respect_the_token_budget_and_sort_by_length():
    lengths = np.array([5, 30, 7, 0, 28, 6, 31])
    plans = plan_micro_batches(lengths, token_budget=64)
    rows = np.concatenate(plans)
    assert sorted(rows.tolist()) == [0, 1, 2, 4, 5, 6]  # the empty row is left out, every other row once
    for p in plans:
        assert len(p) * lengths[p].max() <= 64
    assert [lengths[p].tolist() for p in plans] == [[31, 30], [28, 7], [6, 5]]
    # a row longer than the budget still runs, alone
    assert [p.tolist() for p in plan_micro_batches(np.array([100, 3]), token_budget=64)] == [[0], [1]]
