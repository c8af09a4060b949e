"""Policy-gradient algorithms by name: how scores become advantages and how a token's loss is formed.

An Algorithm is a pair of pure functions plus one flag; the trainer looks it up by `rl_training.algorithm` and
never branches on the name, so a new variant is one `register(Algorithm(...))` here. KL, entropy, importance
weights (rollout correction) and aggregation are shared by all algorithms and live in loss.py, with the math.

    grpo       advantages (r - group mean) / (std + eps) per scale_rewards; clipped-ratio surrogate (PPO clip)
    gspo       GRPO's advantages; the PPO clip on each sequence's length-normalised ratio (GSPO)
    cispo      GRPO's advantages; -sg(min(ratio, cispo_clip_max)) A log p (CISPO: clipped IS weight, no zeroed tokens)
    reinforce  advantages r - group mean (a plain baseline, never std-scaled); token loss -A * log p, no ratio
"""

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from paraloop.learn.advantages import Scale, group_advantages
from paraloop.learn.loss import LossSettings, TokenLoss, cispo_surrogate, clipped_surrogate, gspo_surrogate

# (scores (N,), group index (N,), *, scale, eps) -> per-sequence advantages (N,) float64
Advantages = Callable[..., np.ndarray]


@dataclass(frozen=True)
class Algorithm:
    name: str
    advantages: Advantages
    token_loss: TokenLoss
    uses_old_policy: bool  # the token loss reads old_logp (else no old-policy forward is needed for it)


def reinforce_advantages(scores: np.ndarray, group: np.ndarray, *, scale: Scale, eps: float) -> np.ndarray:
    del scale  # REINFORCE with a group-mean baseline is unscaled by definition
    return group_advantages(scores, group, scale="none", eps=eps)


def reinforce_token_loss(
    logp: mx.array, old_logp: mx.array, advantages: mx.array, mask: mx.array, settings: LossSettings
) -> tuple[mx.array, mx.array]:
    del old_logp, mask, settings
    return -advantages * logp, mx.zeros_like(logp)


ALGORITHMS: dict[str, Algorithm] = {}


def register(algorithm: Algorithm) -> Algorithm:
    ALGORITHMS[algorithm.name] = algorithm
    return algorithm


def get_algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(sorted(ALGORITHMS))}") from None


register(Algorithm("grpo", group_advantages, clipped_surrogate, uses_old_policy=True))
register(Algorithm("gspo", group_advantages, gspo_surrogate, uses_old_policy=True))
register(Algorithm("cispo", group_advantages, cispo_surrogate, uses_old_policy=True))
register(Algorithm("reinforce", reinforce_advantages, reinforce_token_loss, uses_old_policy=False))
