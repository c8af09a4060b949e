"""What trains and how: parameter selection, AdamW, the learning-rate schedule, gradient arithmetic.

In: the learner's model twin and `rl_training` settings. Out: a model whose trainable parameters are the LoRA
arrays (or every weight in full mode), an mlx.optimizers.AdamW, the learning rate of a given step, and helpers to
accumulate and clip gradient trees. The schedule is a plain function of the step so that resuming needs only the
step number.
"""

import math

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from paraloop.config import RLTrainingConfig
from paraloop.lora import ADAPTER_LEAVES, has_lora
from paraloop.model import is_quantized


def select_trainable(model: nn.Module, train_mode: str) -> None:
    """Freeze everything, then unfreeze the LoRA arrays ("lora") or all weights ("full")."""
    if train_mode == "lora":
        if not has_lora(model):
            raise ValueError(
                "train_mode = 'lora' but the model has no LoRA layers (pass adapter_config to attach them)"
            )
        model.freeze()
        for _, module in model.named_modules():
            if all(leaf in module for leaf in ADAPTER_LEAVES):
                module.unfreeze(keys=list(ADAPTER_LEAVES), recurse=False)
    elif train_mode == "full":
        if is_quantized(model):
            raise ValueError(
                "train_mode = 'full' needs a non-quantized model: quantized weights have no gradient "
                "(use train_mode = 'lora', or a float model)"
            )
        model.unfreeze()
    else:
        raise ValueError(f"train_mode must be lora or full, not {train_mode!r}")
    if not tree_flatten(model.trainable_parameters()):
        raise ValueError("no trainable parameters")


def learning_rate_at(step: int, config: RLTrainingConfig) -> float:
    """Linear warmup over warmup_steps (reaching the peak at step warmup_steps - 1), then constant or a cosine decay
    to min_lr_ratio * learning_rate at total_steps (and flat after it)."""
    peak = config.learning_rate
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return peak
    span = max(1, config.total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.min_lr_ratio
    return peak * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_optimizer(config: RLTrainingConfig) -> optim.AdamW:
    return optim.AdamW(learning_rate=config.learning_rate, weight_decay=config.weight_decay)


def add_trees(a: dict | None, b: dict) -> dict:
    return b if a is None else tree_map(mx.add, a, b)


def global_norm(grads: dict) -> mx.array:
    return mx.sqrt(sum((mx.sum(mx.square(g)) for _, g in tree_flatten(grads)), mx.array(0.0)))


def clip_by_norm(grads: dict, norm: mx.array, max_norm: float | None) -> dict:
    """Scale the whole tree down so its global norm is at most max_norm (None: unchanged)."""
    if max_norm is None:
        return grads
    scale = mx.minimum(1.0, max_norm / (norm + 1e-6))
    return tree_map(lambda g: g * scale, grads)
