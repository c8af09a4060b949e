"""The pure loss (logprobs.py, loss.py, algorithms.py, advantages.py) against an independent float64 NumPy version.

Values and gradients w.r.t. the logits are compared for every option; NumPy gradients are central finite
differences of the NumPy loss.
"""

import paraloop  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import mlx.core as mx
import numpy as np
import pytest

from paraloop.learn.advantages import group_advantages, token_advantages
from paraloop.learn.algorithms import get_algorithm
from paraloop.learn.batch import collate
from paraloop.learn.logprobs import token_logprobs
from paraloop.learn.loss import (
    LossSettings,
    aggregation_weights,
    importance_weights,
    rejected_tokens,
    rollout_mismatch,
)
from paraloop.messages import RolloutBatch, ScoredGroup
from support.loss_reference import (
    OPTIONS,
    B,
    T,
    V,
    mx_loss,
    mx_policy_loss,
    np_corrected,
    np_grad,
    np_importance,
    np_logprobs,
    np_loss,
    random_inputs,
    replay_kept,
)


@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_and_gradient_match_float64_numpy(opt, seed):
    logits, inp = random_inputs(seed)
    if opt.get("importance_weight"):
        inp["importance_weight"] = np.minimum(np.exp(np.random.default_rng(seed).normal(0, 0.5, (B, T))), 2.0)
    value, grad = mx_loss(logits, inp, opt)
    reference = np_corrected(inp, opt)
    expected = np_loss(logits, reference, opt)
    np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, np_grad(logits, reference, opt), rtol=1e-3, atol=2e-6)


@pytest.mark.parametrize(
    "opt",
    [
        {},
        {"kl_beta": 0.1, "kl_estimator": "k3", "entropy_weight": 0.02},
        {"algorithm": "gspo", "clip_ratio": 0.03},
        {"algorithm": "cispo", "cispo_clip_max": 1.1, "aggregation": "seq-mean-token-mean", "entropy_weight": -0.01},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default",
)
@pytest.mark.parametrize("seed", [0, 1])
def test_sampling_mask_replay_matches_float64_numpy(opt, seed):
    """Tokens the engine sampled from a top-k / top-p / min-p kept set are scored over the same set: log-probs,
    entropy, loss and gradient (which reaches only the kept logits) against the float64 reference."""
    logits, inp = random_inputs(seed)
    inp["kept"] = replay_kept(inp, logits, seed)
    value, grad = mx_loss(logits, inp, opt)
    np.testing.assert_allclose(value, np_loss(logits, inp, opt), rtol=1e-5, atol=1e-6)
    expected = np_grad(logits, inp, opt)
    np.testing.assert_allclose(grad, expected, rtol=1e-3, atol=2e-6)
    trimmed = (inp["kept"] > 0) & (inp["kept"] < V)
    z = logits / inp["temperature"][:, None, None]
    for b, t in zip(*np.nonzero(trimmed & inp["mask"]), strict=True):  # no gradient reaches a token never kept
        kth = np.sort(z[b, t])[::-1][inp["kept"][b, t] - 1]
        outside = (z[b, t] < kth) & (np.arange(V) != inp["targets"][b, t])
        assert outside.any() and np.all(grad[b, t][outside] == 0)
    logp, entropy = token_logprobs(
        mx.array(logits, mx.float32),
        mx.array(inp["targets"]),
        mx.array(inp["temperature"], mx.float32),
        kept=mx.array(inp["kept"]),
    )
    np_logp, np_entropy = np_logprobs(logits, inp["targets"], inp["temperature"], inp["kept"])
    np.testing.assert_allclose(np.array(logp), np_logp, rtol=1e-5, atol=1e-6)
    # H = lse - sum p z in float32: cancellation leaves ~1e-6 absolute where H is small (measured 1.3e-6)
    np.testing.assert_allclose(np.array(entropy), np_entropy, rtol=1e-5, atol=5e-6)
    one = inp["kept"] == 1
    assert one.any() and np.all(np.array(entropy)[one & (np_logp == 0)] == 0)
    full, _ = np_logprobs(logits, inp["targets"], inp["temperature"])
    assert np.all(np_logp[trimmed] >= full[trimmed] - 1e-12) and (np_logp[trimmed] > full[trimmed] + 1e-3).any()


def test_some_random_ratios_are_clipped():
    """Guards the test above: it must exercise both branches of the PPO min."""
    logits, inp = random_inputs(0)
    logp, _ = np_logprobs(logits, inp["targets"], inp["temperature"])
    ratio = np.exp(logp - inp["old_logp"])[inp["mask"]]
    assert ((ratio < 0.8) | (ratio > 1.2)).any() and ((ratio > 0.8) & (ratio < 1.2)).any()


def test_gspo_and_cispo_options_reach_their_clipped_branches():
    """Guards the float64 test: GSPO clips whole sequences, CISPO caps weights, at the options used above."""
    for seed in (0, 1):
        logits, inp = random_inputs(seed)
        logp, _ = np_logprobs(logits, inp["targets"], inp["temperature"])
        mask = inp["mask"]
        log_ratio = np.where(mask, logp - inp["old_logp"], 0.0)
        seq = np.exp(log_ratio.sum(1) / np.maximum(mask.sum(1), 1))[mask.any(1)]
        assert ((seq > 0.8) & (seq < 1.2)).any(), "PPO's clip range leaves some sequences unclipped"
        assert ((seq < 0.97) | (seq > 1.05)).any(), "the tight GSPO option clips some sequences"
        token = np.exp(log_ratio)[mask]
        assert (token > 1.1).any() and (token < 1.1).any()


def test_gspo_clips_a_sequence_as_a_whole():
    logits, inp = random_inputs(0)
    opt = {"algorithm": "gspo", "clip_ratio": 0.03, "clip_ratio_high": 0.05}
    settings = LossSettings(clip_ratio=0.03, clip_ratio_high=0.05)
    logp, _ = token_logprobs(mx.array(logits, mx.float32), mx.array(inp["targets"]), mx.array(inp["temperature"]))
    mask = mx.array(inp["mask"])
    _, clipped = get_algorithm("gspo").token_loss(
        logp, mx.array(inp["old_logp"], mx.float32), mx.array(inp["advantages"], mx.float32), mask, settings
    )
    clipped = np.array(clipped)
    for row in np.flatnonzero(inp["mask"].any(1)):
        sign = np.sign(inp["advantages"][row][inp["mask"][row]])  # the clip branch depends on A's sign per token
        flags = clipped[row][inp["mask"][row]]
        assert len(set(zip(sign, flags, strict=True))) <= 2, "one ratio per sequence: tokens of a sign agree"
    assert mx_loss(logits, inp, opt)[0] == pytest.approx(np_loss(logits, inp, opt), rel=1e-5)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_gspo_spreads_a_rows_weighted_advantage_sum_evenly_over_its_tokens(aggregation):
    """What GSPO computes when advantages and rollout weights vary within a row (docs/training.md): d loss / d
    log pi(y_i,t') = -s_i [sum_t w_t iw_t A_t u_t] / |y_i| for every trained t', in float64 from the definition."""
    _, inp = random_inputs(3)
    rng = np.random.default_rng(3)
    shift = np.array([0.03, 0.0, 0.0, -0.002])[:, None]  # row 0's ratio is clipped, rows 1 and 3 stay inside
    logp = inp["old_logp"] + shift + rng.normal(0, 0.002, size=(B, T))
    iw = np.exp(rng.normal(0, 0.5, size=(B, T)))
    opt = {"algorithm": "gspo", "clip_ratio": 0.005, "clip_ratio_high": 0.01, "aggregation": aggregation}
    weights = aggregation_weights(inp["mask"], aggregation)

    def f(lp):
        return mx_policy_loss(lp, None, {**inp, "importance_weight": iw}, weights, opt)

    grad = np.array(mx.grad(f)(mx.array(logp, mx.float32)), np.float64)
    mask, adv = inp["mask"], inp["advantages"]
    clipped_rows = 0
    for i in np.flatnonzero(mask.any(1)):
        n = mask[i].sum()
        s = np.exp((logp[i] - inp["old_logp"][i])[mask[i]].sum() / n)
        a = adv[i][mask[i]]
        unclipped = s * a <= np.clip(s, 1 - 0.005, 1 + 0.01) * a  # min picks the unclipped term
        clipped_rows += not unclipped.all()
        expected = -s * (weights[i][mask[i]] * iw[i][mask[i]] * a * unclipped).sum() / n
        np.testing.assert_allclose(grad[i][mask[i]], expected, rtol=1e-4, atol=1e-7)
        assert np.all(grad[i][~mask[i]] == 0)
    assert 0 < clipped_rows < mask.any(1).sum(), "both branches of the clip are exercised"


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_importance_weights_and_raw_ratios_match_numpy(level, mode):
    _, inp = random_inputs(7)
    low, high = (None if mode == "truncate" else 0.8), 1.25
    weight, ratio = importance_weights(
        mx.array(inp["old_logp"], mx.float32),
        mx.array(inp["rollout_logp"], mx.float32),
        mx.array(inp["mask"]),
        level=level,
        mode=mode,
        low=low,
        high=high,
    )
    np_weight, np_ratio = np_importance(inp["old_logp"], inp["rollout_logp"], inp["mask"], level, mode, low, high)
    np.testing.assert_allclose(np.array(ratio), np_ratio, rtol=1e-5)
    np.testing.assert_allclose(np.array(weight), np_weight, rtol=1e-5)
    trained = inp["mask"]
    outside = ((np_ratio < 0.8) | (np_ratio > high)) & trained
    assert outside.any() and (~outside & trained).any(), "the bounds are exercised from both sides"
    if mode == "mask":
        assert np.all(np.array(weight)[outside] == 0)
    else:  # TIS caps from above only: a ratio below 0.8 keeps its value
        below = (np_ratio <= high) & trained
        assert np.allclose(np.array(weight)[below], np_ratio[below], rtol=1e-5)
        assert level == "sequence" or (np_ratio[trained] < 0.8).any(), "some token ratios lie below 0.8"
        assert np.array(weight)[trained].max() <= high + 1e-6
    assert np.all(np.array(weight)[~trained] == 1.0)
    if level == "sequence":  # one ratio per row, on all its trained tokens
        for row in np.flatnonzero(trained.any(1)):
            assert np.ptp(np.array(ratio)[row][trained[row]]) < 1e-6


def test_truncation_has_no_lower_bound_and_mask_defaults_its_lower_bound_to_one_over_the_cap():
    old, rollout = mx.zeros((1, 4)), mx.array([[0.0, -0.1, 0.5, 0.9]])  # ratios 1, e^0.1, e^-0.5, e^-0.9
    mask = mx.ones((1, 4), mx.bool_)
    with pytest.raises(ValueError, match="caps from above"):
        importance_weights(old, rollout, mask, level="token", mode="truncate", low=0.5, high=2.0)
    weight, ratio = importance_weights(old, rollout, mask, level="token", mode="mask", low=None, high=2.0)
    keep = [1.0, np.exp(0.1), np.exp(-0.5), 0.0]  # e^-0.9 = 0.41 < 1/2: rejected; e^-0.5 = 0.61 kept
    np.testing.assert_allclose(np.array(weight)[0], keep, rtol=1e-6)
    assert np.array(rejected_tokens(weight, mask)).tolist() == [[False, False, False, True]]


def test_sequence_ratios_never_overflow():
    old = mx.zeros((1, 64))
    rollout = mx.full((1, 64), -5.0)  # a product of 64 ratios of e^5
    weight, ratio = importance_weights(
        old, rollout, mx.ones((1, 64), mx.bool_), level="sequence", mode="mask", low=None, high=3.0
    )
    assert np.isfinite(np.array(ratio)).all() and np.all(np.array(weight) == 0)


def test_rollout_mismatch_matches_numpy():
    _, inp = random_inputs(8)
    learner, engine, mask = inp["old_logp"], inp["rollout_logp"], inp["mask"]
    fresh = mask & np.array([True, False, True, True])[:, None]  # row 1 came from an older adapter version
    stats = {
        k: v.item()
        for k, v in rollout_mismatch(
            mx.array(learner, mx.float32),
            mx.array(engine, mx.float32),
            rollout_mask=mx.array(mask),
            fresh_mask=mx.array(fresh),
        ).items()
    }
    diff, ratio = np.abs(learner - engine)[fresh], np.exp(learner - engine)[mask]
    assert stats["mismatch_abs_sum"] == pytest.approx(diff.sum(), rel=1e-5)
    assert stats["mismatch_abs_max"] == pytest.approx(diff.max(), rel=1e-5)
    assert stats["mismatch_tokens"] == fresh.sum() and stats["rollout_tokens"] == mask.sum()
    assert stats["rollout_ratio_sum"] == pytest.approx(ratio.sum(), rel=1e-5)
    assert stats["rollout_ratio_min"] == pytest.approx(ratio.min(), rel=1e-5)
    assert stats["rollout_ratio_max"] == pytest.approx(ratio.max(), rel=1e-5)
    assert stats["rollout_ratio_outside"] == ((ratio < 0.8) | (ratio > 1.25)).sum() > 0


def test_logprobs_and_entropy_use_the_temperature_scaled_distribution():
    logits, inp = random_inputs(3)
    logp, entropy = token_logprobs(
        mx.array(logits, mx.float32), mx.array(inp["targets"]), mx.array(inp["temperature"], mx.float32)
    )
    ref_logp, ref_entropy = np_logprobs(logits, inp["targets"], inp["temperature"])
    np.testing.assert_allclose(np.array(logp), ref_logp, atol=2e-5)
    np.testing.assert_allclose(np.array(entropy), ref_entropy, atol=2e-5)


def test_zero_advantages_give_zero_policy_gradient():
    logits, inp = random_inputs(4)
    inp["advantages"] = np.zeros((B, T))
    _, grad = mx_loss(logits, inp, {})
    assert np.all(grad == 0)


def test_fully_masked_sequence_contributes_nothing():
    logits, inp = random_inputs(5)
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        opt = {"aggregation": mode, "kl_beta": 0.1, "kl_estimator": "k3", "entropy_weight": 0.01}
        value, grad = mx_loss(logits, inp, opt)
        assert np.all(grad[2] == 0)  # row 2 is fully masked
        wild = logits.copy()
        wild[2] = 1e4  # whatever that row's logits, the loss does not move
        assert mx_loss(wild, inp, opt)[0] == pytest.approx(value, rel=1e-6)


def test_padding_cannot_produce_nan():
    """Old/reference log-probs at untrained positions are ignored, even absurd ones (exp overflow)."""
    logits, inp = random_inputs(6)
    inp["old_logp"] = np.where(inp["mask"], inp["old_logp"], -1e4)
    inp["ref_logp"] = np.where(inp["mask"], inp["ref_logp"], 1e4)
    value, grad = mx_loss(logits, inp, {"kl_beta": 0.1, "kl_estimator": "k3"})
    assert np.isfinite(value) and np.isfinite(grad).all()


def test_aggregation_weights_normalise_over_the_whole_batch():
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], bool)
    np.testing.assert_allclose(aggregation_weights(mask, "token-mean").sum(), 1.0)
    w = aggregation_weights(mask, "seq-mean-token-mean")
    np.testing.assert_allclose(w.sum(1), [0.5, 0.5, 0.0])
    w = aggregation_weights(mask, "seq-mean-token-sum-norm", norm_length=4)  # Dr. GRPO: sum / (4 * 2 sequences)
    np.testing.assert_allclose(w[0, 0], 1 / 8)
    np.testing.assert_allclose(w.sum(1), [2 / 8, 4 / 8, 0.0])


def test_dr_grpo_divides_by_a_constant_not_the_longest_row():
    """A row's weight is 1 / (norm_length * sequences), whatever the longest row of its batch: here no row fills
    the padded width (6) and the longest has 3 trained tokens."""
    mask = np.zeros((3, 6), bool)
    mask[0, 1:3] = True
    mask[1, 2:5] = True
    mask[2, :1] = True
    w = aggregation_weights(mask, "seq-mean-token-sum-norm", norm_length=24)
    np.testing.assert_allclose(w[mask], 1 / (24 * 3))
    assert np.all(w[~mask] == 0)
    longer = np.zeros((4, 6), bool)
    longer[:3] = mask
    longer[3, :] = True  # a longer answer joins the batch: the others keep their per-token weight up to the row count
    np.testing.assert_allclose(aggregation_weights(longer, "seq-mean-token-sum-norm", norm_length=24)[:3][mask], 1 / 96)
    with pytest.raises(ValueError, match="norm_length"):
        aggregation_weights(mask, "seq-mean-token-sum-norm")


# --- advantages --------------------------------------------------------------------------------------------------


def test_group_advantages_match_numpy_for_every_scaling():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=12)
    group = np.repeat([0, 1, 2], 4)
    eps = 1e-4
    centred = scores - np.repeat([scores[group == g].mean() for g in range(3)], 4)
    stds = np.repeat([scores[group == g].std() for g in range(3)], 4)
    np.testing.assert_allclose(group_advantages(scores, group, scale="group", eps=eps), centred / (stds + eps))
    np.testing.assert_allclose(group_advantages(scores, group, scale="batch", eps=eps), centred / (scores.std() + eps))
    np.testing.assert_allclose(group_advantages(scores, group, scale="none", eps=eps), centred)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_equal_scores_give_zero_advantages_not_nan(scale):
    scores = np.array([0.1, 0.1, 0.1, 1.0, 1.0])
    group = np.array([0, 0, 0, 1, 1])
    adv = group_advantages(scores, group, scale=scale, eps=1e-4)
    assert np.all(adv == 0)
    assert np.all(group_advantages(np.array([3.0]), np.array([0]), scale=scale, eps=1e-4) == 0)


def test_reinforce_uses_the_unscaled_group_mean_baseline():
    scores, group = np.array([1.0, 0.0, 0.0, 3.0]), np.array([0, 0, 1, 1])
    adv = get_algorithm("reinforce").advantages(scores, group, scale="group", eps=1e-4)
    np.testing.assert_allclose(adv, [0.5, -0.5, -1.5, 1.5])


def test_unknown_algorithm_is_named():
    with pytest.raises(ValueError, match="unknown algorithm 'ppo2'.*grpo"):
        get_algorithm("ppo2")


def test_token_advantages_given_ones_win_and_overrides_zero():
    g1 = ScoredGroup(
        tokens=[[5, 6, 7, 8], [5, 6, 9, 9]],
        masks=[[-100, -100, 7, 8], [-100, -100, 9, 9]],
        scores=[1.0, 0.0],
        overrides=[{}, {"set_advantage_to_zero": True}],
    )
    g2 = ScoredGroup(
        tokens=[[5, 6, 7], [5, 6, 8]],
        masks=[[-100, 6, 7], [-100, 6, 8]],
        scores=[1.0, 0.0],
        advantages=[[0.0, 0.5, 0.25], [0.0, -1.0, -2.0]],
    )
    tb = collate(RolloutBatch(groups=[g1, g2], source="mock"))
    adv = token_advantages(tb, group_advantages(tb.scores, tb.group, scale="none", eps=1e-4))
    np.testing.assert_allclose(
        adv,
        [
            [
                0.0,
                0.5,
                0.5,
            ],  # prompt position 0 (target tokens[1] is a prompt token), then the group advantage
            [0.0, 0.0, 0.0],  # set_advantage_to_zero
            [0.5, 0.25, 0.0],  # given per-token advantages [1:]; the third column is padding
            [-1.0, -2.0, 0.0],
        ],
    )
