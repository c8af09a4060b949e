"""A few rollouts of each learner step, readable: what the dashboard and the loggers show.

In: the RolloutBatch a step trained, the tokenizer, the advantage settings. Out: up to `k` plain-data samples
(prompt text, completion as per-token text pieces with their engine log-probs, reward, advantage, versions). The
best and the worst completion of each group come first, so a step shows what is rewarded and what is not. Only a
bounded number of tokens per sample is decoded, whatever the environment sent.
"""

from collections.abc import Callable
from typing import Any

import numpy as np

from paraloop.engine.text import IncrementalDetokenizer
from paraloop.messages import PROMPT_MASK, RolloutBatch, ScoredGroup


def pick(batch: RolloutBatch, k: int) -> list[tuple[int, int]]:
    """(group, row) pairs: the best and the worst row of each group in turn, until k."""
    best, worst = [], []
    for g, group in enumerate(batch.groups):
        if not group.scores:
            continue
        order = np.argsort(np.asarray(group.scores, np.float64), kind="stable")
        best.append((g, int(order[-1])))
        if len(order) > 1:
            worst.append((g, int(order[0])))
    chosen: list[tuple[int, int]] = []
    for pair in (p for both in zip(best, worst + [None] * (len(best) - len(worst)), strict=True) for p in both):
        if pair is not None and len(chosen) < k:
            chosen.append(pair)
    return chosen


def batch_advantages(batch: RolloutBatch, advantages: Callable[..., np.ndarray]) -> list[np.ndarray]:
    """Per-group arrays of the algorithm's sequence advantages, computed over the whole batch as the trainer does."""
    scores = np.asarray([s for g in batch.groups for s in g.scores], np.float64)
    index = np.asarray([i for i, g in enumerate(batch.groups) for _ in g.scores], np.int64)
    flat = advantages(scores, index) if scores.size else scores
    return [flat[index == i] for i in range(len(batch.groups))]


def sequence_advantage(group: ScoredGroup, row: int, adv: np.ndarray) -> float:
    """The row's advantage: the environment's per-token values averaged over trained tokens, else the algorithm's."""
    if group.advantages and row < len(group.advantages) and group.advantages[row]:
        mask = group.masks[row]
        given = [a for a, m in zip(group.advantages[row], mask, strict=False) if m != PROMPT_MASK]
        if given:
            return float(np.mean(given))
    return float(adv[row])


def render(tokenizer: Any, group: ScoredGroup, row: int, max_tokens: int) -> dict[str, Any]:
    tokens, mask = group.tokens[row], group.masks[row]
    start = next((i for i, m in enumerate(mask) if m != PROMPT_MASK), len(tokens))
    prompt = tokens[:start]
    prompt_cut = len(prompt) > max_tokens
    completion = tokens[start : start + max_tokens]
    logprobs = group.inference_logprobs[row] if group.inference_logprobs else None
    detok = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detok.add(t) for t in completion]
    if pieces:
        pieces[-1] += detok.flush()
    lps: list[float | None] = []
    untrained = []  # completion positions the loss skips (multi-turn environments mask some)
    for n, i in enumerate(range(start, start + len(completion))):
        trained = i < len(mask) and mask[i] != PROMPT_MASK
        lps.append(float(logprobs[i]) if trained and logprobs and i < len(logprobs) else None)
        if not trained:
            untrained.append(n)
    return {
        "prompt": tokenizer.decode(prompt[-max_tokens:], skip_special_tokens=False),
        "prompt_truncated": prompt_cut,
        "tokens": pieces,
        "logprobs": lps,
        "untrained": untrained,
        "completion_truncated": len(tokens) - start > max_tokens,
    }


def rollout_samples(
    batch: RolloutBatch,
    tokenizer: Any,
    *,
    step: int,
    version: int,
    k: int,
    advantages: Callable[..., np.ndarray],
    max_tokens: int,
) -> list[dict[str, Any]]:
    """Up to k readable samples of the batch a step trained (see the module docstring). `advantages(scores, group)`
    is the algorithm's function with its settings bound."""
    chosen = pick(batch, k)
    adv = batch_advantages(batch, advantages) if chosen else []
    out = []
    for g, row in chosen:
        group = batch.groups[g]
        versions = group.versions[row] if group.versions and row < len(group.versions) else None
        out.append(
            {
                "step": step,
                "adapter_version": version,
                "rollout_version": versions,
                "group": g,
                "row": row,
                "reward": float(group.scores[row]),
                "advantage": sequence_advantage(group, row, adv[g]),
                **render(tokenizer, group, row, max_tokens),
            }
        )
    return out
