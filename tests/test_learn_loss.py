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
from paraloop.learn.loss import LossSettings, aggregation_weights, policy_loss
from paraloop.messages import RolloutBatch, ScoredGroup

B, T, V = 4, 6, 11


# --- the independent NumPy reference ----------------------------------------------------------------------------


def np_logprobs(logits, targets, temperature):
    z = logits / temperature[:, None, None]
    zmax = z.max(-1, keepdims=True)
    lse = (zmax + np.log(np.exp(z - zmax).sum(-1, keepdims=True)))[..., 0]
    logp = np.take_along_axis(z, targets[..., None], -1)[..., 0] - lse
    p = np.exp(z - lse[..., None])
    entropy = -(p * np.log(p)).sum(-1)
    return logp, entropy


def np_aggregate(token_loss, mask, mode):
    mask = mask.astype(float)
    n = mask.sum(1)
    active = n > 0
    if mode == "token-mean":
        return (token_loss * mask).sum() / n.sum()
    if mode == "seq-mean-token-mean":
        return np.mean([(token_loss[i] * mask[i]).sum() / n[i] for i in np.flatnonzero(active)])
    return np.mean([(token_loss[i] * mask[i]).sum() / n.max() for i in np.flatnonzero(active)])


def np_loss(logits, inp, opt):
    logp, entropy = np_logprobs(logits, inp["targets"], inp["temperature"])
    adv = inp["advantages"]
    if opt.get("algorithm", "grpo") == "grpo":
        ratio = np.exp(logp - inp["old_logp"])
        eps_high = opt.get("clip_ratio_high") or opt.get("clip_ratio", 0.2)
        clipped = np.clip(ratio, 1 - opt.get("clip_ratio", 0.2), 1 + eps_high)
        pg = -np.minimum(ratio * adv, clipped * adv)
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
    g = np.zeros_like(logits)
    for idx in np.ndindex(logits.shape):
        up, down = logits.copy(), logits.copy()
        up[idx] += h
        down[idx] -= h
        g[idx] = (np_loss(up, inp, opt) - np_loss(down, inp, opt)) / (2 * h)
    return g


# --- the MLX side -----------------------------------------------------------------------------------------------


def mx_loss(logits, inp, opt):
    settings = LossSettings(
        clip_ratio=opt.get("clip_ratio", 0.2),
        clip_ratio_high=opt.get("clip_ratio_high"),
        kl_beta=opt.get("kl_beta", 0.0),
        kl_estimator=opt.get("kl_estimator", "k3"),
        entropy_weight=opt.get("entropy_weight", 0.0),
    )
    weights = aggregation_weights(inp["mask"], opt.get("aggregation", "token-mean"))

    def f(x):
        logp, entropy = token_logprobs(x, mx.array(inp["targets"]), mx.array(inp["temperature"], mx.float32))
        loss, _ = policy_loss(
            logp,
            entropy,
            mask=mx.array(inp["mask"]),
            weights=mx.array(weights),
            advantages=mx.array(inp["advantages"], mx.float32),
            old_logp=mx.array(inp["old_logp"], mx.float32),
            ref_logp=mx.array(inp["ref_logp"], mx.float32),
            importance_weight=(
                mx.array(inp["importance_weight"], mx.float32) if "importance_weight" in inp else None
            ),
            token_loss=get_algorithm(opt.get("algorithm", "grpo")).token_loss,
            settings=settings,
        )
        return loss

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
    expected = np_loss(logits, inp, opt)
    np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, np_grad(logits, inp, opt), rtol=1e-3, atol=2e-6)


def test_some_random_ratios_are_clipped():
    """Guards the test above: it must exercise both branches of the PPO min."""
    logits, inp = random_inputs(0)
    logp, _ = np_logprobs(logits, inp["targets"], inp["temperature"])
    ratio = np.exp(logp - inp["old_logp"])[inp["mask"]]
    assert ((ratio < 0.8) | (ratio > 1.2)).any() and ((ratio > 0.8) & (ratio < 1.2)).any()


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
    w = aggregation_weights(mask, "seq-mean-token-sum-norm")  # Dr. GRPO: sum / (4 tokens * 2 sequences)
    np.testing.assert_allclose(w[0, 0], 1 / 8)
    np.testing.assert_allclose(w.sum(1), [2 / 8, 4 / 8, 0.0])


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
