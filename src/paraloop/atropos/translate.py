"""Atropos wire groups (the JSON dicts GET /batch returns) -> validated messages.ScoredGroup, and micro-batch packing.

In: one ScoredData dict per group, as run-api stored it: it only checks types, so ragged or inconsistent groups reach
the trainer. Out: a ScoredGroup in the same convention (masks -100 at prompt positions and the token id at trained
positions; inference_logprobs 1.0 placeholders at prompt positions; `[]` for an optional per-sequence field means
absent -> None), or InvalidGroup naming the problem. A rejected group is logged on the "paraloop.atropos" logger and
counted by the caller; it is never trained on and never raises past `translate_batch`.
"""

import logging
import math
from typing import Any

import msgspec

from paraloop.learn.batch import validate_group
from paraloop.learn.distill import teacher_logprob_of
from paraloop.messages import PROMPT_MASK, ScoredGroup

logger = logging.getLogger("paraloop.atropos")

PER_TOKEN = ("advantages", "ref_logprobs", "inference_logprobs", "sampling_kept")  # sampling_kept: a paraloop extension
# Largest inference logprob accepted at a trained position: a real logprob is <= 0 (up to rounding). A 1.0 there is
# a prompt placeholder where a sampled token's logprob belongs (ManagedServer pads short logprob lists with 1.0).
MAX_TRAINED_LOGPROB = 1e-3
MAX_DISTILL_K = 1024  # teacher alternatives per position accepted in distill_token_ids / distill_logprobs


class InvalidGroup(ValueError):
    """A wire group that cannot be trained on; the message says why."""


def _absent(value: Any) -> bool:
    """None, [] or a list of empty lists: Atropos envs use all three for "not given"."""
    return value is None or (isinstance(value, list) and all(isinstance(v, list) and not v for v in value))


def _normalise(group: dict[str, Any]) -> dict[str, Any]:
    out = {k: group[k] for k in ("tokens", "masks", "scores") if k in group}
    for name in PER_TOKEN:
        if not _absent(group.get(name)):
            out[name] = group[name]
    overrides = group.get("overrides")
    if overrides:  # base collect_trajectories sends [] when no sequence has overrides
        out["overrides"] = [o if o is not None else {} for o in overrides] if isinstance(overrides, list) else overrides
    for name in ("generation_params", "group_overrides"):
        if group.get(name):
            out[name] = group[name]
    if group.get("env_id") is not None:
        out["env_id"] = group["env_id"]
    return out


def _check_inference_logprobs(group: ScoredGroup) -> None:
    if group.inference_logprobs is None:
        return
    for i, (row, mask) in enumerate(zip(group.inference_logprobs, group.masks, strict=True)):
        for j, (lp, m) in enumerate(zip(row, mask, strict=True)):
            if m != PROMPT_MASK and lp > MAX_TRAINED_LOGPROB:
                raise InvalidGroup(
                    f"inference_logprobs[{i}][{j}] = {lp} at a trained position (a logprob is <= 0; 1.0 is the "
                    "prompt placeholder: the inference server returned fewer logprobs than tokens)"
                )


def to_scored_group(group: Any) -> ScoredGroup:
    """Translate and validate one wire group; raise InvalidGroup naming the first problem."""
    if not isinstance(group, dict):
        raise InvalidGroup(f"a group must be a JSON object, got {type(group).__name__}")
    try:
        scored = msgspec.convert(_normalise(group), ScoredGroup)
    except msgspec.ValidationError as e:
        raise InvalidGroup(str(e)) from None
    try:
        validate_group(scored)
    except ValueError as e:
        raise InvalidGroup(str(e)) from None
    if not any(m != PROMPT_MASK for mask in scored.masks for m in mask):
        raise InvalidGroup("no trained position: every mask value is -100")
    _check_inference_logprobs(scored)
    teacher = _teacher_logprobs(group, scored)
    return scored if teacher is None else msgspec.structs.replace(scored, teacher_logprobs=teacher)


def _teacher_logprobs(group: dict[str, Any], scored: ScoredGroup) -> list[list[float]] | None:
    """On-policy distillation's teacher log-prob of every token from `distill_token_ids` / `distill_logprobs`
    ([sequence][position][k], position t scoring tokens[t]; learn/distill.teacher_logprob_of); None when absent.
    Malformed arrays reject the group (InvalidGroup); a trained position the teacher left empty leaves the whole
    group undistilled (logged), since a row's teacher term needs every trained token."""
    ids, lps = group.get("distill_token_ids"), group.get("distill_logprobs")
    if _absent(ids) and _absent(lps):
        return None
    if not isinstance(ids, list) or not isinstance(lps, list) or len(ids) != len(lps) != len(scored.tokens):
        raise InvalidGroup("distill_token_ids and distill_logprobs must both be lists of one entry per sequence")
    if len(ids) != len(scored.tokens):
        raise InvalidGroup(f"distill arrays have {len(ids)} sequences but tokens has {len(scored.tokens)}")
    out = []
    for i, (tokens, mask) in enumerate(zip(scored.tokens, scored.masks, strict=True)):
        seq_ids, seq_lps = ids[i], lps[i]
        if (
            not isinstance(seq_ids, list)
            or not isinstance(seq_lps, list)
            or not (len(seq_ids) == len(seq_lps) == len(tokens))
        ):
            raise InvalidGroup(f"distill arrays of sequence {i} must have one position per token ({len(tokens)})")
        row = []
        for t, (token, m, pos_ids, pos_lps) in enumerate(zip(tokens, mask, seq_ids, seq_lps, strict=True)):
            where = f"distill arrays [{i}][{t}]"
            if not isinstance(pos_ids, list) or not isinstance(pos_lps, list) or len(pos_ids) != len(pos_lps):
                raise InvalidGroup(f"{where}: ids and logprobs must be lists of the same length")
            if len(pos_ids) > MAX_DISTILL_K:
                raise InvalidGroup(f"{where}: more than {MAX_DISTILL_K} alternatives")
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in pos_ids) or not all(
                isinstance(x, (int, float))
                and not isinstance(x, bool)
                and math.isfinite(x)
                and x <= MAX_TRAINED_LOGPROB
                for x in pos_lps
            ):
                raise InvalidGroup(f"{where}: ids must be integers and logprobs finite numbers <= 0")
            value = teacher_logprob_of(token, pos_ids, pos_lps) if m != PROMPT_MASK else 1.0
            if value is None:
                logger.warning(
                    "distill arrays leave trained position [%d][%d] empty: the group is trained "
                    "without the teacher term",
                    i,
                    t,
                )
                return None
            row.append(value)
        out.append(row)
    return out


def translate_batch(groups: Any) -> tuple[list[ScoredGroup], list[tuple[int | None, str]]]:
    """Translate one /batch answer. Returns (valid groups in order, [(env_id, reason)] of the rejected ones)."""
    if not isinstance(groups, list):
        logger.warning("rejected a batch that is not a list of groups: %s", type(groups).__name__)
        return [], [(None, "batch is not a list")]
    valid: list[ScoredGroup] = []
    rejected: list[tuple[int | None, str]] = []
    for index, group in enumerate(groups):
        try:
            valid.append(to_scored_group(group))
        except InvalidGroup as e:
            env_id = group.get("env_id") if isinstance(group, dict) else None
            env_id = env_id if isinstance(env_id, int) else None
            logger.warning("rejected group %d of a batch (env_id %s): %s", index, env_id, e)
            rejected.append((env_id, str(e)))
    return valid, rejected


def padded_tokens(groups: list[ScoredGroup]) -> int:
    """Tokens a micro-batch of these groups computes on: rows * longest row (rows are right-padded)."""
    rows = [len(seq) for group in groups for seq in group.tokens]
    return len(rows) * max(rows, default=0)


def split_by_token_budget(groups: list[ScoredGroup], token_budget: int) -> list[list[ScoredGroup]]:
    """Pack groups, in order, into micro-batches whose padded size stays within token_budget.

    Groups are never split (their advantages are computed together); a group larger than the budget on its own gets
    a micro-batch of its own.
    """
    if token_budget < 1 or not math.isfinite(token_budget):
        raise ValueError(f"token_budget must be a positive number of tokens, got {token_budget!r}")
    out: list[list[ScoredGroup]] = []
    for group in groups:
        if out and padded_tokens(out[-1] + [group]) <= token_budget:
            out[-1].append(group)
        else:
            out.append([group])
    return out
