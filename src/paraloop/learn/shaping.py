"""Reward shaping and row masking before advantages: DAPO's overlong penalty and truncated-completion masking.

In: a RolloutBatch (for what each row says about itself: its finish reason, the max_tokens it was sampled with),
its TokenBatch, and rl_training settings. Out: per-row arrays in collate's row order (groups in order, rows in
order): completion lengths, which rows were truncated, and the length penalty to add to their scores. Pure NumPy.

A row is truncated when its `overrides[i]["finish_reason"]` says "length" (the mock environment sets it), or,
when the environment does not say, when its completion (trained tokens) is at least the max_tokens it was sampled
with (`generation_params["max_tokens"]`, else rl_training.max_tokens).
"""

import numpy as np

from paraloop.learn.batch import TokenBatch
from paraloop.messages import RolloutBatch


def row_max_tokens(batch: RolloutBatch, default: int) -> np.ndarray:
    """(N,) int64: the generation cap each row was sampled with (its group's generation_params, else `default`)."""
    out = []
    for group in batch.groups:
        cap = (group.generation_params or {}).get("max_tokens")
        valid = isinstance(cap, int) and not isinstance(cap, bool) and cap > 0
        out += [cap if valid else default] * len(group.tokens)
    return np.asarray(out, np.int64)


def truncated_rows(batch: RolloutBatch, lengths: np.ndarray, max_tokens: np.ndarray) -> np.ndarray:
    """(N,) bool: rows cut off by the length limit (see the module docstring)."""
    out, row = [], 0
    for group in batch.groups:
        for i in range(len(group.tokens)):
            reason = (group.overrides[i] or {}).get("finish_reason") if group.overrides else None
            out.append(reason == "length" if reason is not None else bool(lengths[row] >= max_tokens[row]))
            row += 1
    return np.asarray(out, bool)


def overlong_penalty(lengths: np.ndarray, max_tokens: np.ndarray, *, buffer: int, factor: float) -> np.ndarray:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476, eq. 13), times `factor`:

        0                                    |y| <= L_max - L_cache
        ((L_max - L_cache) - |y|) / L_cache  L_max - L_cache < |y| <= L_max   (falls linearly from 0 to -1)
        -1                                   |y| > L_max

    with L_max = the row's max_tokens and L_cache = `buffer` (0: no penalty). Added to the row's score.
    """
    lengths = np.asarray(lengths, np.float64)
    if buffer <= 0:
        return np.zeros_like(lengths)
    start = np.asarray(max_tokens, np.float64) - buffer
    penalty = np.clip((start - lengths) / buffer, -1.0, 0.0)
    return factor * penalty


def shape_rows(
    batch: RolloutBatch, tb: TokenBatch, *, default_max_tokens: int, buffer: int, factor: float, mask_truncated: bool
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """(scores with the overlong penalty, trained mask without truncated rows when asked, metrics)."""
    lengths = tb.mask.sum(axis=1)
    caps = row_max_tokens(batch, default_max_tokens)
    truncated = truncated_rows(batch, lengths, caps)
    penalty = overlong_penalty(lengths, caps, buffer=buffer, factor=factor)
    mask = tb.mask & ~truncated[:, None] if mask_truncated else tb.mask
    metrics = {
        "truncated_fraction": float(truncated.mean()) if truncated.size else 0.0,
        "completion_length_mean": float(lengths.mean()) if lengths.size else 0.0,
    }
    if buffer > 0:
        metrics["overlong_penalty_mean"] = float(penalty.mean()) if penalty.size else 0.0
    return tb.scores + penalty, mask, metrics
