"""The Tinker SDK's built-in `loss_fn`s, as its documentation defines them, on a padded batch.

In: the learner's log-probs of each datum's target tokens, `lp` (B, T), a padding mask (B, T), the datums'
`loss_fn_inputs` padded the same way and `loss_fn_config`. Out: the summed loss (Tinker sums over tokens and datums;
`loss:sum` in the metrics) and each datum's extra outputs. Definitions (tinker-docs "Loss Functions"), with
r = exp(lp - q), q the sampling log-probs (`logprobs`), A the advantages:
- cross_entropy: -(lp * weights).sum()   (weights default to 1)
- importance_sampling: -(r * A).sum()
- ppo: -min(r * A, clip(r, lo, hi) * A).sum()   lo, hi = clip_low_threshold 0.8, clip_high_threshold 1.2
- cispo: -(stop_gradient(clip(r, lo, hi)) * lp * A).sum()   lo 0.0, hi 4.0 (one-sided by default)
- dro: -(lp * A - 0.5 * beta * (lp - q) ** 2).sum()   beta 0.05 (the docs' example; pass it to be explicit)
- gspo: the GSPO paper's sequence ratio s = exp(mean over the datum's tokens of (lp - q)), then
  -min(s * A, clip(s, lo, hi) * A).sum() over its tokens; lo, hi 1 - 3e-4, 1 + 4e-4 (the paper's ranges). A datum's
  tokens are those with nonzero `weights` when given, else those with nonzero advantage (prompt positions carry
  neither). Tinker's own page for gspo was not available offline: this is the paper's definition.
"""

from collections.abc import Callable

import mlx.core as mx
import numpy as np

REQUIRED = {
    "cross_entropy": ("target_tokens",),
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
    "ppo": ("target_tokens", "logprobs", "advantages"),
    "cispo": ("target_tokens", "logprobs", "advantages"),
    "dro": ("target_tokens", "logprobs", "advantages"),
    "gspo": ("target_tokens", "logprobs", "advantages"),
}
DEFAULTS: dict[str, dict[str, float]] = {
    "cross_entropy": {},
    "importance_sampling": {},
    "ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "cispo": {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0},
    "dro": {"beta": 0.05},
    "gspo": {"clip_low_threshold": 1 - 3e-4, "clip_high_threshold": 1 + 4e-4},
}
OPTIONAL = ("weights",)

Batch = dict[str, mx.array]  # loss_fn_inputs by name, (B, T) float32, zero in padding
Loss = Callable[[mx.array, mx.array, Batch, dict[str, float]], mx.array]


def cross_entropy(lp: mx.array, mask: mx.array, x: Batch, c: dict[str, float]) -> mx.array:
    weights = x["weights"] if "weights" in x else mask
    return -(lp * weights * mask).sum()


def importance_sampling(lp: mx.array, mask: mx.array, x: Batch, c: dict[str, float]) -> mx.array:
    ratio = mx.exp(lp - x["logprobs"])
    return -(ratio * x["advantages"] * mask).sum()


def ppo(lp: mx.array, mask: mx.array, x: Batch, c: dict[str, float]) -> mx.array:
    ratio = mx.exp(lp - x["logprobs"])
    clipped = mx.clip(ratio, c["clip_low_threshold"], c["clip_high_threshold"])
    a = x["advantages"]
    return -(mx.minimum(ratio * a, clipped * a) * mask).sum()


def cispo(lp: mx.array, mask: mx.array, x: Batch, c: dict[str, float]) -> mx.array:
    ratio = mx.exp(lp - x["logprobs"])
    weight = mx.stop_gradient(mx.clip(ratio, c["clip_low_threshold"], c["clip_high_threshold"]))
    return -(weight * lp * x["advantages"] * mask).sum()


def dro(lp: mx.array, mask: mx.array, x: Batch, c: dict[str, float]) -> mx.array:
    quadratic = (lp - x["logprobs"]) ** 2
    return -((lp * x["advantages"] - 0.5 * c["beta"] * quadratic) * mask).sum()


def gspo(lp: mx.array, mask: mx.array, x: Batch, c: dict[str, float]) -> mx.array:
    seq = (x["weights"] != 0) if "weights" in x else (x["advantages"] != 0)
    seq = seq.astype(mx.float32) * mask
    count = mx.maximum(seq.sum(axis=1, keepdims=True), 1.0)
    s = mx.exp(((lp - x["logprobs"]) * seq).sum(axis=1, keepdims=True) / count)  # (B, 1)
    clipped = mx.clip(s, c["clip_low_threshold"], c["clip_high_threshold"])
    a = x["advantages"]
    return -(mx.minimum(s * a, clipped * a) * seq).sum()


LOSSES: dict[str, Loss] = {
    "cross_entropy": cross_entropy,
    "importance_sampling": importance_sampling,
    "ppo": ppo,
    "cispo": cispo,
    "dro": dro,
    "gspo": gspo,
}


def default_weights(loss_fn: str, inputs: dict[str, np.ndarray], n: int) -> np.ndarray:
    """The `weights` of a datum that gives none in a batch where others do (the batch is padded to one set of
    inputs): what its loss uses without them, every token for cross_entropy, those of nonzero advantage for gspo
    (the other losses take no weights)."""
    if loss_fn == "gspo":
        return (inputs["advantages"] != 0).astype(np.float32)
    return np.ones(n, np.float32)


def resolve_config(loss_fn: str, given: dict[str, float | str]) -> dict[str, float]:
    """The loss's settings: its defaults overridden by `given`. ValueError("loss_fn_config.KEY: ...") for a key the
    loss does not take or a value that is not a finite number."""
    out = dict(DEFAULTS[loss_fn])
    for key, value in given.items():
        if key not in out:
            known = ", ".join(out) or "none"
            raise ValueError(f"loss_fn_config.{key}: {loss_fn} takes no such setting (it takes: {known})")
        if isinstance(value, str) or not mx.isfinite(mx.array(value)).item():
            raise ValueError(f"loss_fn_config.{key}: must be a finite number, got {value!r}")
        out[key] = float(value)
    return out
