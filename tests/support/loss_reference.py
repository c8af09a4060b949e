"""An independent float64 NumPy version of the loss (log-probs, PPO/GSPO/CISPO/REINFORCE, KL, entropy, rollout
correction, aggregation), its finite-difference gradients, and the same inputs through paraloop's MLX loss: what
test_learn_loss.py and test_learn_logprobs.py compare."""

import paraloop  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import mlx.core as mx
import numpy as np

from paraloop.learn.algorithms import get_algorithm
from paraloop.learn.logprobs import token_logprobs
from paraloop.learn.loss import LossSettings, aggregation_weights, importance_weights, policy_loss, rejected_tokens

B, T, V = 4, 6, 11
NORM = 9  # Dr. GRPO's constant: more than any row's trained tokens, and more than the padded width T


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
        mx.array(inp["old_logp"], mx.float32),
        mx.array(inp["rollout_logp"], mx.float32),
        mx.array(inp["mask"]),
        level=level,
        mode=mode,
        low=low,
        high=high,
    )
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
        logp, entropy = token_logprobs(x, mx.array(inp["targets"]), mx.array(inp["temperature"], mx.float32), kept=kept)
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
    {
        "importance": ("sequence", "mask", None, 2.0),
        "aggregation": "seq-mean-token-sum-norm",
        "kl_beta": 0.1,
        "kl_estimator": "mse",
    },
    {"importance": ("sequence", "mask", None, 1.5), "aggregation": "seq-mean-token-mean"},
    {"algorithm": "gspo", "importance": ("token", "mask", None, 1.3), "clip_ratio": 0.03},
]


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
