"""Prompt log-probs: how likely the model finds each prompt token after the ones before it (lm-eval style scoring,
OpenAI's legacy `echo` + `logprobs`, vLLM's `prompt_logprobs`).

In: the engine's model (float32 logits, routed to the request's adapter by the caller), the prompt's token ids and
how many alternatives to report. Out: `PromptLogprobs` for positions 1..T-1 (position 0 has nothing before it), at
temperature 1 (or the one given: a distillation teacher's). The prompt is run in chunks with a KV cache, so at most
CHUNK x vocabulary logits exist at once.
Runs on the engine thread, between two decode steps (a long prompt holds the batch like a prefill does).
"""

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

CHUNK = 256  # positions per forward pass: 256 x 49,152 float32 logits is 50 MB


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
