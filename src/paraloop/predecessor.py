"""The predecessor's (mlx_parallm's) adapters and checkpoints, read as paraloop reads its own.

Its trainer saved each checkpoint as CHECKPOINT_DIR/step_N/adapter.npz: LoRA arrays under mlx-lm's names and
nothing else (no adapter_config.json, no optimizer or trainer state); later versions added adapters.safetensors, an
adapter.json of hyperparameters, CHECKPOINT_DIR/metadata.json and CHECKPOINT_DIR/initial_adapter/ with an
adapter_config.json. In: such a folder. Out: the LoRA layout of arrays that came without a config (rank, keys and
blocks from the arrays, scale and dropout from the run's own adapter_config.json if one is next to it, else from
rl_training.lora, and the log says which), and a Checkpoint to resume from: its step number, its adapter, no
optimizer state (the caller starts a fresh one and says so).
"""

import json
import logging
import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from paraloop.checkpoint import (
    INITIAL_ADAPTER,
    OPTIMIZER,
    STEP_DIR,
    TRAINER_STATE,
    Checkpoint,
    CheckpointError,
    adapter_location,
    find_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    read_checkpoint,
)
from paraloop.config import LoraConfig
from paraloop.lora import CONFIG_NAME, NPZ_NAME, SAFETENSORS_NAME, load_adapter, load_into

METADATA = "metadata.json"  # CHECKPOINT_DIR/metadata.json: step, created_at, config, adapter_path
STEP_METADATA = "adapter.json"  # step_N/adapter.json: step and the hyperparameters of the run
LORA_NAME = re.compile(r"(?:.*\.)?layers\.(\d+)\.(.+)\.lora_[ab]")
log = logging.getLogger("paraloop.predecessor")


def is_predecessor_step(path: str | Path) -> bool:
    """A step_N dir (N without leading zeros) holding adapter weights and none of the files paraloop writes into
    every step dir (trainer_state.json, optimizer.safetensors): a damaged paraloop checkpoint is never taken for one."""
    path = Path(path)
    match = STEP_DIR.fullmatch(path.name)
    return (
        path.is_dir()
        and match is not None
        and not match[1].startswith("0")
        and not (path / TRAINER_STATE).exists()
        and not (path / OPTIMIZER).exists()
        and ((path / NPZ_NAME).is_file() or (path / SAFETENSORS_NAME).is_file())
    )


def find_predecessor_step(path: str | Path) -> Path | None:
    """`path` if it is a predecessor step dir; else, when `path` holds no paraloop checkpoint, its highest-numbered
    predecessor step dir (in `path` or `path`/checkpoints); else None."""
    path = Path(path)
    if is_predecessor_step(path):
        return path
    if not path.is_dir() or (path / TRAINER_STATE).exists() or latest_checkpoint(path) is not None:
        return None
    steps = [p for p in list_checkpoints(path) if is_predecessor_step(p)]
    return steps[-1] if steps else None


def read_for_resume(path: str | Path) -> Checkpoint:
    """The checkpoint `--resume PATH` names: paraloop's (find_checkpoint), or else the predecessor's step dir, whose
    Checkpoint has no optimizer state and trainer_state {"step", "version", "predecessor": True}."""
    older = find_predecessor_step(path)
    if older is None:
        return read_checkpoint(find_checkpoint(path))
    try:
        arrays, config = load_adapter(older)
    except (OSError, ValueError) as e:
        raise CheckpointError(str(e)) from None
    step = int(STEP_DIR.fullmatch(older.name)[1])
    return Checkpoint(
        path=older,
        step=step,
        version=step,
        adapter={k: v.astype(mx.float32) for k, v in arrays.items()},
        adapter_config=config or {},  # {}: the caller asks assumed_adapter_config once the model is loaded
        optimizer_state=None,
        reference=None,
        trainer_state={"step": step, "version": step, "predecessor": True},
    )


def assumed_adapter_config(
    source: str | Path,
    arrays: dict[str, mx.array],
    model: nn.Module,
    lora: LoraConfig,
    *,
    origin: str = "rl_training.lora",
    use_sibling: bool = True,
) -> dict[str, Any]:
    """mlx-lm's adapter_config for LoRA arrays found without one. The layout (rank, keys, how many of the last blocks)
    comes from the arrays; scale and dropout, which arrays cannot tell, from the run's initial_adapter/
    adapter_config.json next to `source` when its layout matches and `use_sibling` (the predecessor wrote one
    there), else from `lora` (`origin` names it in the log). Logs what it assumed. Raises ValueError when the
    arrays are no LoRA layout mlx-lm can express."""
    layout = lora_layout(arrays, num_blocks=len(model.layers))
    sibling = _sibling_config(Path(source)) if use_sibling else None
    if sibling is not None and _layout_of(sibling, len(model.layers)) == layout:
        params = sibling["lora_parameters"]
        scale, dropout, origin = params.get("scale", lora.effective_scale), params.get("dropout", 0.0), sibling["_path"]
    else:
        scale, dropout = lora.effective_scale, lora.dropout
    rank, num_layers, keys = layout
    log.warning(
        "%s has no %s (a predecessor adapter): LoRA rank %d on %s of the last %d blocks, read from its arrays; "
        "scale %g and dropout %g taken from %s",
        source,
        CONFIG_NAME,
        rank,
        ", ".join(keys),
        num_layers,
        scale,
        dropout,
        origin,
    )
    return {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": dropout, "keys": list(keys)},
    }


def apply_adapter_assuming(model: nn.Module, path: str | Path, *, assume: LoraConfig, seed: int = 0) -> dict[str, Any]:
    """`lora.apply_adapter` that also takes the predecessor's adapters: one without adapter_config.json gets its
    layout from its arrays and its scale and dropout from `assume` (`assumed_adapter_config`; the choice is logged).
    Returns the config. A run dir means its newest checkpoint (`checkpoint.adapter_location`)."""
    path = adapter_location(path)
    arrays, config = load_adapter(path)
    if config is None:
        config = assumed_adapter_config(path, arrays, model, assume)
    load_into(model, arrays, config, seed=seed, source=path)
    return config


def lora_layout(arrays: dict[str, Any], *, num_blocks: int | None = None) -> tuple[int, int, tuple[str, ...]]:
    """(rank, num_layers, keys) of LoRA arrays named as mlx-lm names them. num_layers counts from the first adapted
    block to the last block of the model (`num_blocks`; None: to the last adapted block)."""
    blocks: dict[int, set[str]] = {}
    ranks = set()
    for name, value in arrays.items():
        match = LORA_NAME.fullmatch(name)
        if match is None:
            raise ValueError(f"{name!r} is not a LoRA array (expected ...layers.N.<module>.lora_a / lora_b)")
        blocks.setdefault(int(match[1]), set()).add(match[2])
        if name.endswith("lora_a"):
            ranks.add(int(value.shape[-1]))  # lora_a: (input dims, rank)
    if not blocks or len(ranks) != 1:
        raise ValueError(f"no consistent LoRA rank in the adapter arrays (found ranks {sorted(ranks)})")
    first, last = min(blocks), max(blocks)
    end = last + 1 if num_blocks is None else num_blocks
    keys = blocks[last]
    if last >= end or set(blocks) != set(range(first, end)) or any(k != keys for k in blocks.values()):
        raise ValueError(
            f"the adapter's LoRA layers (blocks {sorted(blocks)}) are not the same modules on each of the last blocks "
            f"of a {end}-block model, which is the only layout mlx-lm's adapter_config.json can describe"
        )
    return ranks.pop(), end - first, tuple(sorted(keys))


def describe(step_dir: Path) -> list[str]:
    """What `paraloop show-checkpoint` prints about a predecessor step dir, one "key: value" line each."""
    step = int(STEP_DIR.fullmatch(step_dir.name)[1])
    lines = [f"step: {step} (from its name; the predecessor's checkpoint: adapter only)"]
    try:
        arrays, config = load_adapter(step_dir)
    except (OSError, ValueError) as e:
        raise CheckpointError(str(e)) from None
    blocks = sorted({int(m[1]) for m in map(LORA_NAME.fullmatch, arrays) if m})
    try:
        rank, _, keys = lora_layout(arrays)
        lines.append(f"lora: rank {rank} on {', '.join(keys)} of blocks {blocks[0]}-{blocks[-1]} (from its arrays)")
    except ValueError as e:
        lines.append(f"lora: {e}")
    sibling = _sibling_config(step_dir)
    if config is not None:
        lines.append(f"scale: {config.get('lora_parameters', {}).get('scale')} (its {CONFIG_NAME})")
    elif sibling is not None:
        lines.append(f"scale: {sibling['lora_parameters'].get('scale')} ({sibling['_path']})")
    else:
        lines.append(
            "scale: not recorded (run, serve: rl_training.lora.scale, default 10; merge: --lora-scale, "
            "default 10, the predecessor's)"
        )
    lines.append(f"optimizer state: none (--resume starts at step {step} with a fresh optimizer)")
    for file, metadata in read_metadata(step_dir).items():
        shown = {k: v for k, v in metadata.items() if not isinstance(v, (dict, list))}
        lines.append(f"{Path(file).name}: " + " ".join(f"{k}={v}" for k, v in shown.items()))
        base = (metadata.get("config") or {}).get("model_path") if isinstance(metadata.get("config"), dict) else None
        base = base or metadata.get("model")
        if isinstance(base, str) and base:
            lines.append(f"base model: {base}")
    return lines


def read_metadata(step_dir: Path) -> dict[str, Any]:
    """The predecessor's metadata of a step: step_N/adapter.json and CHECKPOINT_DIR/metadata.json, when readable."""
    found = {}
    for file in (step_dir / STEP_METADATA, step_dir.parent / METADATA):
        try:
            value = json.loads(file.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(value, dict):
            found[str(file)] = value
    return found


def _sibling_config(source: Path) -> dict[str, Any] | None:
    """CHECKPOINT_DIR/initial_adapter/adapter_config.json next to a step dir (or a file in one), if it reads."""
    step_dir = source if source.is_dir() else source.parent
    file = step_dir.parent / INITIAL_ADAPTER / CONFIG_NAME
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(config, dict) and isinstance(config.get("lora_parameters"), dict):
        return {**config, "_path": str(file)}
    return None


def _layout_of(config: dict[str, Any], num_blocks: int) -> tuple[int, int, tuple[str, ...]] | None:
    """(rank, blocks adapted, keys) of an adapter_config; mlx-lm adapts every block for num_layers <= 0 or too many."""
    params = config["lora_parameters"]
    try:
        num_layers = int(config["num_layers"])
        num_layers = num_blocks if num_layers <= 0 or num_layers > num_blocks else num_layers
        return int(params["rank"]), num_layers, tuple(sorted(params["keys"]))
    except (KeyError, TypeError, ValueError):
        return None
