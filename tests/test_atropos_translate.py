"""Atropos wire groups -> ScoredGroup: the convention carried over, malformed groups rejected, micro-batch packing."""

import logging
import math

import pytest
import support
from support import wire_group

from paraloop.atropos.translate import InvalidGroup, split_by_token_budget, to_scored_group, translate_batch
from paraloop.messages import ScoredGroup


def test_a_managed_server_group_translates_field_for_field():
    group = to_scored_group(wire_group())
    assert group == ScoredGroup(
        tokens=[[11, 12, 13, 40, 41], [11, 12, 13, 50, 51, 52]],
        masks=[[-100, -100, -100, 40, 41], [-100, -100, -100, 50, 51, 52]],
        scores=[1.0, 0.0],
        inference_logprobs=[[1.0, 1.0, 1.0, -0.5, -0.25], [1.0, 1.0, 1.0, -1.5, -0.125, -2.0]],
        generation_params={"temperature": 0.7},
        env_id=3,
    )
    assert group.advantages is None and group.overrides is None and group.group_overrides is None


def test_optional_fields_are_carried_when_given():
    group = to_scored_group(
        wire_group(
            advantages=[[0.0, 0.0, 0.0, 0.5, 0.5], [0.0] * 3 + [-0.5] * 3],
            ref_logprobs=[[0.0] * 3 + [-0.4, -0.3], [0.0] * 3 + [-1.0, -0.1, -1.9]],
            overrides=[{"set_advantage_to_zero": True}, None],
            group_overrides={"temperature": 0.9},
            scores=[1, 0],  # JSON integers are numbers too
        )
    )
    assert group.advantages == [[0.0, 0.0, 0.0, 0.5, 0.5], [0.0] * 3 + [-0.5] * 3]
    assert group.ref_logprobs == [[0.0] * 3 + [-0.4, -0.3], [0.0] * 3 + [-1.0, -0.1, -1.9]]
    assert group.overrides == [{"set_advantage_to_zero": True}, {}]
    assert group.group_overrides == {"temperature": 0.9}
    assert group.scores == [1.0, 0.0]


def test_absent_per_token_fields_in_any_spelling_become_none():
    for absent in (None, [], [[], []]):
        group = to_scored_group(wire_group(advantages=absent, inference_logprobs=absent, ref_logprobs=absent))
        assert group.advantages is None and group.inference_logprobs is None and group.ref_logprobs is None


MALFORMED = {
    "ragged masks count": (dict(masks=[[-100, -100, -100, 40, 41]]), "masks"),
    "ragged mask length": (dict(masks=[[-100, -100, 40, 41], [-100, -100, -100, 50, 51, 52]]), "masks[0]"),
    "ragged logprobs": (
        dict(inference_logprobs=[[1.0, 1.0, 1.0, -0.5], [1.0] * 3 + [-1.0] * 3]),
        "inference_logprobs[0]",
    ),
    "mask is another token": (dict(masks=[[-100, -100, -100, 40, 99], [-100, -100, -100, 50, 51, 52]]), "masks[0][4]"),
    "NaN score": (dict(scores=[math.nan, 1.0]), "scores[0]"),
    "infinite score": (dict(scores=[1.0, -math.inf]), "scores[1]"),
    "missing score": (dict(scores=[1.0]), "scores"),
    "score that is not a number": (dict(scores=[None, 1.0]), "scores[0]"),
    "no sequences": (dict(tokens=[], masks=[], scores=[], inference_logprobs=None), "empty"),
    "empty sequence": (
        dict(
            tokens=[[], [11, 12, 13, 50, 51, 52]], masks=[[], [-100, -100, -100, 50, 51, 52]], inference_logprobs=None
        ),
        "tokens[0]",
    ),
    "float token": (dict(tokens=[[11, 12, 13, 40, 41.5], [11, 12, 13, 50, 51, 52]]), "tokens[0][4]"),
    "nothing to train": (dict(masks=[[-100] * 5, [-100] * 6], inference_logprobs=None), "trained position"),
    "placeholder logprob at a trained token": (
        dict(inference_logprobs=[[1.0, 1.0, 1.0, -0.5, 1.0], [1.0] * 3 + [-1.0] * 3]),
        "inference_logprobs[0][4]",
    ),
    "NaN logprob at a trained token": (
        dict(inference_logprobs=[[1.0, 1.0, 1.0, -0.5, math.nan], [1.0] * 3 + [-1.0] * 3]),
        "inference_logprobs[0]",
    ),
    "overrides for some sequences only": (dict(overrides=[{"temperature": 1.0}]), "overrides"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_groups_are_rejected_naming_the_problem(case):
    changes, named = MALFORMED[case]
    with pytest.raises(InvalidGroup, match=named.replace("[", r"\[").replace("]", r"\]")):
        to_scored_group(wire_group(**changes))


def test_missing_required_field_and_non_object_are_rejected():
    group = wire_group()
    del group["scores"]
    with pytest.raises(InvalidGroup, match="scores"):
        to_scored_group(group)
    with pytest.raises(InvalidGroup, match="JSON object"):
        to_scored_group([1, 2, 3])


def test_translate_batch_keeps_good_groups_and_logs_each_rejection(caplog):
    batch = [wire_group(env_id=0), wire_group(env_id=1, scores=[math.nan, 0.0]), "junk", wire_group(env_id=2)]
    with caplog.at_level(logging.WARNING, logger="paraloop.atropos"):
        groups, rejected = translate_batch(batch)
    assert [g.env_id for g in groups] == [0, 2]
    assert [env for env, _ in rejected] == [1, None]
    assert "scores[0]" in rejected[0][1]
    lines = [r for r in caplog.records if r.name == "paraloop.atropos"]
    assert len(lines) == 2 and "env_id 1" in lines[0].getMessage()


def test_translate_batch_of_the_wrong_shape_rejects_without_raising():
    groups, rejected = translate_batch({"tokens": []})
    assert groups == [] and len(rejected) == 1


def group_of(rows: int, length: int) -> ScoredGroup:
    """`rows` sequences of `length` tokens each, none of them prompt."""
    return support.group(prompt=[], completions=[[1] * length] * rows)


def test_split_by_token_budget_packs_in_order_and_never_splits_a_group():
    groups = [group_of(2, 10), group_of(2, 10), group_of(2, 30), group_of(4, 5)]
    parts = split_by_token_budget(groups, 60)
    # padded size = rows * longest row: [2x10 + 2x10] = 40; adding 2x30 would be 6 * 30 = 180.
    assert [[id(g) for g in part] for part in parts] == [
        [id(groups[0]), id(groups[1])],
        [id(groups[2])],
        [id(groups[3])],
    ]
    assert [g for part in parts for g in part] == groups


def test_a_group_larger_than_the_budget_gets_a_micro_batch_of_its_own():
    big, small = group_of(8, 100), group_of(2, 4)
    assert split_by_token_budget([small, big, small], 64) == [[small], [big], [small]]
    assert split_by_token_budget([], 64) == []
    with pytest.raises(ValueError, match="token_budget"):
        split_by_token_budget([small], 0)
