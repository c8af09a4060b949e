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
    policy_loss,
    rejected_tokens,
    rollout_mismatch,
)
from paraloop.messages import RolloutBatch, ScoredGroup

B, T, V = 4, 6, 11
NORM = 9  # Dr. GRPO's constant: more than any row's trained tokens, and more than the padded width T


# --- the independent NumPy reference ----------------------------------------------------------------------------


def np_logprobs(logits, targets, temperature, kept=None):
    """log p(target) and entropy of softmax(logits / T); where kept[b, t] = k > 0, of the distribution
    renormalised over the k largest logits (ties included) and the target (sampling-mask replay)."""
    z = logits / temperature[:, None, None]
    support = np.ones(z.shape, bool)
    if kept is not None:
        for b, t in zip(*np.nonzero(kept), strict=True):
            kth = np.sort(z[b, t])[::-1][min(kept[b, t], z.shape[-1]) - 1]
            support[b, t] = (z[b, t] >= kth) | (np.arange(z.shape[-1]) == targets[b, t])
    zs = np.where(support, z, -np.inf)
    zmax = zs.max(-1, keepdims=True)
    lse = (zmax + np.log(np.exp(zs - zmax).sum(-1, keepdims=True)))[..., 0]
    logp = np.take_along_axis(z, targets[..., None], -1)[..., 0] - lse
    p = np.exp(zs - lse[..., None])
    entropy = -np.where(support, p * (z - lse[..., None]), 0.0).sum(-1)
    return logp, entropy


def np_aggregate(token_loss, mask, mode):
    mask = mask.astype(float)
    n = mask.sum(1)
    active = n > 0
    if mode == "token-mean":
        return (token_loss * mask).sum() / n.sum()
    if mode == "seq-mean-token-mean":
        return np.mean([(token_loss[i] * mask[i]).sum() / n[i] for i in np.flatnonzero(active)])
    return np.mean([(token_loss[i] * mask[i]).sum() / NORM for i in np.flatnonzero(active)])


def np_ppo(ratio, adv, opt):
    eps_high = opt.get("clip_ratio_high") or opt.get("clip_ratio", 0.2)
    clipped = np.clip(ratio, 1 - opt.get("clip_ratio", 0.2), 1 + eps_high)
    return -np.minimum(ratio * adv, clipped * adv)


def np_importance(old, rollout, mask, level, mode, low, high):
    """(weights, raw ratios) written from the definitions: per token, or the product over a row's tokens.
    truncate (TIS) caps from above only; mask (MIS) keeps [low, high] with low = 1 / high when unset (verl)."""
    d = np.where(mask, old - rollout, 0.0)
    if level == "sequence":
        d = np.repeat(d.sum(1, keepdims=True), d.shape[1], axis=1)
    ratio = np.exp(np.clip(d, -20, 20))
    hi = high if high is not None else np.inf
    if mode == "truncate":
        assert low is None
        weight = np.minimum(ratio, hi)
    else:
        lo = low if low is not None else (1.0 / high if high is not None else 0.0)
        weight = np.where((ratio >= lo) & (ratio <= hi), ratio, 0.0)
    return np.where(mask, weight, 1.0), np.where(mask, ratio, 1.0)


def np_corrected(inp: dict, opt: dict) -> dict:
    """The reference's inputs under rollout correction: the weights, and for mask mode the rejected tokens out of
    the response mask (so out of every denominator and of the KL and entropy terms, as verl's rollout_rs)."""
    if "importance" not in opt:
        return inp
    level, mode, low, high = opt["importance"]
    weight, _ = np_importance(inp["old_logp"], inp["rollout_logp"], inp["mask"], level, mode, low, high)
    out = {**inp, "importance_weight": weight}
    if mode == "mask":
        out["mask"] = inp["mask"] & (weight != 0)
    return out


def np_loss(logits, inp, opt, frozen_logp=None):
    """The loss in float64. `frozen_logp`: the log-probs that stop-gradient terms read (default: these ones)."""
    logp, entropy = np_logprobs(logits, inp["targets"], inp["temperature"], inp.get("kept"))
    frozen = logp if frozen_logp is None else frozen_logp
    adv, mask = inp["advantages"], inp["mask"]
    algorithm = opt.get("algorithm", "grpo")
    log_ratio = np.where(mask, logp - inp["old_logp"], 0.0)
    if algorithm == "grpo":
        pg = np_ppo(np.exp(log_ratio), adv, opt)
    elif algorithm == "gspo":  # s_i = exp(mean of the row's trained log-ratios), one per sequence
        per_row = log_ratio.sum(1) / np.maximum(mask.sum(1), 1)
        pg = np_ppo(np.repeat(np.exp(per_row)[:, None], T, axis=1), adv, opt)
    elif algorithm == "cispo":  # the clipped weight is a constant (stop-gradient): logits enter through log p only
        frozen_ratio = np.exp(np.where(mask, frozen - inp["old_logp"], 0.0))
        pg = -np.minimum(frozen_ratio, opt.get("cispo_clip_max", 5.0)) * adv * logp
    else:
        pg = -adv * logp
    if "importance_weight" in inp:
        pg = pg * inp["importance_weight"]
    total = pg
    beta = opt.get("kl_beta", 0.0)
    if beta:
        d = inp["ref_logp"] - logp
        kl = {"k3": np.exp(d) - d - 1, "mse": 0.5 * d**2, "abs": np.abs(d)}[opt["kl_estimator"]]
        total = total + beta * kl
    total = total - opt.get("entropy_weight", 0.0) * entropy
    return np_aggregate(total, inp["mask"], opt.get("aggregation", "token-mean"))


def np_grad(logits, inp, opt, h=1e-6):
    frozen, _ = np_logprobs(logits, inp["targets"], inp["temperature"], inp.get("kept"))
    g = np.zeros_like(logits)
    for idx in np.ndindex(logits.shape):
        up, down = logits.copy(), logits.copy()
        up[idx] += h
        down[idx] -= h
        g[idx] = (np_loss(up, inp, opt, frozen) - np_loss(down, inp, opt, frozen)) / (2 * h)
    return g


# --- the MLX side -----------------------------------------------------------------------------------------------


def loss_settings(opt: dict) -> LossSettings:
    return LossSettings(
        clip_ratio=opt.get("clip_ratio", 0.2),
        clip_ratio_high=opt.get("clip_ratio_high"),
        kl_beta=opt.get("kl_beta", 0.0),
        kl_estimator=opt.get("kl_estimator", "k3"),
        entropy_weight=opt.get("entropy_weight", 0.0),
        cispo_clip_max=opt.get("cispo_clip_max", 5.0),
    )


def with_importance(inp: dict, opt: dict) -> dict:
    """Rollout correction (opt "importance"): the learner's old policy against the engine's log-probs; mask mode
    takes rejected tokens out of the mask, as the trainer does."""
    if "importance" not in opt:
        return inp
    level, mode, low, high = opt["importance"]
    iw, _ = importance_weights(
        mx.array(inp["old_logp"], mx.float32), mx.array(inp["rollout_logp"], mx.float32),
        mx.array(inp["mask"]), level=level, mode=mode, low=low, high=high,
    )  # fmt: skip
    out = {**inp, "importance_weight": np.array(iw)}
    if mode == "mask":
        out["mask"] = inp["mask"] & ~np.array(rejected_tokens(iw, mx.array(inp["mask"])))
    return out


def mx_policy_loss(logp, entropy, inp: dict, weights: np.ndarray, opt: dict) -> mx.array:
    """paraloop's policy_loss on MLX log-probs, with the inputs and option `opt` of the float64 reference."""
    loss, _ = policy_loss(
        logp,
        entropy,
        mask=mx.array(inp["mask"]),
        weights=mx.array(weights),
        advantages=mx.array(inp["advantages"], mx.float32),
        old_logp=mx.array(inp["old_logp"], mx.float32),
        ref_logp=mx.array(inp["ref_logp"], mx.float32),
        importance_weight=mx.array(inp["importance_weight"], mx.float32) if "importance_weight" in inp else None,
        token_loss=get_algorithm(opt.get("algorithm", "grpo")).token_loss,
        settings=loss_settings(opt),
    )
    return loss


def mx_loss(logits, inp, opt):
    inp = with_importance(inp, opt)
    weights = aggregation_weights(inp["mask"], opt.get("aggregation", "token-mean"), norm_length=NORM)

    kept = mx.array(inp["kept"]) if "kept" in inp else None

    def f(x):
        logp, entropy = token_logprobs(
            x, mx.array(inp["targets"]), mx.array(inp["temperature"], mx.float32), kept=kept
        )
        return mx_policy_loss(logp, entropy, inp, weights, opt)

    value, grad = mx.value_and_grad(f)(mx.array(logits, mx.float32))
    return value.item(), np.array(grad, np.float64)


def random_inputs(seed: int) -> tuple[np.ndarray, dict]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2.0, size=(B, T, V))
    targets = rng.integers(0, V, size=(B, T))
    mask = np.ones((B, T), bool)
    mask[0, :2] = False  # a prompt
    mask[1, 4:] = False  # padding
    mask[2, :] = False  # a fully masked sequence
    temperature = np.array([1.0, 0.7, 1.3, 0.9])
    logp, _ = np_logprobs(logits, targets, temperature)
    # the old policy and the reference sit near the current one; some ratios fall outside the clip range
    inp = {
        "targets": targets,
        "mask": mask,
        "temperature": temperature,
        "advantages": rng.normal(0, 1, size=(B, T)),
        "old_logp": logp + rng.normal(0, 0.3, size=(B, T)),
        "ref_logp": logp + rng.normal(0, 0.5, size=(B, T)),
    }
    inp["rollout_logp"] = inp["old_logp"] + rng.normal(0, 0.3, size=(B, T))  # the engine's numerics differ a bit
    return logits, inp


OPTIONS = [
    {},
    {"aggregation": "seq-mean-token-mean"},
    {"aggregation": "seq-mean-token-sum-norm"},
    {"clip_ratio": 0.1, "clip_ratio_high": 0.28},
    {"importance_weight": True},
    {"kl_beta": 0.1, "kl_estimator": "k3"},
    {"kl_beta": 0.1, "kl_estimator": "mse"},
    {"kl_beta": 0.1, "kl_estimator": "abs"},
    {"entropy_weight": 0.01},
    {"algorithm": "reinforce"},
    {"algorithm": "reinforce", "kl_beta": 0.05, "kl_estimator": "k3", "aggregation": "seq-mean-token-mean"},
    {
        "kl_beta": 0.2,
        "kl_estimator": "k3",
        "entropy_weight": -0.02,
        "clip_ratio_high": 0.3,
        "importance_weight": True,
        "aggregation": "seq-mean-token-sum-norm",
    },
    {"algorithm": "gspo"},
    {"algorithm": "gspo", "clip_ratio": 0.03, "clip_ratio_high": 0.05, "aggregation": "seq-mean-token-mean"},
    {"algorithm": "gspo", "aggregation": "seq-mean-token-sum-norm", "kl_beta": 0.1, "kl_estimator": "k3"},
    {"algorithm": "cispo"},
    {"algorithm": "cispo", "cispo_clip_max": 1.1, "aggregation": "seq-mean-token-mean"},
    {"algorithm": "cispo", "cispo_clip_max": 1.1, "importance": ("sequence", "mask", 0.5, 2.0)},
    {"importance": ("token", "truncate", None, 1.2)},
    {"importance": ("token", "truncate", None, 1.05)},
    {"importance": ("token", "mask", 0.8, 1.25)},
    {"importance": ("sequence", "truncate", None, 2.0)},
    {"importance": ("token", "mask", None, 1.25), "kl_beta": 0.1, "kl_estimator": "k3", "entropy_weight": 0.01},
    {"importance": ("sequence", "mask", None, 2.0), "aggregation": "seq-mean-token-sum-norm", "kl_beta": 0.1,
     "kl_estimator": "mse"},
    {"importance": ("sequence", "mask", None, 1.5), "aggregation": "seq-mean-token-mean"},
    {"algorithm": "gspo", "importance": ("token", "mask", None, 1.3), "clip_ratio": 0.03},
]


@pytest.mark.parametrize(
    "opt", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default"
)
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


def replay_kept(inp: dict, logits: np.ndarray, seed: int) -> np.ndarray:
    """(B, T) kept-set sizes: 0 (full vocabulary), 1, small sets, the whole vocabulary, and sets the target falls
    just outside of (the learner ranks a boundary token one place lower than the engine did)."""
    rng = np.random.default_rng(seed)
    kept = rng.choice([0, 1, 2, 3, 5, V], size=(B, T))
    z = logits / inp["temperature"][:, None, None]
    rank = (z > np.take_along_axis(z, inp["targets"][..., None], -1)).sum(-1)  # 0: the most likely token
    kept[0, 3] = max(1, rank[0, 3])  # the target is the (k+1)-th: outside the top k, kept anyway
    kept[3, 1] = rank[3, 1] + 1  # the target is the k-th: the boundary token, inside
    return kept


@pytest.mark.parametrize(
    "opt",
    [{}, {"kl_beta": 0.1, "kl_estimator": "k3", "entropy_weight": 0.02}, {"algorithm": "gspo", "clip_ratio": 0.03},
     {"algorithm": "cispo", "cispo_clip_max": 1.1, "aggregation": "seq-mean-token-mean", "entropy_weight": -0.01}],
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
    logp, entropy = token_logprobs(mx.array(logits, mx.float32), mx.array(inp["targets"]),
                                   mx.array(inp["temperature"], mx.float32), kept=mx.array(inp["kept"]))  # fmt: skip
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
        mx.array(inp["old_logp"], mx.float32), mx.array(inp["rollout_logp"], mx.float32), mx.array(inp["mask"]),
        level=level, mode=mode, low=low, high=high,
    )  # fmt: skip
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
    weight, ratio = importance_weights(old, rollout, mx.ones((1, 64), mx.bool_), level="sequence", mode="mask",
                                       low=None, high=3.0)
    assert np.isfinite(np.array(ratio)).all() and np.all(np.array(weight) == 0)


def test_rollout_mismatch_matches_numpy():
    _, inp = random_inputs(8)
    learner, engine, mask = inp["old_logp"], inp["rollout_logp"], inp["mask"]
    fresh = mask & np.array([True, False, True, True])[:, None]  # row 1 came from an older adapter version
    stats = {k: v.item() for k, v in rollout_mismatch(
        mx.array(learner, mx.float32), mx.array(engine, mx.float32), rollout_mask=mx.array(mask),
        fresh_mask=mx.array(fresh),
    ).items()}  # fmt: skip
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
    np.testing.assert_allclose(
        group_advantages(scores, group, scale="group", eps=eps), centred / (stds + eps)
    )
    np.testing.assert_allclose(
        group_advantages(scores, group, scale="batch", eps=eps), centred / (scores.std() + eps)
    )
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
