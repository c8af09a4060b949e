"""Advantages from per-sequence scores: group-relative baselines, optional std scaling, per-token layout.

In: scores (N,) and each row's group index, or a TokenBatch. Out: float64 advantages per sequence, then float32
(N, T) per-token advantages where given per-token advantages win, `set_advantage_to_zero` rows and untrained
positions are 0. Pure NumPy, computed once per learner step (the loss only reads the result).
"""

from typing import Literal

import numpy as np

from paraloop.learn.batch import TokenBatch

Scale = Literal["group", "batch", "none"]


def group_advantages(scores: np.ndarray, group: np.ndarray, *, scale: Scale, eps: float) -> np.ndarray:
    """(scores - group mean) / (std + eps), std (population, like Atropos' trainer) of the group, of the whole
    batch, or no division (`none`: the plain group-mean baseline, Dr. GRPO). A group of equal scores gives exact
    zeros, never NaN."""
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be group, batch or none, got {scale!r}")
    scores = np.asarray(scores, np.float64)
    adv = np.zeros_like(scores)
    for g in np.unique(group):
        sel = group == g
        s = scores[sel]
        if np.ptp(s) == 0:  # equal scores: no signal; skip the division so rounding cannot leave crumbs
            continue
        adv[sel] = s - s.mean()
        if scale == "group":
            adv[sel] /= s.std() + eps
    if scale == "batch":
        adv /= scores.std() + eps
    return adv


def token_advantages(batch: TokenBatch, sequence_advantages: np.ndarray) -> np.ndarray:
    """(N, T) float32: each row's advantage on its trained positions; given per-token advantages replace it."""
    shape = batch.mask.shape
    adv = np.broadcast_to(np.asarray(sequence_advantages, np.float64)[:, None], shape)
    adv = np.where(batch.has_advantages[:, None], batch.given_advantages, adv)
    keep = batch.mask & ~batch.zero_advantage[:, None]
    return np.where(keep, adv, 0.0).astype(np.float32)
