"""RolloutBatch (Atropos convention) -> padded NumPy arrays the learner computes on, and micro-batch plans.

In: ScoredGroups whose `tokens` are whole sequences (prompt + completion), `masks` holding -100 at prompt positions
and the token id at trained positions, optional per-token `advantages`, `inference_logprobs` (1.0 placeholders at
prompt positions), `ref_logprobs`, `sampling_kept` (kept-set sizes, 0 for the full vocabulary) and `teacher_logprobs`,
all the length
of `tokens`. Out: a TokenBatch of shape (N, T), T = longest
sequence - 1, where position t feeds tokens[t] and predicts tokens[t + 1]: input_ids = tokens[:-1], targets =
tokens[1:], a target is trained iff masks[1:] != -100, and per-token inputs are taken at [1:] (they describe the
target token). Rows are right-padded (a causal model never looks right, so padding needs no attention mask).

`validate_group` raises ValueError naming the problem; the rollout fetcher calls it to count and drop bad groups.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from paraloop.messages import PROMPT_MASK, RolloutBatch, ScoredGroup


@dataclass(frozen=True)
class TokenBatch:
    """Every sequence of one learner step. Per-token arrays are (N, T); absent inputs are zeros with has_* False."""

    input_ids: np.ndarray  # (N, T) int32: tokens[:-1], 0-padded
    targets: np.ndarray  # (N, T) int32: tokens[1:], 0-padded
    mask: np.ndarray  # (N, T) bool: target trained (masks[1:] != -100)
    lengths: np.ndarray  # (N,) int64: real positions per row, len(tokens) - 1
    scores: np.ndarray  # (N,) float64
    group: np.ndarray  # (N,) int64: index of the row's group
    temperature: np.ndarray  # (N,) float32: the rollout temperature the logits are divided by
    zero_advantage: np.ndarray  # (N,) bool: overrides[i]["set_advantage_to_zero"]
    given_advantages: np.ndarray  # (N, T) float32: advantages[1:] where has_advantages
    has_advantages: np.ndarray  # (N,) bool
    inference_logprobs: np.ndarray  # (N, T) float32: inference_logprobs[1:] where has_inference
    has_inference: np.ndarray  # (N,) bool
    ref_logprobs: np.ndarray  # (N, T) float32: ref_logprobs[1:] where has_ref
    has_ref: np.ndarray  # (N,) bool
    kept: np.ndarray | None = None  # (N, T) int32: sampling_kept[1:] at trained positions (0: full vocabulary)
    teacher_logprobs: np.ndarray | None = None  # (N, T) float32: teacher_logprobs[1:] where has_teacher
    has_teacher: np.ndarray | None = None  # (N,) bool; both None when no group carries teacher log-probs

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def trained_tokens(self) -> int:
        return int(self.mask.sum())


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_per_token(name: str, rows: list[list[float]], group: ScoredGroup) -> None:
    if len(rows) != len(group.tokens):
        raise ValueError(f"{name} has {len(rows)} sequences but tokens has {len(group.tokens)}")
    for i, (row, tokens, mask) in enumerate(zip(rows, group.tokens, group.masks, strict=True)):
        if len(row) != len(tokens):
            raise ValueError(f"{name}[{i}] has length {len(row)} but tokens[{i}] has length {len(tokens)}")
        values = np.asarray(row, dtype=np.float64)
        trained = np.asarray(mask) != PROMPT_MASK
        if not np.isfinite(values[trained]).all():
            raise ValueError(f"{name}[{i}] is not finite at a trained position")


MAX_KEPT = 2**31 - 1  # a kept-set size is an int32 on the learner side (the learner caps it at its vocabulary)


def _check_kept(rows: list[list[int]], group: ScoredGroup) -> None:
    if len(rows) != len(group.tokens):
        raise ValueError(f"sampling_kept has {len(rows)} sequences but tokens has {len(group.tokens)}")
    for i, (row, tokens) in enumerate(zip(rows, group.tokens, strict=True)):
        if len(row) != len(tokens):
            raise ValueError(f"sampling_kept[{i}] has length {len(row)} but tokens[{i}] has length {len(tokens)}")
        if row and not (0 <= min(row) and max(row) <= MAX_KEPT):
            raise ValueError(f"sampling_kept[{i}] holds a size outside [0, {MAX_KEPT}]")


def _temperature(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if not _finite_number(value) or value < 0:
        raise ValueError(f"{where} temperature must be a number >= 0, got {value!r}")
    return float(value) if value > 0 else 1.0  # 0 means greedy: its logprobs are reported at temperature 1


def row_temperatures(group: ScoredGroup) -> list[float]:
    """Per-sequence temperature: overrides[i] > generation_params > group_overrides > 1.0."""
    gen = _temperature((group.generation_params or {}).get("temperature"), "generation_params")
    grp = _temperature((group.group_overrides or {}).get("temperature"), "group_overrides")
    out = []
    for i in range(len(group.tokens)):
        own = (
            _temperature((group.overrides[i] or {}).get("temperature"), f"overrides[{i}]") if group.overrides else None
        )
        out.append(next((t for t in (own, gen, grp) if t is not None), 1.0))
    return out


def validate_group(group: ScoredGroup) -> None:
    """Raise ValueError naming the first problem found in `group`; return None when it is usable."""
    n = len(group.tokens)
    if n == 0:
        raise ValueError("empty group: no sequences")
    if len(group.masks) != n:
        raise ValueError(f"ragged group: {len(group.masks)} masks for {n} token sequences")
    if len(group.scores) != n:
        raise ValueError(f"ragged group: {len(group.scores)} scores for {n} token sequences")
    for i, score in enumerate(group.scores):
        if not _finite_number(score):
            raise ValueError(f"scores[{i}] is not a finite number: {score!r}")
    for i, (tokens, mask) in enumerate(zip(group.tokens, group.masks, strict=True)):
        if len(tokens) == 0:
            raise ValueError(f"tokens[{i}] is empty")
        if len(mask) != len(tokens):
            raise ValueError(f"masks[{i}] has length {len(mask)} but tokens[{i}] has length {len(tokens)}")
        t, m = np.asarray(tokens), np.asarray(mask)
        bad = (m != PROMPT_MASK) & (m != t)
        if bad.any():
            j = int(np.argmax(bad))
            raise ValueError(f"masks[{i}][{j}] = {mask[j]} is neither -100 nor the token id {tokens[j]}")
    if group.advantages:  # [] on the wire means absent
        _check_per_token("advantages", group.advantages, group)
    if group.inference_logprobs:
        _check_per_token("inference_logprobs", group.inference_logprobs, group)
    if group.ref_logprobs:
        _check_per_token("ref_logprobs", group.ref_logprobs, group)
    if group.sampling_kept:
        _check_kept(group.sampling_kept, group)
    if group.teacher_logprobs:
        _check_per_token("teacher_logprobs", group.teacher_logprobs, group)
    if group.overrides is not None and len(group.overrides) != n:
        raise ValueError(f"ragged group: {len(group.overrides)} overrides for {n} token sequences")
    row_temperatures(group)


def collate(batch: RolloutBatch) -> TokenBatch:
    """Validate every group and lay the batch out as (N, T) arrays (see the module docstring for the alignment)."""
    if not batch.groups:
        raise ValueError("empty batch: no groups")
    for g, group in enumerate(batch.groups):
        try:
            validate_group(group)
        except ValueError as e:
            raise ValueError(f"group {g}: {e}") from None
    seqs = [(g, i) for g, group in enumerate(batch.groups) for i in range(len(group.tokens))]
    lengths = np.array([len(batch.groups[g].tokens[i]) - 1 for g, i in seqs], dtype=np.int64)
    n, width = len(seqs), max(1, int(lengths.max()))
    ids, targets = np.zeros((n, width), np.int32), np.zeros((n, width), np.int32)
    mask = np.zeros((n, width), bool)
    given = {name: np.zeros((n, width), np.float32) for name in ("advantages", "inference_logprobs", "ref_logprobs")}
    has = {name: np.zeros(n, bool) for name in given}
    temperature, zero = np.ones(n, np.float32), np.zeros(n, bool)
    kept = np.zeros((n, width), np.int32) if any(group.sampling_kept for group in batch.groups) else None
    distilled = any(group.teacher_logprobs for group in batch.groups)
    teacher = np.zeros((n, width), np.float32) if distilled else None
    has_teacher = np.zeros(n, bool) if distilled else None
    temps = [row_temperatures(group) for group in batch.groups]
    for row, (g, i) in enumerate(seqs):
        group, length = batch.groups[g], lengths[row]
        tokens = group.tokens[i]
        ids[row, :length] = tokens[:-1]
        targets[row, :length] = tokens[1:]
        mask[row, :length] = np.asarray(group.masks[i][1:]) != PROMPT_MASK
        for name in given:
            values = getattr(group, name)
            if values:
                given[name][row, :length] = values[i][1:]
                has[name][row] = True
        if kept is not None and group.sampling_kept:
            kept[row, :length] = group.sampling_kept[i][1:]
        if teacher is not None and group.teacher_logprobs:
            teacher[row, :length] = group.teacher_logprobs[i][1:]
            has_teacher[row] = True
        temperature[row] = temps[g][i]
        zero[row] = bool(group.overrides and (group.overrides[i] or {}).get("set_advantage_to_zero"))
    return TokenBatch(
        input_ids=ids,
        targets=targets,
        mask=mask,
        lengths=lengths,
        scores=np.array([batch.groups[g].scores[i] for g, i in seqs], np.float64),
        group=np.array([g for g, _ in seqs], np.int64),
        temperature=temperature,
        zero_advantage=zero,
        given_advantages=np.where(mask, given["advantages"], 0.0).astype(np.float32),
        has_advantages=has["advantages"],
        inference_logprobs=np.where(mask, given["inference_logprobs"], 0.0).astype(np.float32),
        has_inference=has["inference_logprobs"],
        ref_logprobs=np.where(mask, given["ref_logprobs"], 0.0).astype(np.float32),
        has_ref=has["ref_logprobs"],
        kept=None if kept is None else np.where(mask, kept, 0).astype(np.int32),
        teacher_logprobs=None if teacher is None else np.where(mask, teacher, 0.0).astype(np.float32),
        has_teacher=has_teacher,
    )


def plan_micro_batches(
    lengths: np.ndarray, *, token_budget: int, fits: Callable[[int, int], bool] | None = None
) -> list[np.ndarray]:
    """Group row indices so each micro-batch's padded size (rows * its longest row) stays within token_budget
    and, when given, `fits(rows, longest row)` holds (the memory planner's test, learn/memory.py).

    Rows are sorted longest first, so each micro-batch holds rows of similar length (little padding). A row longer
    than the budget (or not fitting) gets a micro-batch of its own. Rows of length 0 are left out (nothing to compute).
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    plans: list[list[int]] = []
    width = 0
    for row in order:
        length = int(lengths[row])
        if length == 0:
            continue
        n = len(plans[-1]) + 1 if plans else 0
        if plans and n * width <= token_budget and (fits is None or fits(n, width)):
            plans[-1].append(int(row))
        else:
            plans.append([int(row)])
            width = length
    return [np.array(p, np.int64) for p in plans]
