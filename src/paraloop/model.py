"""Load a model once, choose how its frozen base computes, and give each actor its own view of it.

The engine and the learner each get a *twin*: a separate module tree whose base weights are the very same
mx.arrays (no second copy). Each twin carries its own LoRA arrays, so the learner can trace gradients while the
engine decodes, and an adapter swap is a pointer change on the engine's twin.
"""

import copy
from pathlib import Path
from typing import Any, Literal

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import dequantize_model, load

Compute = Literal["auto", "quantized", "dequantized"]


def resolve_compute(compute: Compute) -> Literal["quantized", "dequantized"]:
    """`auto`: dequantize on the CPU backend (4-bit matmul there is ~10-50x slower than float32 sgemm with
    OpenBLAS); keep the quantized kernels on Metal and CUDA, where they are the fast path."""
    if compute != "auto":
        return compute
    return "dequantized" if mx.default_device() == mx.cpu else "quantized"


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())


def dequantize_base(model: nn.Module) -> nn.Module:
    """Replace quantized layers by float32 ones (in place); half-precision weights become float32 too, since
    float16/bfloat16 matmul on the CPU never reaches BLAS."""
    dequantize_model(model)
    weights = [(k, v.astype(mx.float32)) for k, v in tree_flatten(model.parameters()) if v.dtype != mx.float32]
    if weights:
        model.load_weights(weights, strict=False)
    mx.eval(model.parameters())
    return model


def load_model(
    path: str | Path, *, compute: Compute = "auto", trust_remote_code: bool = False
) -> tuple[nn.Module, Any, dict[str, Any], bool]:
    """Load an mlx-lm model directory. Returns (model, tokenizer, config, was_quantized); the model is evaluated."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"not a model directory (no config.json): {path}")
    model, tokenizer, config = load(
        str(path), return_config=True, tokenizer_config={"trust_remote_code": trust_remote_code}
    )
    quantized = is_quantized(model)
    if quantized and resolve_compute(compute) == "dequantized":
        dequantize_base(model)
    model.eval()
    return model, tokenizer, config, quantized


def twin(module: nn.Module) -> nn.Module:
    """A new module tree with the same structure whose arrays are the same objects (shared, not copied)."""

    def clone(value: Any) -> Any:
        if isinstance(value, nn.Module):
            return twin(value)
        if isinstance(value, list):
            return [clone(v) for v in value]
        if isinstance(value, tuple):
            return tuple(clone(v) for v in value)
        if isinstance(value, dict):
            return {k: clone(v) for k, v in value.items()}
        return value

    new = copy.copy(module)  # a fresh dict-backed Module with the same attributes (arrays by reference)
    if hasattr(module, "_no_grad"):
        new._no_grad = set(module._no_grad)  # freezing one twin must not freeze the other
    for key, value in module.items():
        new[key] = clone(value)
    return new


def parameter_bytes(model: nn.Module) -> int:
    """Bytes held by distinct arrays of the model (shared arrays counted once)."""
    seen: dict[int, int] = {}
    for _, v in tree_flatten(model.parameters()):
        seen[id(v)] = v.nbytes
    return sum(seen.values())
