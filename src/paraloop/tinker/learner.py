"""The training side of local Tinker: one learner twin of the base model shared by every training client.

In: a client's adapter arrays and the datums of a forward_backward, or its AdamParams for optim_step. Out: the
loss, each datum's target log-probs, gradients accumulated on the client (Tinker's forward_backward accumulates
until optim_step), and Adam steps. Each client owns its arrays, gradients and Adam moments (`TrainingModel`); the
twin's LoRA slots are pointed at a client's arrays for the length of one call (no copy), so N clients cost the base
once plus N adapters and their optimizer states. Every method runs on the learner's own MLX thread.
"""

import math
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.tuner.lora import LoRALinear

from paraloop.learn.logprobs import forward_logprobs
from paraloop.logits_head import logits_head
from paraloop.lora import (
    AdapterSlots,
    ServedAdapter,
    Target,
    adapter_arrays,
    attach_lora,
    linear_keys,
    parse_name,
)
from paraloop.tinker.losses import LOSSES, OPTIONAL, REQUIRED, default_weights
from paraloop.tinker.proto import DatumIn


@dataclass
class AdamParams:
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


@dataclass(eq=False)
class TrainingModel:
    """One training client's state: its adapter, accumulated gradients and Adam moments."""

    model_id: str
    base_model: str
    rank: int
    arrays: dict[str, mx.array]
    grads: dict[str, mx.array] | None = None
    m: dict[str, mx.array] = field(default_factory=dict)
    v: dict[str, mx.array] = field(default_factory=dict)
    step: int = 0  # optimizer steps taken
    version: int = 0  # sampler weights published
    inflight: dict[str, mx.array] | None = None  # the latest inflight sampler save: what inflight samplers use
    inflight_version: int = 0  # its `version`
    inflight_adapter: str | None = None  # the engine adapter serving it (replaced in place by each inflight save)

    def optimizer_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"step": self.step}
        state.update({f"m.{k}": a for k, a in self.m.items()})
        state.update({f"v.{k}": a for k, a in self.v.items()})
        return state

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        self.step = int(state.get("step", 0))
        self.m = {k[2:]: a for k, a in state.items() if k.startswith("m.")}
        self.v = {k[2:]: a for k, a in state.items() if k.startswith("v.")}


MICRO_TOKENS = 4096  # padded tokens per micro-batch of a forward_backward (activations for this many at once)
ALPHA = 32.0  # LoRA scale = ALPHA / rank: the parametrisation Tinker describes ("LoRA Without Regret": alpha 32)


def lora_scale(rank: int) -> float:
    return ALPHA / rank


class Learner:
    """See the module docstring. `model` is a twin of the base with no LoRA yet; LoRA is attached here."""

    def __init__(self, model: nn.Module, *, micro_tokens: int = MICRO_TOKENS) -> None:
        self.keys = linear_keys(model)
        self.config = {
            "fine_tune_type": "lora",
            "num_layers": len(model.layers),
            "lora_parameters": {"rank": 1, "scale": ALPHA, "dropout": 0.0, "keys": self.keys},
        }
        attach_lora(model, self.config)
        model.eval()
        model.freeze()
        self.model = model
        self.lora_layers = [m for _, m in model.named_modules() if isinstance(m, LoRALinear)]
        self.micro_tokens = micro_tokens
        self.head = logits_head(model)  # log-probs a chunk of positions at a time: no (B, T, vocab) logits
        self.slots = AdapterSlots(model)
        self.shapes = {k: v.shape for k, v in adapter_arrays(model).items()}  # at rank 1: (in, 1) and (1, out)

    def use(self, arrays: dict[str, mx.array]) -> None:
        """Point the twin's LoRA layers at `arrays` (and their rank's scale)."""
        rank = next(a.shape[1] for k, a in arrays.items() if k.endswith("lora_a"))
        for layer in self.lora_layers:
            layer.scale = lora_scale(rank)
        self.slots.swap(arrays)

    def adapter_config(self, rank: int) -> dict[str, Any]:
        params = {**self.config["lora_parameters"], "rank": rank, "scale": lora_scale(rank)}
        return {**self.config, "lora_parameters": params}

    def new_adapter(self, rank: int, seed: int) -> dict[str, mx.array]:
        """mlx-lm's LoRALinear initialisation: A uniform in +-1/sqrt(fan_in), B zero (the output is unchanged)."""
        key = mx.random.key(seed)
        arrays = {}
        for name, shape in sorted(self.shapes.items()):
            if name.endswith("lora_a"):
                key, sub = mx.random.split(key)
                bound = 1 / math.sqrt(shape[0])
                arrays[name] = mx.random.uniform(-bound, bound, (shape[0], rank), key=sub)
            else:
                arrays[name] = mx.zeros((rank, shape[1]))
        mx.eval(arrays)
        return arrays

    def zero_adapter(self) -> dict[str, mx.array]:
        """An adapter that adds exactly nothing: the base model."""
        return {n: mx.zeros((s[0], 1)) if n.endswith("lora_a") else mx.zeros((1, s[1])) for n, s in self.shapes.items()}

    # --- forward / backward ------------------------------------------------------------------------------------------

    def _batch(self, data: list[DatumIn]) -> tuple[mx.array, mx.array, mx.array, dict[str, mx.array]]:
        width = max(len(d.tokens) for d in data)
        ids = np.zeros((len(data), width), np.int32)
        targets = np.zeros((len(data), width), np.int32)
        mask = np.zeros((len(data), width), np.float32)
        names = {k for d in data for k in d.inputs} - {"target_tokens"}
        inputs = {k: np.zeros((len(data), width), np.float32) for k in names}
        for i, d in enumerate(data):
            n = len(d.tokens)
            ids[i, :n] = d.tokens
            targets[i, :n] = d.inputs["target_tokens"]
            mask[i, :n] = 1.0
            for k in names:
                inputs[k][i, :n] = d.inputs[k]
        return mx.array(ids), mx.array(targets), mx.array(mask), {k: mx.array(v) for k, v in inputs.items()}

    def forward_backward(
        self, tm: TrainingModel, data: list[DatumIn], loss_fn: str, config: dict[str, float], *, forward_only: bool
    ) -> tuple[list[dict[str, np.ndarray]], dict[str, float]]:
        """The summed loss and each datum's outputs; unless forward_only, the gradient added to the client's. Datums
        go through in micro-batches of at most `micro_tokens` padded tokens (the loss is a sum: the parts add up)."""
        self.use(tm.arrays)
        loss_of = LOSSES[loss_fn]
        if any("weights" in d.inputs for d in data):
            data = [d if "weights" in d.inputs else with_weights(d, loss_fn) for d in data]
        total = 0.0  # summed in float64 over the micro-batches
        logprobs: list[np.ndarray] = []
        for part in micro_batches(data, self.micro_tokens):
            loss, lp = self._part(tm, part, loss_of, config, forward_only=forward_only)
            total += loss
            logprobs += [lp[i, : len(d.tokens)].astype(np.float32) for i, d in enumerate(part)]
        outputs = []
        for d, lp in zip(data, logprobs, strict=True):
            row = {"logprobs": lp}
            if loss_fn == "cross_entropy":
                w = d.inputs.get("weights", np.ones(len(d.tokens), np.float32))
                row["elementwise_loss"] = (-lp * w).astype(np.float32)
            outputs.append(row)
        return outputs, {"loss:sum": total}

    def _part(
        self, tm: TrainingModel, part: list[DatumIn], loss_of: Any, config: dict[str, float], *, forward_only: bool
    ) -> tuple[float, np.ndarray]:
        """One micro-batch: its loss and (B, T) log-probs; its gradient added to the client's."""
        ids, targets, mask, inputs = self._batch(part)
        ones = mx.ones((ids.shape[0],))

        def objective(arrays: dict[str, mx.array]) -> tuple[mx.array, mx.array]:
            self.slots.swap(arrays)
            lp, _ = forward_logprobs(self.model, ids, targets, ones, with_entropy=False, head=self.head)
            return loss_of(lp, mask, inputs, config), lp

        if forward_only:
            loss, lp = objective(tm.arrays)
            mx.eval(loss, lp)
        else:
            (loss, lp), grads = mx.value_and_grad(objective)(tm.arrays)
            tm.grads = grads if tm.grads is None else {k: tm.grads[k] + g for k, g in grads.items()}
            mx.eval(loss, lp, tm.grads)
        self.slots.swap(tm.arrays)  # no tracer left in the twin
        return float(loss.item()), np.array(lp)

    def prompt_logprobs(self, arrays: dict[str, mx.array] | None, tokens: list[int]) -> list[float]:
        """log p(token i | tokens before it) for i >= 1, NaN for the first (Tinker's prompt_logprobs); arrays None:
        the base model."""
        if len(tokens) < 2:  # the first token has no context: nothing to run
            return [math.nan]
        self.use(arrays if arrays is not None else self.zero_adapter())
        ids = mx.array([tokens[:-1]], dtype=mx.int32)
        lp, _ = forward_logprobs(
            self.model, ids, mx.array([tokens[1:]], dtype=mx.int32), mx.ones((1,)), with_entropy=False, head=self.head
        )
        return [math.nan, *np.array(lp[0]).tolist()]

    # --- the optimizer -----------------------------------------------------------------------------------------------

    def optim_step(self, tm: TrainingModel, p: AdamParams) -> dict[str, float]:
        """One AdamW step (PyTorch's form: decoupled decay p *= 1 - lr * wd, bias-corrected moments) on the
        accumulated gradients, which are then cleared; optional clipping to grad_clip_norm first."""
        if tm.grads is None:
            return {}
        grads = tm.grads
        norm = mx.sqrt(sum((mx.sum(g * g) for g in grads.values()), mx.array(0.0)))
        if p.grad_clip_norm > 0:
            factor = mx.minimum(1.0, p.grad_clip_norm / mx.maximum(norm, 1e-12))
            grads = {k: g * factor for k, g in grads.items()}
        tm.step += 1
        c1 = 1 - p.beta1**tm.step
        c2 = 1 - p.beta2**tm.step
        new = {}
        for k, g in grads.items():
            m = p.beta1 * tm.m.get(k, mx.zeros_like(g)) + (1 - p.beta1) * g
            v = p.beta2 * tm.v.get(k, mx.zeros_like(g)) + (1 - p.beta2) * mx.square(g)
            tm.m[k], tm.v[k] = m, v
            param = tm.arrays[k] * (1 - p.learning_rate * p.weight_decay)
            new[k] = param - p.learning_rate * (m / c1) / (mx.sqrt(v / c2) + p.eps)
        tm.arrays = new
        tm.grads = None
        mx.eval(tm.arrays, tm.m, tm.v, norm)
        return {"grad_norm": float(norm.item())}


def with_weights(d: DatumIn, loss_fn: str) -> DatumIn:
    return DatumIn(d.tokens, {**d.inputs, "weights": default_weights(loss_fn, d.inputs, len(d.tokens))})


def micro_batches(data: list[DatumIn], tokens: int) -> list[list[DatumIn]]:
    """Consecutive datums grouped so that each group's padded size (count x longest) stays within `tokens` (a datum
    longer than that is a group of its own)."""
    groups: list[list[DatumIn]] = []
    longest = 0
    for d in data:
        n = len(d.tokens)
        if groups and (len(groups[-1]) + 1) * max(longest, n) <= tokens:
            groups[-1].append(d)
            longest = max(longest, n)
        else:
            groups.append([d])
            longest = n
    return groups


def served(arrays: dict[str, mx.array]) -> ServedAdapter:
    """The adapter in the engine's per-row form (layer -> (A, B)); the arrays are shared, not copied."""
    pairs: dict[Target, dict[str, mx.array]] = {}
    for name, array in arrays.items():
        parsed = parse_name(name)
        if parsed is not None:
            pairs.setdefault(parsed[0], {})[parsed[1]] = array
    out = {t: (p["lora_a"], p["lora_b"]) for t, p in pairs.items()}
    nbytes = sum(a.nbytes + b.nbytes for a, b in out.values())
    rank = max(a.shape[1] for a, _ in out.values())
    return ServedAdapter(out, lora_scale(rank), rank, nbytes)


def check_data(data: list[DatumIn], loss_fn: str, *, vocab: int, max_tokens: int) -> None:
    """ValueError naming the first datum field that cannot be trained on."""
    total = 0
    for i, d in enumerate(data):
        n = len(d.tokens)
        total += n
        if n == 0:
            raise ValueError(f"data[{i}].model_input: empty")
        for key in REQUIRED[loss_fn]:
            if key not in d.inputs:
                raise ValueError(f"data[{i}].loss_fn_inputs.{key}: required by {loss_fn}")
        for key, array in sorted(d.inputs.items(), key=lambda kv: kv[0] != "target_tokens"):
            if key not in REQUIRED[loss_fn] and key not in OPTIONAL:
                raise ValueError(f"data[{i}].loss_fn_inputs.{key}: not an input of {loss_fn}")
            if len(array) != n:
                raise ValueError(f"data[{i}].loss_fn_inputs.{key}: {len(array)} values for {n} input tokens")
            if key != "target_tokens" and not np.isfinite(array).all():
                raise ValueError(f"data[{i}].loss_fn_inputs.{key}: not finite")
        if d.inputs["target_tokens"].dtype.kind not in "iu":
            raise ValueError(f"data[{i}].loss_fn_inputs.target_tokens: must be integer token ids (int64)")
        for name, ids in (("model_input", d.tokens), ("loss_fn_inputs.target_tokens", d.inputs["target_tokens"])):
            if ids.size and (ids.min() < 0 or ids.max() >= vocab):
                raise ValueError(f"data[{i}].{name}: token ids must be in [0, {vocab})")
    if total > max_tokens:
        raise ValueError(
            f"data: {total} tokens in one forward_backward, more than tinker.max_batch_tokens = {max_tokens}"
        )
