"""Find a model (a directory or a Hugging Face repo id), load it once, choose how its frozen base computes, and give
each actor its own view of it.

The engine and the learner each get a *twin*: a separate module tree whose base weights are the very same
mx.arrays (no second copy). Each twin carries its own LoRA arrays, so the learner can trace gradients while the
engine decodes, and an adapter swap is a pointer change on the engine's twin.
"""

import copy
import logging
from pathlib import Path
from typing import Any, Literal

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import dequantize_model, load

Compute = Literal["auto", "quantized", "dequantized"]
log = logging.getLogger("paraloop.model")


class ModelNotFoundError(FileNotFoundError):
    """A model that is neither a model directory nor a Hugging Face repo id that resolves here; says which and why."""


def resolve_model_path(path_or_repo: str | Path, *, revision: str | None = None) -> Path:
    """The local directory of a model, found exactly as mlx-lm finds it (mlx_lm.utils._download): an existing path
    is used as it is; anything else is a Hugging Face repo id, taken from the hub cache (HF_HOME, HF_HUB_CACHE) and
    downloaded when missing, unless HF_HUB_OFFLINE=1. `revision` (a branch, tag or commit) applies to repo ids."""
    text = str(path_or_repo)
    if not text:
        raise ModelNotFoundError("no model given (model.base_path, --model-path)")
    path = Path(text) if Path(text).exists() else _from_hub(text, revision)
    if not (path / "config.json").is_file():
        where = path if str(path) == text else f"{text} ({path})"
        raise ModelNotFoundError(f"not a model directory (no config.json): {where}")
    if str(path) != text:
        log.info("model %s%s: %s", text, f" at revision {revision}" if revision else "", path)
    return path


def _from_hub(repo: str, revision: str | None) -> Path:
    from huggingface_hub import constants, errors
    from mlx_lm.utils import _download

    at = f" at revision {revision!r}" if revision else ""
    try:
        return Path(_download(repo, revision=revision))
    except errors.HFValidationError:
        raise ModelNotFoundError(
            f"not a model directory: {repo} (no such directory, and not a Hugging Face repo id either)"
        ) from None
    except errors.IncompleteSnapshotError as e:
        reason = f"its cached snapshot{at} is incomplete ({e}); run once with network access to complete it"
    except errors.LocalEntryNotFoundError as e:
        cache = constants.HF_HUB_CACHE
        if constants.is_offline_mode():
            reason = f"it is not in the Hugging Face cache {cache}{at}, and HF_HUB_OFFLINE=1 forbids downloading it"
        else:
            cause = e.__cause__ or e
            reason = (
                f"it is not in the Hugging Face cache {cache}{at}, and the hub cannot be reached "
                f"({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})"
            )
    except errors.RevisionNotFoundError:
        reason = f"the hub has no revision {revision!r} of it"
    except errors.GatedRepoError:
        reason = "it is gated: accept its terms on huggingface.co and log in (`hf auth login`)"
    except errors.RepositoryNotFoundError:
        reason = "the hub has no such repo (or it is private: log in with `hf auth login`)"
    except errors.HfHubHTTPError as e:
        reason = f"the hub answered: {str(e).splitlines()[0]}"
    raise ModelNotFoundError(f"{repo}: no such directory, and as a Hugging Face repo id {reason}")


def backend_name() -> str:
    """Where MLX computes by default: "cpu", "metal" or "cuda"."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    return "cuda" if mx.cuda.is_available() else "gpu"


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
    path: str | Path, *, compute: Compute = "auto", trust_remote_code: bool = False, revision: str | None = None
) -> tuple[nn.Module, Any, dict[str, Any], bool]:
    """Load a model directory or Hugging Face repo id (`resolve_model_path`). Returns (model, tokenizer, config,
    was_quantized); the model is evaluated."""
    path = resolve_model_path(path, revision=revision)
    model, tokenizer, config = load(
        str(path), return_config=True, tokenizer_config={"trust_remote_code": trust_remote_code}
    )
    quantized = is_quantized(model)
    floats = "/".join(
        sorted(
            {
                str(v.dtype).removeprefix("mlx.core.")
                for _, v in tree_flatten(model.parameters())
                if mx.issubdtype(v.dtype, mx.floating)
            }
        )
    )
    if quantized:
        bits = (config.get("quantization") or {}).get("bits", "?")
        stored = f"{bits}-bit quantized weights ({floats} scales and norms)"
    else:
        stored = f"{floats} weights"
    if resolve_compute(compute) == "dequantized" and (quantized or floats != "float32"):
        dequantize_base(model)
        how = "expanded to float32 at load"
    else:
        how = "kept quantized: MLX's quantized kernels" if quantized else "computed as stored"
    log.info("model %s: %s, %s (compute = %s, backend %s)", path, stored, how, compute, backend_name())
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


class Float32Logits:
    """A model whose logits come out as float32, for the engine's BatchGenerator.

    Half-precision models (the bfloat16 4-bit models most users run with quantized compute on Metal and CUDA) give
    bfloat16 logits: NumPy cannot read them (the engine's token log-probs), and a log-softmax in bfloat16 keeps
    about 3 significant digits, far from the learner's float32 log-probs of the same logits. Casting the (rows,
    vocab) logits of a decode step costs nothing next to the forward pass; float32 logits pass through unchanged.
    Everything else (layers, make_cache, args) is the wrapped model's."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, inputs: mx.array, cache: Any = None) -> mx.array:
        return self.model(inputs, cache=cache).astype(mx.float32)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)
