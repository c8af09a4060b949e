"""The policy-gradient loss as pure functions: token losses -> KL and entropy terms -> one aggregated scalar.

In: per-token arrays (B, T): the policy's log-probs and entropies (differentiable), the old policy's and the
reference's log-probs, advantages, truncated importance weights, and aggregation weights from
`aggregation_weights`. Out: the scalar loss and additive statistics (sums, so micro-batches can be combined).

Every aggregation mode is written as `sum(token_loss * weight)` with weights computed once over the WHOLE batch,
so summing micro-batch losses (and gradients) gives exactly the full-batch loss (and gradient). No I/O, no model.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import mlx.core as mx
import numpy as np

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
KlEstimator = Literal["k3", "mse", "abs"]


@dataclass(frozen=True)
class LossSettings:
    clip_ratio: float = 0.2  # PPO epsilon, lower side (and upper unless clip_ratio_high)
    clip_ratio_high: float | None = None  # DAPO clip-higher
    kl_beta: float = 0.0
    kl_estimator: KlEstimator = "k3"
    entropy_weight: float = 0.0


# (logp, old_logp, advantages, settings) -> (token loss, 1.0 where the clipped branch was taken)
TokenLoss = Callable[[mx.array, mx.array, mx.array, LossSettings], tuple[mx.array, mx.array]]


def aggregation_weights(mask: np.ndarray, mode: Aggregation) -> np.ndarray:
    """(N, T) float32 weights w with loss = sum(token_loss * w), for the whole batch.

    token-mean: every trained token counts the same (1 / all trained tokens).
    seq-mean-token-mean: mean over sequences of each sequence's token mean.
    seq-mean-token-sum-norm (Dr. GRPO): mean over sequences of the token SUM divided by a constant, the longest
    generation (most trained tokens of any row) in the batch, so long answers are not down-weighted per token.
    Sequences without trained tokens get weight 0 and do not count in any denominator.
    """
    mask = np.asarray(mask, bool)
    per_row = mask.sum(axis=1)
    rows = max(1, int((per_row > 0).sum()))
    if mode == "token-mean":
        w = mask / max(1, int(per_row.sum()))
    elif mode == "seq-mean-token-mean":
        w = mask / np.maximum(per_row, 1)[:, None] / rows
    elif mode == "seq-mean-token-sum-norm":
        w = mask / (max(1, int(per_row.max(initial=0))) * rows)
    else:
        raise ValueError(
            f"loss_aggregation must be token-mean, seq-mean-token-mean or seq-mean-token-sum-norm, not {mode!r}"
        )
    return w.astype(np.float32)


def kl_estimate(logp: mx.array, ref_logp: mx.array, estimator: KlEstimator) -> mx.array:
    """Per-token KL(policy || reference) estimate from the sampled token's log-probs."""
    if estimator == "k3":  # Schulman's k3: unbiased, always >= 0
        d = ref_logp - logp
        return mx.exp(d) - d - 1.0
    if estimator == "mse":
        return 0.5 * mx.square(logp - ref_logp)
    if estimator == "abs":
        return mx.abs(logp - ref_logp)
    raise ValueError(f"kl_estimator must be k3, mse or abs, not {estimator!r}")


def clipped_surrogate(
    logp: mx.array, old_logp: mx.array, advantages: mx.array, settings: LossSettings
) -> tuple[mx.array, mx.array]:
    """PPO/GRPO token loss -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) with r = exp(logp - old_logp)."""
    ratio = mx.exp(logp - old_logp)
    high = settings.clip_ratio if settings.clip_ratio_high is None else settings.clip_ratio_high
    unclipped = ratio * advantages
    clipped = mx.clip(ratio, 1.0 - settings.clip_ratio, 1.0 + high) * advantages
    return -mx.minimum(unclipped, clipped), (clipped < unclipped).astype(mx.float32)


def policy_loss(
    logp: mx.array,
    entropy: mx.array | None,
    *,
    mask: mx.array,
    weights: mx.array,
    advantages: mx.array,
    old_logp: mx.array,
    ref_logp: mx.array | None = None,
    importance_weight: mx.array | None = None,
    token_loss: TokenLoss = clipped_surrogate,
    settings: LossSettings,
) -> tuple[mx.array, dict[str, mx.array]]:
    """Scalar loss = sum(weights * (iw * pg + beta * kl - entropy_weight * H)) and its statistics.

    Untrained positions (mask False) read the policy's own (detached) log-prob as old and reference values, so
    padding can never overflow into inf * 0 = NaN; their weight is 0 anyway.
    """
    mask = mask.astype(mx.bool_)
    detached = mx.stop_gradient(logp)
    old = mx.where(mask, old_logp, detached)
    pg, clipped = token_loss(logp, old, advantages, settings)
    if importance_weight is not None:
        pg = pg * mx.stop_gradient(importance_weight)
    total = pg
    zeros = mx.zeros_like(logp)
    kl = zeros
    if settings.kl_beta > 0 and ref_logp is not None:
        kl = kl_estimate(logp, mx.where(mask, ref_logp, detached), settings.kl_estimator)
        total = total + settings.kl_beta * kl
    if settings.entropy_weight != 0 and entropy is not None:
        total = total - settings.entropy_weight * entropy
    loss = mx.sum(total * weights)

    fmask = mask.astype(mx.float32)
    ratio = mx.exp(detached - old)
    big = mx.array(np.finfo(np.float32).max)
    stats = {
        "pg_loss": mx.stop_gradient(mx.sum(pg * weights)),
        "kl": mx.stop_gradient(mx.sum(kl * weights)),
        "entropy": mx.sum(mx.stop_gradient(entropy) * weights) if entropy is not None else mx.array(0.0),
        "clipped": mx.sum(mx.stop_gradient(clipped) * fmask),
        "ratio_sum": mx.sum(ratio * fmask),
        "ratio_min": mx.min(mx.where(mask, ratio, big)),
        "ratio_max": mx.max(mx.where(mask, ratio, -big)),
        "tokens": mx.sum(fmask),
        "importance_weight_sum": (
            mx.sum(importance_weight * fmask) if importance_weight is not None else mx.sum(fmask)
        ),
    }
    return loss, stats
