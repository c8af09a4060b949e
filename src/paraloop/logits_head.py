"""Where an mlx-lm model's logits come from: its body (ids -> hidden states) and its head (hidden -> logits).

In: a loaded mlx-lm model. Out: a `LogitsHead` that runs `model.model` to the final hidden states, then the LM head
(`model.lm_head`, or the tied `model.model.embed_tokens.as_linear`) and any elementwise logit transform the model's
own `__call__` applies after it (Gemma-2's softcap, Cohere's logit_scale, Granite's logits_scaling), or None when the
model is laid out some other way. Chunked log-probs need the split (the learner's, learn/logprobs.py, and the
engine's batched scoring, engine/scoring.py): they push the hidden states through the head a few hundred positions
at a time instead of materialising (rows, tokens, vocab) logits.

The split is checked once, numerically: head(body(ids)) must equal model(ids) on a short probe. A model that does
anything else in `__call__` (an unknown transform, a different body) fails the check and falls back to the full
logits path, with a log line saying so.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

logger = logging.getLogger("paraloop.learn")

PROBE_TOKENS = 8
PROBE_TOLERANCE = 1e-4  # relative to the largest |logit|; identical op sequences agree far better than this


@dataclass(frozen=True)
class Transform:
    """An elementwise logit transform after the projection: y = cap * tanh(x / cap) * scale, or y = x * scale."""

    scale: float = 1.0
    softcap: float | None = None

    def __call__(self, x: mx.array) -> mx.array:
        if self.softcap is not None:
            x = mx.tanh(x / self.softcap) * self.softcap
        return x * self.scale if self.scale != 1.0 else x

    def backward(self, y: mx.array, dy: mx.array) -> mx.array:
        """dL/dx from the transform's output y and dL/dy (no recomputation of x needed)."""
        if self.softcap is not None:
            t = y / (self.softcap * self.scale)  # tanh(x / cap)
            dy = dy * (1.0 - mx.square(t))
        return dy * self.scale if self.scale != 1.0 else dy


IDENTITY = Transform()


def model_transform(model: nn.Module) -> Transform | None:
    """The logit transform mlx-lm's `Model.__call__` applies for this architecture (None: unknown, do not split).

    Architectures are matched by their mlx-lm model_type; everything not listed here is assumed to return the
    projection unchanged, which the numerical probe in `logits_head` then confirms or refutes.
    """
    args = getattr(model, "args", None)
    kind = getattr(args, "model_type", None) or getattr(model, "model_type", None)
    try:
        if kind == "gemma2":
            cap = getattr(model, "final_logit_softcapping", None) or args.final_logit_softcapping
            return Transform(softcap=float(cap))
        if kind in ("cohere", "cohere2"):
            return Transform(scale=float(args.logit_scale))
        if kind in ("granite", "granitemoe", "granitemoehybrid"):
            return Transform(scale=1.0 / float(args.logits_scaling))
    except (AttributeError, TypeError, ValueError):
        return None
    return IDENTITY


@dataclass(frozen=True)
class LogitsHead:
    """How to get logits from hidden states for one model: tied embedding or lm_head, then a transform.

    It names modules by path, never holds them, so the same description serves every twin of a model (a twin
    updated by full-weight training is read at call time).
    """

    tied: bool
    transform: Transform

    def module(self, model: nn.Module) -> nn.Module:
        return model.model.embed_tokens if self.tied else model.lm_head

    def hidden(self, model: nn.Module, input_ids: mx.array, cache: list | None = None) -> mx.array:
        """(B, T, D) final hidden states (after the final norm); `cache`: a prompt cache the positions extend."""
        return model.model(input_ids, cache=cache)

    def projection(self, module: nn.Module) -> Callable[[mx.array], mx.array]:
        """hidden (..., D) -> raw logits (..., V), before the transform."""
        return module.as_linear if self.tied else module

    def logits(self, model: nn.Module, hidden: mx.array) -> mx.array:
        return self.transform(self.projection(self.module(model))(hidden))


def _layout(model: nn.Module) -> LogitsHead | None:
    body = model.get("model") if isinstance(model, nn.Module) else None
    if not isinstance(body, nn.Module) or not callable(body):
        return None
    transform = model_transform(model)
    if transform is None:
        return None
    if "lm_head" in model and isinstance(model["lm_head"], nn.Module):
        return LogitsHead(tied=False, transform=transform)
    embed = body.get("embed_tokens")
    if isinstance(embed, nn.Module) and hasattr(embed, "as_linear"):
        return LogitsHead(tied=True, transform=transform)
    return None


def logits_head(model: nn.Module) -> LogitsHead | None:
    """The model's body/head split, verified on a probe in eval mode; None (and a log line) when it does not hold."""
    name = type(model).__module__
    head = _layout(model)
    if head is None:
        logger.info(
            "chunked log-probs off for %s: no model.model body with an lm_head or tied embedding; "
            "the learner computes full logits",
            name,
        )
        return None
    training = model.training
    model.eval()  # no dropout in the probe: both sides must see the same function
    try:
        probe = mx.arange(1, PROBE_TOKENS + 1, dtype=mx.int32)[None] % max(2, _vocab(model))
        full = model(probe).astype(mx.float32)
        split = head.logits(model, head.hidden(model, probe)).astype(mx.float32)
        scale = mx.maximum(mx.max(mx.abs(full)), 1.0)
        error = (mx.max(mx.abs(full - split)) / scale).item()
    except Exception as e:  # noqa: BLE001  (any failure of the split means: use the full path)
        logger.info(
            "chunked log-probs off for %s: the body/head split failed (%s); the learner computes full logits", name, e
        )
        return None
    finally:
        model.train(training)
    if not error <= PROBE_TOLERANCE:
        logger.info(
            "chunked log-probs off for %s: head(body(x)) differs from model(x) by %.2g (relative); it applies "
            "something this split does not know, so the learner computes full logits",
            name,
            error,
        )
        return None
    return head


def _vocab(model: nn.Module) -> int:
    args = getattr(model, "args", None)
    return int(getattr(args, "vocab_size", 0) or 2)
