"""The Tinker loss functions in float64 from their documented definitions, and inputs that exercise them: what
test_tinker_losses.py (values and gradients in-process) and test_tinker_sdk.py (over the wire) compare against."""

import math

import numpy as np


def inputs_for(loss_fn: str, lps: list[np.ndarray], rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    noise = 5e-4 if loss_fn == "gspo" else 0.3  # gspo's clip range is +-4e-4 around 1: straddle it
    out = []
    for lp in lps:
        n = len(lp)
        weights = (np.arange(n) >= 2).astype(np.float32)  # the first two positions are "prompt"
        x = {"weights": weights} if loss_fn in ("cross_entropy", "gspo") else {}
        if loss_fn != "cross_entropy":
            x["logprobs"] = (lp + rng.normal(0, noise, n)).astype(np.float32)
            x["advantages"] = (rng.normal(0, 1, n) * weights).astype(np.float32)
        out.append(x)
    return out


def reference(loss_fn: str, lp: np.ndarray, x: dict[str, np.ndarray], c: dict[str, float]) -> tuple[float, np.ndarray]:
    """(loss, dloss/dlp) of one datum in float64, from the documented definitions."""
    w = x.get("weights", np.ones_like(lp)).astype(np.float64)
    if loss_fn == "cross_entropy":
        return float(-(lp * w).sum()), -w
    q, a = x["logprobs"].astype(np.float64), x["advantages"].astype(np.float64)
    r = np.exp(lp - q)
    lo, hi = c.get("clip_low_threshold"), c.get("clip_high_threshold")
    if loss_fn == "importance_sampling":
        return float(-(r * a).sum()), -r * a
    if loss_fn == "ppo":
        unclipped, clipped = r * a, np.clip(r, lo, hi) * a
        active = (unclipped <= clipped) | ((r > lo) & (r < hi))
        return float(-np.minimum(unclipped, clipped).sum()), np.where(active, -r * a, 0.0)
    if loss_fn == "cispo":
        weight = np.clip(r, lo, hi)
        return float(-(weight * lp * a).sum()), -weight * a
    if loss_fn == "dro":
        beta = c["beta"]
        return float(-(lp * a - 0.5 * beta * (lp - q) ** 2).sum()), -(a - beta * (lp - q))
    assert loss_fn == "gspo"
    seq = w != 0
    s = math.exp(((lp - q) * seq).sum() / seq.sum())
    unclipped, clipped = s * a, min(max(s, lo), hi) * a
    active = (unclipped <= clipped) | (lo < s < hi)
    loss = -(np.minimum(unclipped, clipped) * seq).sum()
    grad = -(s / seq.sum()) * (a * active * seq).sum() * seq
    return float(loss), grad
