"""Per-row adapters: each row of a forward pass adds its own LoRA term (or none), so requests for different
adapters share one batch.

In: the engine's model (its LoRALinear layers carry the policy, the adapter being trained and swapped), the
arrays of named adapters (block, key) -> (A, B), and, before every forward pass, the adapter *position* of each
row of the batch (`selected`). Out: the same model computing y = base(x) + scale[p] * (x A[p]) B[p] per row.
Installing and removing adapters runs on the engine thread, between forward passes.

How (the S-LoRA / Punica idea, in MLX): a routed layer keeps its adapters stacked, A (P, in, r) and B (P, r, out)
with ranks padded with zeros to the largest, and gathers each row's pair inside two batched matmuls
(`mx.gather_mm`). Position 0 is no adapter (zeros: the base model), 1 the policy (the layer's own lora_a/lora_b,
which swaps replace), 2.. the named adapters; an adapter that does not target a layer is zeros there. When every
row of a batch uses one adapter a layer computes exactly as a single-adapter LoRALinear does (the fast path), so
serving one adapter keeps its speed. The stacks are rebuilt lazily, in the first mixed forward pass after an
adapter came, went or was swapped.

The selection is thread-local: a forward pass on any other thread (a test's reference pass) sees the plain
LoRALinear of the policy.
"""

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.tuner.lora import LoRALinear

from paraloop.lora import Target

BASE, POLICY = 0, 1  # the positions of "no adapter" and of the policy; named adapters take 2, 3, ...
FIRST_NAMED = 2


class Selection:
    """The adapter positions of the rows of one forward pass."""

    __slots__ = ("index", "present", "rows", "uniform")

    def __init__(self, positions: list[int]) -> None:
        first = positions[0]
        if all(p == first for p in positions):
            self.uniform: int | None = first
            self.index = self.rows = None
            self.present = frozenset((first,))
        else:
            self.uniform = None
            self.index = mx.array(positions, dtype=mx.uint32)  # (B,) each row's position in the stacks
            self.rows = mx.arange(len(positions), dtype=mx.uint32)
            self.present = frozenset(positions)


_local = threading.local()


@contextmanager
def selected(positions: list[int]) -> Iterator[None]:
    """Route the forward passes made inside the block on this thread: row i uses adapter position positions[i]."""
    previous = getattr(_local, "selection", None)
    _local.selection = Selection(positions) if positions else None
    try:
        yield
    finally:
        _local.selection = previous


class Layout:
    """What every routed layer of one model shares: how many positions the stacks have, and a generation that
    changes whenever an adapter is installed or removed (every layer's stack is then stale)."""

    def __init__(self) -> None:
        self.size = FIRST_NAMED
        self.generation = 0


class LayerAdapters:
    """One routed layer's named adapters and its stack (a plain object: not part of the module's parameters)."""

    def __init__(self, layout: Layout, *, policy: bool) -> None:
        self.layout = layout
        self.policy = policy  # the layer has the policy's lora_a/lora_b
        self.named: dict[int, tuple[mx.array, mx.array, float]] = {}  # position -> (A (in, r), B (r, out), scale)
        self.stack: tuple[mx.array, mx.array, mx.array] | None = None
        self.stack_key: tuple[Any, ...] = ()
        self.stack_policy: tuple[mx.array, mx.array, float] | None = None  # held: `is` stays meaningful

    def positions(self) -> set[int]:
        return self.named.keys() | ({POLICY} if self.policy else set())


class RoutedLoRALinear(LoRALinear):
    """A LoRALinear whose LoRA term follows each row's adapter (see the module docstring). Made by `RowAdapters`:
    from a LoRALinear by changing its class in place (AdapterSlots and the learner's swaps keep pointing at the
    very same module), or around a plain linear layer that no policy LoRA targets."""

    adapters: LayerAdapters

    @classmethod
    def around(cls, linear: nn.Module, layout: Layout) -> "RoutedLoRALinear":
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.linear = linear
        layer.dropout = nn.Dropout(0.0)
        layer.scale = 0.0
        layer.adapters = LayerAdapters(layout, policy=False)
        return layer

    def __call__(self, x: mx.array) -> mx.array:
        selection = getattr(_local, "selection", None)
        if selection is None:
            return self._policy(x)
        if selection.uniform is not None:
            return self._one(x, selection.uniform)
        if selection.present.isdisjoint(self.adapters.positions()):
            return self.linear(x)
        a, b, scales = self._stacked()
        idx, rows = selection.index, selection.rows
        shape = x.shape
        xs = x.reshape(shape[0], -1, shape[-1])  # (B, T, in)
        z = mx.gather_mm(mx.gather_mm(xs, a, lhs_indices=rows, rhs_indices=idx), b, lhs_indices=rows, rhs_indices=idx)
        z = (scales[idx][:, None, None] * z).reshape(*shape[:-1], z.shape[-1])
        return self.linear(x) + z.astype(x.dtype)

    def _policy(self, x: mx.array) -> mx.array:
        return super().__call__(x) if self.adapters.policy else self.linear(x)

    def _one(self, x: mx.array, position: int) -> mx.array:
        """Every row uses one adapter: exactly LoRALinear's arithmetic (or the base layer alone)."""
        if position == POLICY:
            return self._policy(x)
        named = self.adapters.named.get(position)
        if named is None:  # the base model, or an adapter that does not target this layer
            return self.linear(x)
        a, b, scale = named
        return self.linear(x) + (scale * ((x @ a) @ b)).astype(x.dtype)

    def _stacked(self) -> tuple[mx.array, mx.array, mx.array]:
        """A (P, in, r), B (P, r, out), scales (P,): rebuilt when the layout or the policy's arrays changed."""
        adapters, layout = self.adapters, self.adapters.layout
        policy = (self.lora_a, self.lora_b, self.scale) if adapters.policy else None
        key = (layout.generation, layout.size, policy[2] if policy else None)
        if adapters.stack is None or key != adapters.stack_key or not _same(policy, adapters.stack_policy):
            adapters.stack = _stack(adapters, policy)
            adapters.stack_key, adapters.stack_policy = key, policy
        return adapters.stack


def _same(policy: tuple | None, stacked: tuple | None) -> bool:
    """The policy arrays a stack was made from are these very arrays (a swap replaces them by new objects)."""
    if policy is None or stacked is None:
        return policy is stacked
    return policy[0] is stacked[0] and policy[1] is stacked[1]


def _stack(adapters: LayerAdapters, policy: tuple[mx.array, mx.array, float] | None) -> tuple[mx.array, ...]:
    entries = dict(adapters.named)
    if policy is not None:
        entries[POLICY] = policy
    some_a, some_b, _ = next(iter(entries.values()))
    fan_in, fan_out = some_a.shape[0], some_b.shape[1]
    rank = max(a.shape[1] for a, _, _ in entries.values())
    dtype = mx.float32
    a_parts, b_parts, scales = [], [], []
    for position in range(adapters.layout.size):
        entry = entries.get(position)
        if entry is None:
            a_parts.append(mx.zeros((fan_in, rank), dtype))
            b_parts.append(mx.zeros((rank, fan_out), dtype))
            scales.append(0.0)
            continue
        a, b, scale = entry
        pad = rank - a.shape[1]
        a_parts.append(mx.pad(a.astype(dtype), [(0, 0), (0, pad)]) if pad else a.astype(dtype))
        b_parts.append(mx.pad(b.astype(dtype), [(0, pad), (0, 0)]) if pad else b.astype(dtype))
        scales.append(float(scale))
    return mx.stack(a_parts), mx.stack(b_parts), mx.array(scales, dtype=dtype)


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a linear layer: plain, quantized, or a LoRALinear around one."""
    if isinstance(module, LoRALinear):
        module = module.linear
    out_dims, in_dims = module.weight.shape
    if isinstance(module, nn.QuantizedLinear):
        in_dims = in_dims * 32 // module.bits
    return in_dims, out_dims


class RowAdapters:
    """A model's routed layers: made from its LoRALinear layers up front; named adapters are installed into (and
    removed from) them by position, wrapping a plain linear layer the first time an adapter targets it."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layout = Layout()
        self.targets: dict[Target, tuple[int, int]] = {}  # every linear layer of every block -> (in, out)
        for i, block in enumerate(model.layers):
            lora = [key for key, m in block.named_modules() if isinstance(m, LoRALinear)]
            for key, module in block.named_modules():
                if isinstance(module, LoRALinear):
                    policy = not isinstance(module, RoutedLoRALinear) or module.adapters.policy
                    module.__class__ = RoutedLoRALinear  # same object, routed behaviour (see its docstring)
                    module.adapters = LayerAdapters(self.layout, policy=policy)  # an earlier engine's are gone
                    self.targets[(i, key)] = linear_dims(module)
                elif isinstance(module, (nn.Linear, nn.QuantizedLinear)) and not any(
                    key.startswith(f"{k}.") for k in lora
                ):  # a LoRALinear's own base layer is not a target of its own
                    self.targets[(i, key)] = linear_dims(module)

    def install(self, position: int, arrays: dict[Target, tuple[mx.array, mx.array]], scale: float) -> None:
        """Serve `arrays` at `position` from the next forward pass on (engine thread, between passes)."""
        if position < FIRST_NAMED:
            raise ValueError(f"position {position} is reserved")
        for target, (a, b) in arrays.items():
            self._layer(target).adapters.named[position] = (a, b, scale)
        self.layout.size = max(self.layout.size, position + 1)
        self.layout.generation += 1

    def remove(self, position: int) -> None:
        for block in self.model.layers:
            for _, module in block.named_modules():
                if isinstance(module, RoutedLoRALinear):
                    module.adapters.named.pop(position, None)
        self.layout.generation += 1

    def _layer(self, target: Target) -> RoutedLoRALinear:
        index, key = target
        block = self.model.layers[index]
        module = dict(block.named_modules())[key]
        if isinstance(module, RoutedLoRALinear):
            return module
        routed = RoutedLoRALinear.around(module, self.layout)
        block.update_modules(tree_unflatten([(key, routed)]))
        return routed
