"""Activation checkpointing per transformer block, switched on and off per micro-batch.

In: the learner's model (an mlx-lm model whose blocks are `model.layers`). Out: blocks that, while switched on,
run under `mx.checkpoint`: the forward keeps only each block's input and the backward recomputes the block, so a
long sequence holds one block's activations (attention scores included) instead of every block's, at the price of
one more forward of the trained blocks. Works for LoRA and full-weight training (the block's trainable parameters
are passed to the checkpointed function, so their gradients flow).

Only the learner's own module objects change: each block instance gets a subclass of its own class (same name,
`isinstance` still holds, parameter names unchanged) whose `__call__` checks a per-instance switch. The engine's
twin has its own block instances and is never touched; switched off, a block runs exactly as before.
"""

from contextlib import contextmanager
from typing import Any

import mlx.core as mx
import mlx.nn as nn

_SWITCH = "_paraloop_checkpoint"
_SUBCLASSES: dict[type, type] = {}


def _subclass(cls: type) -> type:
    if cls in _SUBCLASSES.values():
        return cls
    if cls not in _SUBCLASSES:
        base_call = cls.__call__

        def __call__(self: nn.Module, x: mx.array, *args: Any, **kwargs: Any) -> Any:
            if not getattr(self, _SWITCH, False):
                return base_call(self, x, *args, **kwargs)

            def block(params: dict, h: mx.array) -> Any:
                self.update(params)
                return base_call(self, h, *args, **kwargs)  # mask and cache are constants of the block

            return mx.checkpoint(block)(self.trainable_parameters(), x)

        _SUBCLASSES[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})
    return _SUBCLASSES[cls]


def blocks(model: nn.Module) -> list[nn.Module]:
    layers = getattr(model, "layers", None)
    return [b for b in layers if isinstance(b, nn.Module)] if isinstance(layers, list) else []


class BlockCheckpointing:
    """The switch for one model's blocks. Blocks below the lowest one with trainable parameters are left alone:
    no gradient flows through them, so MLX keeps none of their activations anyway."""

    def __init__(self, model: nn.Module) -> None:
        self.blocks: list[nn.Module] = []
        trained = False
        for block in blocks(model):
            trained = trained or bool(block.trainable_parameters() and _has_arrays(block.trainable_parameters()))
            if trained:
                block.__class__ = _subclass(type(block))
                object.__setattr__(block, _SWITCH, False)
                self.blocks.append(block)

    @property
    def available(self) -> bool:
        return bool(self.blocks)

    @contextmanager
    def enabled(self, on: bool = True):
        """Checkpoint every trained block inside the `with` (when `on`)."""
        if not on:
            yield
            return
        for block in self.blocks:
            object.__setattr__(block, _SWITCH, True)
        try:
            yield
        finally:
            for block in self.blocks:
                object.__setattr__(block, _SWITCH, False)


def _has_arrays(tree: Any) -> bool:
    if isinstance(tree, mx.array):
        return True
    if isinstance(tree, dict):
        return any(_has_arrays(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return any(_has_arrays(v) for v in tree)
    return False
