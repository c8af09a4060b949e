"""Train/inference mismatch, reduced to per-step metrics: which rows to compare, staleness, and the alarm.

The engine records the log-prob of every token it samples and the adapter version that sampled it; the learner
recomputes the same log-probs. For rows sampled by the adapter version the learner holds, the two must agree up
to float rounding: a gap is a bug or a numerics problem (a wrong temperature, a stale cache, a precision loss),
never policy change. loss.rollout_mismatch computes the sums; this module picks the rows and turns sums (and the
rollout correction's, loss.importance_stats) into metrics. Pure NumPy.
"""

import numpy as np

from paraloop.messages import RolloutBatch

UNKNOWN = -1  # a row whose adapter version is unknown (Atropos groups carry none)


def row_versions(batch: RolloutBatch) -> np.ndarray:
    """(N,) int64 in collate's row order: each row's (oldest) adapter version, UNKNOWN where not recorded."""
    out: list[int] = []
    for group in batch.groups:
        versions = group.versions if group.versions and len(group.versions) == len(group.tokens) else None
        out += [int(v) for v in versions] if versions else [UNKNOWN] * len(group.tokens)
    return np.asarray(out, np.int64)


def staleness_metrics(versions: np.ndarray, learner_version: int) -> dict[str, float]:
    """How many adapter versions behind the learner each row's rollout is (rows of known version only), and the
    fraction of rows whose version is known (Atropos rows: those the engine's served index found)."""
    known = versions[versions != UNKNOWN]
    if not known.size:
        return {"version_known_fraction": 0.0} if versions.size else {}
    lag = learner_version - known
    return {
        "staleness_mean": float(lag.mean()),
        "staleness_max": float(lag.max()),
        "version_known_fraction": known.size / versions.size,
    }


def mismatch_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Per-step metrics from the additive statistics of loss.rollout_mismatch (summed over micro-batches)."""
    out: dict[str, float] = {}
    if sums.get("mismatch_tokens", 0.0) > 0:
        out["mismatch_abs_mean"] = sums["mismatch_abs_sum"] / sums["mismatch_tokens"]
        out["mismatch_abs_max"] = sums["mismatch_abs_max"]
        out["mismatch_tokens"] = sums["mismatch_tokens"]
    if sums.get("rollout_tokens", 0.0) > 0:
        out["rollout_ratio_mean"] = sums["rollout_ratio_sum"] / sums["rollout_tokens"]
        out["rollout_ratio_min"] = sums["rollout_ratio_min"]
        out["rollout_ratio_max"] = sums["rollout_ratio_max"]
        out["rollout_ratio_outside"] = sums["rollout_ratio_outside"] / sums["rollout_tokens"]
    return out


def importance_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Per-step rollout-correction metrics from loss.importance_stats (summed over micro-batches): the raw ratios
    before truncation or masking, and the fraction of tokens whose weight differs from its ratio."""
    if sums.get("importance_tokens", 0.0) <= 0:
        return {}
    return {
        "importance_ratio_mean": sums["importance_ratio_sum"] / sums["importance_tokens"],
        "importance_ratio_min": sums["importance_ratio_min"],
        "importance_ratio_max": sums["importance_ratio_max"],
        "importance_changed_fraction": sums["importance_changed"] / sums["importance_tokens"],
    }


def combine(parts: list[dict[str, float]]) -> dict[str, float]:
    """Sum the additive statistics of several micro-batches (max/min for the extremes)."""
    if not parts:
        return {}
    out = dict(parts[0])
    for part in parts[1:]:
        for key, value in part.items():
            if key.endswith("_max"):
                out[key] = max(out[key], value)
            elif key.endswith("_min"):
                out[key] = min(out[key], value)
            else:
                out[key] += value
    return out


def mismatch_alarm(metrics: dict[str, float], threshold: float) -> str | None:
    """A one-line warning when the step's mean |engine - learner| log-prob gap exceeds `threshold`, else None."""
    gap = metrics.get("mismatch_abs_mean")
    if gap is None or threshold <= 0 or gap <= threshold:
        return None
    return (
        f"train/inference mismatch: mean |engine - learner| log-prob {gap:.4g} (max {metrics['mismatch_abs_max']:.4g})"
        f" over {int(metrics['mismatch_tokens'])} tokens of the current adapter version exceeds "
        f"rl_training.mismatch_threshold = {threshold:g}: the engine and the learner disagree about the same policy "
        "(a bug or a numerics problem, e.g. a wrong temperature, not policy change)"
    )
