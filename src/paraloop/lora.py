"""LoRA on a model: attach layers, read the adapter arrays, swap them in place, save and load adapter files.

Adapter arrays are named as mlx-lm names them ("model.layers.3.self_attn.q_proj.lora_a"), so paraloop checkpoints
load with `mlx_lm.load(model, adapter_path=...)` and adapters trained by `mlx_lm.lora` load here.
"""

import json
import os
import re
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from paraloop.config import LoraConfig

ADAPTER_LEAVES = ("lora_a", "lora_b")
SAFETENSORS_NAME = "adapters.safetensors"
NPZ_NAME = "adapter.npz"
CONFIG_NAME = "adapter_config.json"
MAX_CONFIG_BYTES = 1 << 20  # an adapter_config.json is a few hundred bytes
ADAPTER_NAME = re.compile(r"(?:.+\.)?layers\.(\d+)\.(.+)\.(lora_a|lora_b)")  # mlx-lm's LoRA array names

Target = tuple[int, str]  # a linear layer: (block index, module path inside the block), e.g. (3, "self_attn.q_proj")


def linear_keys(model: nn.Module) -> list[str]:
    """Every linear layer inside a transformer block, by its path within the block (for keys = "all")."""
    keys: set[str] = set()
    for block in model.layers:
        for name, module in block.named_modules():
            if isinstance(module, (nn.Linear, nn.QuantizedLinear)):
                keys.add(name)
    return sorted(keys)


def adapter_config(cfg: LoraConfig, model: nn.Module) -> dict[str, Any]:
    """The adapter_config.json content, in mlx-lm's schema."""
    keys = linear_keys(model) if cfg.keys == "all" else list(cfg.keys)
    num_layers = len(model.layers) if cfg.num_layers == -1 else cfg.num_layers
    return {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": {"rank": cfg.rank, "scale": cfg.effective_scale, "dropout": cfg.dropout, "keys": keys},
    }


def attach_lora(model: nn.Module, config: dict[str, Any], *, seed: int = 0) -> None:
    """Wrap the configured linear layers with LoRALinear (A uniform from `seed`, B zero: the output is unchanged)."""
    params = config["lora_parameters"]
    mx.random.seed(seed)
    linear_to_lora_layers(model, config["num_layers"], dict(params))
    model.train(model.training)  # new LoRA modules start in training mode: match the model (no dropout when serving)
    if not adapter_arrays(model):
        keys = params.get("keys") or "every linear layer"
        raise ValueError(f"no layer matched LoRA keys {keys} in the last {config['num_layers']} blocks")


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for _, m in model.named_modules())


def adapter_arrays(model: nn.Module) -> dict[str, mx.array]:
    """The model's LoRA arrays by name, as references (nothing copied)."""
    return {k: v for k, v in tree_flatten(model.parameters()) if k.rsplit(".", 1)[-1] in ADAPTER_LEAVES}


class AdapterSlots:
    """Pre-resolved (module, leaf) pairs, so replacing the adapter is a loop of dict assignments.

    `model.update(tree)` walks and validates the whole tree (~9 ms for SmolLM2's 420 arrays); this does only the
    assignments. The caller must run `swap` between forward passes (the engine does it between decode steps).
    """

    def __init__(self, model: nn.Module, *, names: list[str] | None = None) -> None:
        """Slots for the model's LoRA arrays, or for `names` (e.g. every weight, for full-weight training)."""
        modules = dict(model.named_modules())
        self._slots: dict[str, tuple[nn.Module, str]] = {}
        for name in names if names is not None else adapter_arrays(model):
            owner, leaf = name.rsplit(".", 1)
            self._slots[name] = (modules[owner], leaf)
        if not self._slots:
            raise ValueError("the model has no LoRA layers")

    @property
    def names(self) -> list[str]:
        return list(self._slots)

    def check(self, arrays: dict[str, mx.array]) -> None:
        """Raise ValueError if `arrays` does not name exactly this model's adapter arrays with matching shapes."""
        missing = self._slots.keys() - arrays.keys()
        extra = arrays.keys() - self._slots.keys()
        if missing or extra:
            raise ValueError(f"adapter mismatch: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
        for name, (module, leaf) in self._slots.items():
            if module[leaf].shape != arrays[name].shape:
                raise ValueError(f"{name}: shape {arrays[name].shape} != {module[leaf].shape}")

    def swap(self, arrays: dict[str, mx.array]) -> float:
        """Point every slot at the new array (no copy). Returns the seconds it took."""
        start = time.perf_counter()
        for name, (module, leaf) in self._slots.items():
            module[leaf] = arrays[name]
        return time.perf_counter() - start


def save_adapter(
    directory: str | Path, arrays: dict[str, mx.array], config: dict[str, Any], *, fmt: str = "safetensors"
) -> list[Path]:
    """Write adapter files (safetensors / npz / both) and adapter_config.json into `directory` (created).

    Callers wanting atomicity write into a temporary directory and rename it (see checkpoint.py).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    if fmt in ("safetensors", "both"):
        path = directory / SAFETENSORS_NAME
        mx.save_safetensors(str(path), arrays, metadata={"format": "mlx"})
        written.append(path)
    if fmt in ("npz", "both"):
        path = directory / NPZ_NAME
        np.savez(str(path), **{k: np.array(v.astype(mx.float32)) for k, v in arrays.items()})
        written.append(path)
    if fmt not in ("safetensors", "npz", "both"):
        raise ValueError(f"adapter_format must be safetensors, npz or both, not {fmt!r}")
    path = directory / CONFIG_NAME
    path.write_text(json.dumps(config, indent=2) + "\n")
    written.append(path)
    for p in written:
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    return written


def adapter_files(path: str | Path) -> tuple[Path, Path | None]:
    """(weights file, adapter_config.json or None) of an adapter: a directory (adapters.safetensors or
    adapter.npz, + adapter_config.json) or a weights file (its config beside it)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"adapter not found: {path}")
    if not path.is_dir():
        config = path.parent / CONFIG_NAME
        return path, config if config.is_file() else None
    config = path / CONFIG_NAME
    for name in (SAFETENSORS_NAME, NPZ_NAME):
        if (path / name).is_file():
            return path / name, config if config.is_file() else None
    raise FileNotFoundError(f"{path}: no {SAFETENSORS_NAME} or {NPZ_NAME}")


def load_adapter(path: str | Path) -> tuple[dict[str, mx.array], dict[str, Any] | None]:
    """Read an adapter: a directory (adapters.safetensors or adapter.npz, + adapter_config.json) or a file.

    Returns (arrays, adapter_config or None when the source has none).
    """
    file, config_file = adapter_files(path)
    config = None
    if config_file is not None:
        try:
            config = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{config_file}: invalid JSON: {e}") from None
    try:
        if file.suffix == ".npz":
            with np.load(file) as data:
                arrays = {k: mx.array(data[k]) for k in data.files}
        else:
            arrays = mx.load(str(file))
    except Exception as e:  # corrupt or truncated file: name it
        raise ValueError(f"{file}: cannot read adapter ({e})") from None
    arrays = {k.removeprefix("arr_"): v for k, v in arrays.items()}
    return arrays, config


def apply_adapter(model: nn.Module, path: str | Path, *, seed: int = 0) -> dict[str, Any]:
    """Attach LoRA as the adapter's config says (unless already attached) and load its arrays. Returns the config.

    An adapter without adapter_config.json (the predecessor's adapter.npz) is refused here: its callers that accept
    one use `paraloop.predecessor.apply_adapter_assuming`, which is given the configuration to assume.
    """
    arrays, config = load_adapter(path)
    if config is None:
        raise ValueError(f"{path}: no {CONFIG_NAME} next to the adapter weights (needed to know the LoRA layout)")
    load_into(model, arrays, config, seed=seed, source=path)
    return config


def load_into(
    model: nn.Module, arrays: dict[str, mx.array], config: dict[str, Any], *, seed: int = 0, source: Any = "adapter"
) -> None:
    """Attach LoRA as `config` says (unless already attached) and load `arrays` into it; `source` names them in
    errors."""
    if config.get("fine_tune_type", "lora") != "lora":
        raise ValueError(f"{source}: fine_tune_type {config.get('fine_tune_type')!r} is not supported (only lora)")
    if not has_lora(model):
        attach_lora(model, config, seed=seed)
    slots = AdapterSlots(model)
    arrays = {k: v.astype(mx.float32) for k, v in arrays.items()}
    slots.check(arrays)
    slots.swap(arrays)
    mx.eval(list(arrays.values()))


def parse_name(name: str) -> tuple[Target, str] | None:
    """ "model.layers.3.self_attn.q_proj.lora_a" -> ((3, "self_attn.q_proj"), "lora_a"); None if not a LoRA array."""
    match = ADAPTER_NAME.fullmatch(name)
    if match is None:
        return None
    return (int(match[1]), match[2]), match[3]


@dataclass(frozen=True)
class ServedAdapter:
    """An adapter read for serving beside others: its arrays by layer, float32 and evaluated."""

    arrays: dict[Target, tuple[mx.array, mx.array]]  # layer -> (A (in, r), B (r, out))
    scale: float
    rank: int  # the largest of its layers' ranks
    nbytes: int


def read_for_serving(path: str | Path, targets: dict[Target, tuple[int, int]], *, max_rank: int) -> ServedAdapter:
    """Read and check an mlx-lm LoRA adapter against a model's linear layers (`targets`: layer -> (in, out)).

    Bounded before anything is allocated: a weights file larger than the model's every layer at `max_rank` could
    hold, or a config over MAX_CONFIG_BYTES, is refused unread. ValueError names what does not fit: another
    fine-tune type (DoRA, full weights), a layer the model does not have, a shape or a rank over `max_rank`.
    Adapters of any rank and of any subset of the layers are accepted. The arrays are evaluated here, so the
    calling thread may end (and destroy its MLX streams) once this returns.
    """
    file, config_file = adapter_files(path)
    limit = 4 * max_rank * sum(i + o for i, o in targets.values()) + MAX_CONFIG_BYTES  # float32 A and B, + header
    size = _unpacked_size(file)
    if size > limit:
        raise ValueError(
            f"{file}: {size} bytes, more than an adapter of rank <= {max_rank} on this model can hold ({limit} bytes)"
        )
    if config_file is None:
        raise ValueError(f"{path}: no {CONFIG_NAME} beside the weights (needed for the adapter's scale)")
    if config_file.stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(f"{config_file}: larger than {MAX_CONFIG_BYTES} bytes")
    arrays, config = load_adapter(path)
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: not a JSON object")
    kind = config.get("fine_tune_type", "lora")
    if kind != "lora":
        raise ValueError(f"{path}: fine_tune_type {kind!r} cannot be served per row (only lora)")
    params = config.get("lora_parameters")
    scale = params.get("scale") if isinstance(params, dict) else None
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not np.isfinite(scale):
        raise ValueError(f"{config_file}: lora_parameters.scale is missing or not a number")
    pairs: dict[Target, dict[str, mx.array]] = {}
    for name, array in arrays.items():
        parsed = parse_name(name)
        if parsed is None:
            raise ValueError(f"{path}: {name!r} is not a LoRA array (model.layers.N.<module>.lora_a|lora_b)")
        target, leaf = parsed
        if target not in targets:
            raise ValueError(
                f"{path}: {name} targets a layer this model does not have (block {target[0]}, {target[1]!r})"
            )
        pairs.setdefault(target, {})[leaf] = array
    if not pairs:
        raise ValueError(f"{path}: no LoRA arrays")
    out: dict[Target, tuple[mx.array, mx.array]] = {}
    for target, leaves in pairs.items():
        where = f"{path}: block {target[0]} {target[1]}"
        if leaves.keys() != {"lora_a", "lora_b"}:
            raise ValueError(f"{where}: has {sorted(leaves)}, needs both lora_a and lora_b")
        a, b = leaves["lora_a"], leaves["lora_b"]
        fan_in, fan_out = targets[target]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != fan_in or b.shape[1] != fan_out or a.shape[1] != b.shape[0]:
            raise ValueError(
                f"{where}: lora_a {tuple(a.shape)} and lora_b {tuple(b.shape)} do not fit a "
                f"({fan_in} -> {fan_out}) layer (expected ({fan_in}, r) and (r, {fan_out}))"
            )
        if not 1 <= a.shape[1] <= max_rank:
            raise ValueError(f"{where}: rank {a.shape[1]} is over server.max_lora_rank = {max_rank}")
        out[target] = (a.astype(mx.float32), b.astype(mx.float32))
    mx.eval([x for pair in out.values() for x in pair])
    nbytes = sum(a.nbytes + b.nbytes for a, b in out.values())
    return ServedAdapter(out, float(scale), max(a.shape[1] for a, _ in out.values()), nbytes)


def _unpacked_size(file: Path) -> int:
    """Bytes a weights file takes once read: its size, or for an .npz (a zip, maybe compressed) the sum of its
    members' sizes as its directory declares them (zipfile never reads past a member's declared size)."""
    if file.suffix != ".npz":
        return file.stat().st_size
    try:
        with zipfile.ZipFile(file) as z:
            return sum(info.file_size for info in z.infolist())
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{file}: cannot read adapter ({e})") from None
