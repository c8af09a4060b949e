"""On-policy distillation as an advantage: a teacher scores the student's own samples, token by token.

In: the TokenBatch (its engine log-probs are the student's sampling log-probs, its teacher log-probs what a
teacher gave the same tokens, both (N, T) at the target positions) and the task reward's token advantages. Out:
the combined (N, T) advantages and the step's distillation metrics. Pure NumPy, once per learner step.

The per-token advantage is the negative reverse-KL estimate on the sampled token,

    A_t = reward_weight * A_task,t + weight * (log pi_teacher(y_t) - log pi_student(y_t))

(the Tinker cookbook's on-policy distillation, prime-rl's teacher term): a token the teacher finds likelier than
the student did is reinforced, one it finds unlikely is pushed down, and the expectation of the term over the
student's samples is -KL(student || teacher). reward_weight = 0 is distillation alone. The difference is bounded to
+-LOG_RATIO_BOUND nats (as every log-ratio in learn/loss.py), so one untrusted teacher value cannot make the loss
inf. Rows without both log-probs (no teacher score, or no engine log-probs) keep the task term alone.
"""

import numpy as np

from paraloop.learn.batch import TokenBatch
from paraloop.learn.loss import LOG_RATIO_BOUND


def distilled_rows(tb: TokenBatch) -> np.ndarray:
    """(N,) bool: rows that carry both the teacher's and the sampling engine's log-probs."""
    if tb.has_teacher is None:
        return np.zeros(tb.rows, bool)
    return tb.has_teacher & tb.has_inference


def distill_advantages(
    tb: TokenBatch, task: np.ndarray, *, weight: float, reward_weight: float
) -> tuple[np.ndarray, dict[str, float]]:
    """(N, T) float32 advantages with the teacher term added, and the metrics: distill_kl, the mean over the
    distilled tokens of student - teacher log-prob (the per-token reverse KL estimate, >= 0 in expectation),
    distill_tokens and distill_rows_missing (rows of a batch with teacher scores that lack one of the two)."""
    rows = distilled_rows(tb)
    keep = tb.mask & ~tb.zero_advantage[:, None] & rows[:, None]
    diff = np.zeros(tb.mask.shape)
    if rows.any():  # (N, T) float64, bounded like every log-ratio of the loss
        diff = np.clip(
            tb.teacher_logprobs.astype(np.float64) - tb.inference_logprobs, -LOG_RATIO_BOUND, LOG_RATIO_BOUND
        )
    adv = reward_weight * task.astype(np.float64) + weight * np.where(keep, diff, 0.0)
    metrics: dict[str, float] = {}
    if rows.any():
        tokens = int(keep.sum())
        metrics["distill_kl"] = float(-diff[keep].mean()) if tokens else 0.0
        metrics["distill_tokens"] = float(tokens)
        metrics["distill_rows_missing"] = float((tb.has_teacher & ~rows).sum())
    elif tb.has_teacher is not None and tb.has_teacher.any():
        metrics["distill_rows_missing"] = float(tb.has_teacher.sum())
    return adv.astype(np.float32), metrics


def teacher_logprob_of(token: int, ids: list[int], logprobs: list[float]) -> float | None:
    """The teacher's log-prob of `token` from one position's top-k (Atropos `distill_token_ids` /
    `distill_logprobs`): its own entry when listed, else the smallest listed log-prob (an upper bound of an
    unlisted token's when the list is the teacher's top-k); None for an empty position."""
    if not ids:
        return None
    for i, lp in zip(ids, logprobs, strict=True):
        if i == token:
            return float(lp)
    return float(min(logprobs))
