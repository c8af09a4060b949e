"""Prompt log-probs: how likely the model finds each prompt token after the ones before it (lm-eval style scoring,
OpenAI's legacy `echo` + `logprobs`, vLLM's `prompt_logprobs`, a distillation teacher's scores).

One sequence (`prompt_logprobs`, the API's): the engine's model (float32 logits, routed to the request's adapter by
the caller), the prompt's token ids and how many alternatives to report. Out: `PromptLogprobs` for positions
1..T-1 (position 0 has nothing before it), at temperature 1 (or the one given). The prompt is run in chunks with a
KV cache, so at most CHUNK x vocabulary logits exist at once.

Many sequences (`score_plan` + `score_rows`, a teacher's batch): rows are grouped longest first, each group right-
padded into one (rows, positions) forward of at most SCORE_TOKENS positions (CHUNK positions per row, or the
group's length when shorter) with each row routed to its own adapter (lora_rows.selected), so 16 sequences of
equal or near lengths up to 257 tokens are one forward pass where one sequence at a time took 16; ragged lengths
are cut into groups where padding would cost more than a forward (`score_plan`). Right padding needs no mask: a
causal position never sees the padding after it. The final hidden states of the real positions alone go
through the LM head, CHUNK positions at a time (logits_head.py), so the logits held stay CHUNK x vocabulary; a
model whose body/head split does not hold gets full logits, CHUNK positions per forward over all its rows.
Runs on the engine thread between two decode steps (one group per loop turn, as a prefill chunk does), or on
any thread for a model of its own (a model-directory teacher, on the learner's thread).
"""

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from paraloop.engine.lora_rows import selected
from paraloop.logits_head import LogitsHead

CHUNK = 256  # positions per forward pass: 256 x 49,152 float32 logits is 50 MB
SCORE_TOKENS = 4096  # (rows x positions) of one batched scoring forward; an engine prefill's is 8 x 2048
# What a forward costs beyond its positions, in positions: layer-by-layer dispatch, one cache update per layer.
# Measured on the CPU (one OpenBLAS thread, CPU time): ~58 on the tiny model; ~25 on SmolLM2-135M (8 x 95 positions
# batched took 5.1 s, one at a time 6.2 s). A GPU's is larger (a kernel launch per op): there, fewer cuts would do.
FORWARD_COST = 64


@dataclass
class PromptLogprobs:
    """Per prompt position 1..T-1: the token's log-prob, its rank (1: the most likely), and the `top` most likely
    alternatives (id, log-prob), most likely first."""

    chosen: list[float] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)


def prompt_logprobs(model: Any, tokens: list[int], *, top: int, temperature: float = 1.0) -> PromptLogprobs:
    out = PromptLogprobs()
    cache = make_prompt_cache(model)
    inputs, targets = tokens[:-1], tokens[1:]
    for start in range(0, len(inputs), CHUNK):
        piece = inputs[start : start + CHUNK]
        logits = model(mx.array(piece)[None], cache=cache)[0]  # (len(piece), vocab), float32
        if temperature != 1.0:  # a distillation teacher's (run/teacher.py); the API scores at 1
            logits = logits / temperature
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        mx.eval(logp)
        rows = np.asarray(logp)
        want = np.asarray(targets[start : start + len(piece)])
        chosen = rows[np.arange(len(piece)), want]
        out.chosen += chosen.astype(np.float64).tolist()
        out.ranks += ((rows > chosen[:, None]).sum(axis=1) + 1).tolist()
        if top > 0:
            ids = np.argpartition(-rows, top - 1, axis=1)[:, :top]
            for row, row_ids in zip(rows, ids, strict=True):
                order = row_ids[np.argsort(-row[row_ids], kind="stable")]
                out.top.append(list(zip(order.tolist(), row[order].astype(np.float64).tolist(), strict=True)))
        else:
            out.top += [[] for _ in piece]
    return out


def score_plan(lengths: list[int]) -> list[list[int]]:
    """Sequence indices in forward groups, each run together (padded to its longest). Longest first, cut where the
    padding a group would carry costs more than another forward: the groups minimise the sum over groups of
    forwards x FORWARD_COST + rows x width (dynamic programming over the sorted lengths), each within SCORE_TOKENS
    per forward. Sequences of equal or near lengths (a GRPO group's completions at the length cap, a batch of
    short answers) share one forward; ragged ones split only where padding would cost more than it saves."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep their order
    widths = [max(lengths[i] - 1, 1) for i in order]
    n = len(order)
    best = [0.0] + [math.inf] * n  # best[k]: the cheapest plan of the first k rows
    cut = [0] * (n + 1)
    for k in range(1, n + 1):
        for j in range(k - 1, -1, -1):  # the last group is rows j..k-1; widths[j] is its width
            rows, width = k - j, widths[j]
            if rows * min(width, CHUNK) > SCORE_TOKENS and rows > 1:
                break  # more rows only widen the forward
            cost = best[j] + -(-width // CHUNK) * FORWARD_COST + rows * width
            if cost < best[k]:
                best[k], cut[k] = cost, j
    groups: list[list[int]] = []
    k = n
    while k > 0:
        groups.append(order[cut[k] : k])
        k = cut[k]
    return groups[::-1]


def score_rows(
    model: Any,
    head: LogitsHead | None,
    sequences: list[list[int]],
    *,
    temperature: float = 1.0,
    adapters: list[int] | None = None,
) -> list[list[float]]:
    """For each sequence (one group of `score_plan`), log softmax(logits / temperature) of its token t after the
    ones before it, t = 1..T-1, from batched forwards of all rows; `adapters`: each row's adapter position (None:
    the model as it is). `head` None: full logits (see the module docstring)."""
    rows = len(sequences)
    inputs = [s[:-1] for s in sequences]
    lengths = np.array([len(x) for x in inputs])
    width = int(lengths.max())
    ids = np.zeros((rows, width), np.int32)
    targets = np.zeros((rows, width), np.int32)
    for i, s in enumerate(sequences):
        ids[i, : lengths[i]] = s[:-1]
        targets[i, : lengths[i]] = s[1:]
    step = CHUNK if head is not None else max(1, CHUNK // rows)
    out: list[list[float]] = [[] for _ in sequences]
    cache = make_prompt_cache(model)
    with selected(adapters) if adapters else nullcontext():
        for start in range(0, width, step):
            piece = ids[:, start : start + step]
            real = np.nonzero(np.arange(start, start + piece.shape[1])[None, :] < lengths[:, None])
            want = targets[:, start : start + step][real]
            if head is None:
                logits = model(mx.array(piece), cache=cache).astype(mx.float32)[mx.array(real[0]), mx.array(real[1])]
                chosen = _chosen(logits, want, temperature)
            else:
                hidden = head.hidden(model, mx.array(piece), cache)
                flat = hidden.reshape(-1, hidden.shape[-1])[mx.array(real[0] * piece.shape[1] + real[1])]
                mx.eval(flat)  # the body once; then the head, CHUNK positions at a time
                chosen = np.concatenate(
                    [
                        _chosen(
                            head.logits(model, flat[s : s + CHUNK]).astype(mx.float32), want[s : s + CHUNK], temperature
                        )
                        for s in range(0, len(want), CHUNK)
                    ]
                )
            for row, value in zip(real[0].tolist(), chosen.tolist(), strict=True):
                out[row].append(value)
    return out


def score_sequences(
    model: Any, head: LogitsHead | None, sequences: list[list[int]], *, temperature: float = 1.0
) -> list[list[float]]:
    """Every sequence's log-probs (as `score_rows`), group after group of `score_plan`: a model of its own (a
    model-directory teacher's); the engine thread runs the same groups one per loop turn (worker.py)."""
    out: list[list[float]] = [[] for _ in sequences]
    for group in score_plan([len(s) for s in sequences]):
        scored = score_rows(model, head, [sequences[i] for i in group], temperature=temperature)
        for i, values in zip(group, scored, strict=True):
            out[i] = values
    return out


def _chosen(logits: mx.array, targets: np.ndarray, temperature: float) -> np.ndarray:
    """(N,) float64: log softmax(logits / temperature)[target] of (N, vocab) logits, as prompt_logprobs computes it."""
    if temperature != 1.0:
        logits = logits / temperature
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    picked = mx.take_along_axis(logp, mx.array(targets)[:, None], axis=-1)[:, 0]
    mx.eval(picked)
    return np.asarray(picked).astype(np.float64)
