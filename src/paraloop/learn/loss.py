"""The policy-gradient loss as pure functions: token losses -> KL and entropy terms -> one aggregated scalar.

In: per-token arrays (B, T): the policy's log-probs and entropies (differentiable), the old policy's, the
reference's and the rollout engine's log-probs, advantages, importance weights (`importance_weights`), and
aggregation weights from `aggregation_weights`. Out: the scalar loss and additive statistics (sums, minima and
maxima, so micro-batches can be combined).

Every aggregation mode is written as `sum(token_loss * weight)` with weights computed once over the WHOLE batch,
so summing micro-batch losses (and gradients) gives exactly the full-batch loss (and gradient). Sequence-level
quantities (GSPO's ratio, sequence-level importance weights) reduce over a row's own tokens only, and a row is never
split between micro-batches, so they are exact per micro-batch too. No I/O, no model.

The token losses (registered by name in algorithms.py), with r = pi_theta / pi_old per token and A the advantage:

    grpo / PPO   -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)                    (Schulman 2017; DAPO clip-higher)
    gspo         the same with r replaced by the row's length-normalised sequence ratio
                 s = exp(mean_t log r_t), so a sequence is clipped as a whole        (Zheng et al. 2025, 2507.18071)
    cispo        -sg(min(r, cispo_clip_max)) A log pi_theta: the clipped importance weight is a constant, so
                 every token keeps a gradient (clipping never zeroes it)             (MiniMax-M1, 2506.13585)
    reinforce    -A log pi_theta
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import mlx.core as mx
import numpy as np

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
KlEstimator = Literal["k3", "mse", "abs"]
ImportanceLevel = Literal["token", "sequence"]
ImportanceMode = Literal["truncate", "mask"]

LOG_RATIO_BOUND = 20.0  # exp(+-20): log-ratios are bounded here before exp, as verl does, so a ratio is never inf
MISMATCH_BAND = (0.8, 1.25)  # the rollout ratio is reported as the fraction of tokens outside this band


@dataclass(frozen=True)
class LossSettings:
    clip_ratio: float = 0.2  # PPO epsilon, lower side (and upper unless clip_ratio_high)
    clip_ratio_high: float | None = None  # DAPO clip-higher
    kl_beta: float = 0.0
    kl_estimator: KlEstimator = "k3"
    entropy_weight: float = 0.0
    cispo_clip_max: float = 5.0  # CISPO: upper bound of the stop-gradient importance weight (1 + eps_high^IS)

    @property
    def clip_high(self) -> float:
        return self.clip_ratio if self.clip_ratio_high is None else self.clip_ratio_high


# (logp, old_logp, advantages, mask, settings) -> (token loss, 1.0 where the clipped branch was taken)
TokenLoss = Callable[[mx.array, mx.array, mx.array, mx.array, LossSettings], tuple[mx.array, mx.array]]


def aggregation_weights(
    mask: np.ndarray, mode: Aggregation, *, norm_length: int | None = None, row_tokens: np.ndarray | None = None
) -> np.ndarray:
    """(N, T) float32 weights w with loss = sum(token_loss * w), for the whole batch.

    token-mean: every trained token counts the same (1 / all trained tokens).
    seq-mean-token-mean: mean over sequences of each sequence's token mean.
    seq-mean-token-sum-norm (Dr. GRPO, Liu et al. 2025, arXiv 2503.20783): mean over sequences of the token SUM
    divided by a constant `norm_length` (the maximum completion length, as TRL's dr_grpo divides by
    max_completion_length), so a sequence's weight never depends on what else is in its batch and long answers are
    not down-weighted per token.
    Sequences without trained tokens get weight 0 and do not count in any denominator.
    `row_tokens` (N,): each row's trained tokens when `mask` is not the whole story (data parallelism: a rank
    knows which of ITS rows' tokens rollout-correction masking rejected, and only the counts of the others').
    """
    mask = np.asarray(mask, bool)
    per_row = mask.sum(axis=1) if row_tokens is None else np.asarray(row_tokens, np.int64)
    rows = max(1, int((per_row > 0).sum()))
    if mode == "token-mean":
        w = mask / max(1, int(per_row.sum()))
    elif mode == "seq-mean-token-mean":
        w = mask / np.maximum(per_row, 1)[:, None] / rows
    elif mode == "seq-mean-token-sum-norm":
        if norm_length is None or norm_length < 1:
            raise ValueError(f"seq-mean-token-sum-norm needs a constant norm_length >= 1, got {norm_length!r}")
        w = mask / (float(norm_length) * rows)
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


def _row_mean(values: mx.array, mask: mx.array) -> mx.array:
    """(B, 1): the mean of `values` over each row's masked positions (0 for a row without any)."""
    fmask = mask.astype(mx.float32)
    return mx.sum(values * fmask, axis=1, keepdims=True) / mx.maximum(mx.sum(fmask, axis=1, keepdims=True), 1.0)


def _ppo_clip(ratio: mx.array, advantages: mx.array, settings: LossSettings) -> tuple[mx.array, mx.array]:
    unclipped = ratio * advantages
    clipped = mx.clip(ratio, 1.0 - settings.clip_ratio, 1.0 + settings.clip_high) * advantages
    return -mx.minimum(unclipped, clipped), (clipped < unclipped).astype(mx.float32)


def clipped_surrogate(
    logp: mx.array, old_logp: mx.array, advantages: mx.array, mask: mx.array, settings: LossSettings
) -> tuple[mx.array, mx.array]:
    """PPO/GRPO token loss -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) with r = exp(logp - old_logp)."""
    del mask
    return _ppo_clip(mx.exp(logp - old_logp), advantages, settings)


def gspo_surrogate(
    logp: mx.array, old_logp: mx.array, advantages: mx.array, mask: mx.array, settings: LossSettings
) -> tuple[mx.array, mx.array]:
    """GSPO: the PPO clip on the sequence ratio s_i = exp((1/|y_i|) sum_t (logp - old_logp)), one per row.

    Every token t of row i gets the token loss -min(s_i A_t, clip(s_i) A_t) (times its importance weight iw_t and
    aggregation weight w_t). Since s_i depends on all the row's tokens, the row's gradient is

        s_i * [sum_t w_t iw_t A_t u_t] * (1/|y_i|) sum_t' grad log pi(y_i,t')      (u_t = 1 where unclipped)

    i.e. the row's weighted advantage sum spread evenly over its tokens. With constant A and iw in the row and the
    paper's seq-mean-token-mean aggregation (w_t = 1 / (|y_i| G)) that is s_i A_i (1/|y_i|) sum_t grad log pi /
    G, the GSPO paper's (eq. 7-10), GSPO-token's (verl) and TRL's importance_sampling_level = "sequence". When A
    or iw vary within a row (Atropos per-token advantages, token-level rollout correction), GSPO-token instead
    gives token t the gradient s_i A_t iw_t grad log pi_t: the same total per row, distributed by token, not
    evenly. Under token-mean aggregation each row's term is multiplied by |y_i| (TRL's/verl's sequence-level
    form), so long rows weigh more; algorithm = "gspo" therefore defaults to seq-mean-token-mean. The paper clips
    at about 3e-4 / 4e-4 (clip_ratio / clip_ratio_high), not PPO's 0.2: a length-normalised ratio moves much less
    than a token's."""
    log_s = _row_mean(logp - old_logp, mask)  # (B, 1)
    ratio = mx.broadcast_to(mx.exp(log_s), logp.shape)
    return _ppo_clip(ratio, advantages, settings)


def cispo_surrogate(
    logp: mx.array, old_logp: mx.array, advantages: mx.array, mask: mx.array, settings: LossSettings
) -> tuple[mx.array, mx.array]:
    """CISPO: -sg(min(r, cispo_clip_max)) A log pi. MiniMax-M1 sets no lower bound (eps_low^IS large); TRL's
    loss_type="cispo" uses the same min(r, epsilon_high) with 5.0 recommended (ScaleRL, arXiv 2510.13786)."""
    del mask
    ratio = mx.exp(logp - old_logp)
    weight = mx.stop_gradient(mx.minimum(ratio, settings.cispo_clip_max))
    return -weight * advantages * logp, (ratio > settings.cispo_clip_max).astype(mx.float32)


def importance_weights(
    old_logp: mx.array,
    rollout_logp: mx.array,
    mask: mx.array,
    *,
    level: ImportanceLevel,
    mode: ImportanceMode,
    low: float | None,
    high: float | None,
) -> tuple[mx.array, mx.array]:
    """Rollout correction: (weights, raw ratios), both (B, T), for pi_old / pi_rollout.

    The learner's old policy (pi_old, its own forward) and the engine that sampled the rollout (pi_rollout, its
    recorded log-probs) differ by numerics and, for stale rollouts, by adapter versions. The raw ratio rho is per
    token (`token`), or per sequence (`sequence`): the product of the row's token ratios, exp(sum_t log rho_t),
    broadcast over its tokens (TRL vllm_importance_sampling_mode sequence_*, verl rollout_is=sequence).
    `truncate` (TIS, Yao et al. 2025 "Your efficient RL framework secretly brings you off-policy RL training"; verl
    rollout_is): w = min(rho, high), capped from above only (`low` must be None). `mask` (MIS, verl rollout_rs /
    TRL *_mask): w = rho inside [low, high], 0 outside, with low = 1 / high when unset (verl's default) and no
    upper bound when high is unset. The trainer removes masked tokens from the response mask (`rejected_tokens`):
    out of every aggregation denominator and out of the KL and entropy terms, as verl does. Untrained positions
    get weight 1 and ratio 1. Log-ratios are bounded to +-20 before exp (verl's safety bound), so neither output is
    ever inf.
    """
    if level not in ("token", "sequence"):
        raise ValueError(f"importance_level must be token or sequence, not {level!r}")
    if mode not in ("truncate", "mask"):
        raise ValueError(f"importance_mode must be truncate or mask, not {mode!r}")
    mask = mask.astype(mx.bool_)
    d = mx.where(mask, old_logp - rollout_logp, 0.0)
    if level == "sequence":
        d = mx.broadcast_to(mx.sum(d, axis=1, keepdims=True), d.shape)
    ratio = mx.exp(mx.clip(d, -LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    if mode == "truncate" and low is not None:
        raise ValueError("importance_min bounds mode 'mask' only: truncation (TIS) caps from above")
    lo, hi = importance_bounds(mode, low, high)
    if mode == "truncate":
        weight = mx.minimum(ratio, hi)
    else:
        weight = mx.where((ratio >= lo) & (ratio <= hi), ratio, 0.0)
    one = mx.ones_like(ratio)
    return mx.where(mask, weight, one), mx.where(mask, ratio, one)


def importance_bounds(mode: ImportanceMode, low: float | None, high: float | None) -> tuple[float, float]:
    """The [low, high] `importance_weights` applies: mask's low defaults to 1 / high (verl rollout_rs); an unset
    bound is none (0, or exp(LOG_RATIO_BOUND))."""
    if mode == "mask" and low is None and high is not None:
        low = 1.0 / high
    return (0.0 if low is None else low), (float(np.exp(LOG_RATIO_BOUND)) if high is None else high)


def rejected_tokens(weight: mx.array, mask: mx.array) -> mx.array:
    """(B, T) bool: trained tokens that mask-mode rollout correction rejected (weight 0; a ratio is never 0)."""
    return mask.astype(mx.bool_) & (weight == 0)


def importance_stats(weight: mx.array, ratio: mx.array, rollout_mask: mx.array) -> dict[str, mx.array]:
    """Additive statistics of `importance_weights`' raw ratios over the rollout's trained tokens, and how many
    tokens truncation or masking changed."""
    rollout_mask = rollout_mask.astype(mx.bool_)
    big = mx.array(np.finfo(np.float32).max)
    frm = rollout_mask.astype(mx.float32)
    return {
        "importance_ratio_sum": mx.sum(ratio * frm),
        "importance_ratio_min": mx.min(mx.where(rollout_mask, ratio, big)),
        "importance_ratio_max": mx.max(mx.where(rollout_mask, ratio, -big)),
        "importance_changed": mx.sum(((weight != ratio) & rollout_mask).astype(mx.float32)),
        "importance_tokens": mx.sum(frm),
    }


def rollout_mismatch(
    learner_logp: mx.array, rollout_logp: mx.array, *, rollout_mask: mx.array, fresh_mask: mx.array
) -> dict[str, mx.array]:
    """Additive statistics of the learner's log-probs against the engine's recorded ones (no gradient).

    rollout_mask: trained tokens of rows that carry engine log-probs; fresh_mask: those of rows sampled by the very
    adapter version the learner holds, where any difference is numerics or a bug (never policy change). Out: |diff|
    sum and max over fresh tokens, and the ratio exp(learner - engine) over all rollout tokens: sum, min, max and
    how many fall outside MISMATCH_BAND, before any clipping or truncation.
    """
    learner_logp = mx.stop_gradient(learner_logp)
    rollout_mask, fresh_mask = rollout_mask.astype(mx.bool_), fresh_mask.astype(mx.bool_)
    diff = mx.where(rollout_mask, learner_logp - rollout_logp, 0.0)
    ratio = mx.exp(mx.clip(diff, -LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    absdiff = mx.where(fresh_mask, mx.abs(diff), 0.0)
    big = mx.array(np.finfo(np.float32).max)
    outside = (ratio < MISMATCH_BAND[0]) | (ratio > MISMATCH_BAND[1])
    return {
        "mismatch_abs_sum": mx.sum(absdiff),
        "mismatch_abs_max": mx.max(absdiff) if absdiff.size else mx.array(0.0),
        "mismatch_tokens": mx.sum(fresh_mask.astype(mx.float32)),
        "rollout_ratio_sum": mx.sum(mx.where(rollout_mask, ratio, 0.0)),
        "rollout_ratio_min": mx.min(mx.where(rollout_mask, ratio, big)),
        "rollout_ratio_max": mx.max(mx.where(rollout_mask, ratio, -big)),
        "rollout_ratio_outside": mx.sum((outside & rollout_mask).astype(mx.float32)),
        "rollout_tokens": mx.sum(rollout_mask.astype(mx.float32)),
    }


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
    pg, clipped = token_loss(logp, old, advantages, mask, settings)
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
