"""Checkpoints: one dir per learner step, written so that a crash at any moment never loses a finished one.

In: the learner's snapshot of one step (adapter arrays, the optimizer state tree, optionally the reference
adapter, and a JSON-able trainer state). Out:

    RUN_DIR/checkpoints/
        initial_adapter/   adapters.safetensors + adapter_config.json (the auto-initialised adapter)
        step_000050/       adapters.safetensors | adapter.npz, adapter_config.json  (an mlx-lm adapter dir)
                           optimizer.safetensors, reference.safetensors (optional), trainer_state.json
        latest             a one-line file naming the newest finished step dir

A checkpoint is staged in a hidden sibling dir (.tmp-step_000050-PID), every file and the dir fsynced, then
renamed into place; `latest` moves only after that. A step_* name therefore only ever names a whole
checkpoint, whatever moment the process dies at. trainer_state.json carries a manifest (size + sha256 of every
other file), which `read_checkpoint` checks, so later damage (a truncated copy, a bad disk) is reported naming
the file.

Everything here is synchronous: the checkpointer actor calls it on a worker thread. Arrays must be evaluated.
"""

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

import paraloop
from paraloop.lora import CONFIG_NAME, NPZ_NAME, SAFETENSORS_NAME, load_adapter, save_adapter

CHECKPOINTS = "checkpoints"
LATEST = "latest"
INITIAL_ADAPTER = "initial_adapter"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"
REFERENCE = "reference.safetensors"
FORMAT_VERSION = 1
ADAPTER_FORMATS = ("safetensors", "npz", "both")
STEP_DIR = re.compile(r"step_(\d+)")
STAGED = re.compile(r"\.(tmp|trash)-.+-(\d+)")  # .tmp-step_000050-1234, .trash-initial_adapter-1234
MLX_IO_ERROR = re.compile(r"unable to write|failed to open|unable to open|could not open", re.IGNORECASE)
LEAVES_KEY = "paraloop_json_leaves"  # safetensors metadata: the optimizer state's non-array leaves, as JSON
FULL_FINE_TUNE = {"fine_tune_type": "full"}  # mlx-lm's adapter_config.json for full weights
log = logging.getLogger("paraloop.checkpoint")
RESERVED = ("step", "version", "paraloop_version", "format_version", "adapter_format", "written_at", "files")


class CheckpointError(ValueError):
    """A missing, partial or damaged checkpoint; the message names the file."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    version: int
    adapter: dict[str, mx.array]
    adapter_config: dict[str, Any]
    optimizer_state: dict[str, Any] | None  # flat: tree_flatten(optimizer.state) names -> arrays and scalars
    reference: dict[str, mx.array] | None
    trainer_state: dict[str, Any]  # trainer_state.json: the caller's keys + step, version, files, ...


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def checkpoints_dir(path: str | Path) -> Path:
    """The checkpoints/ dir of a run dir, or `path` itself when it is one (has step dirs or `latest`)."""
    path = Path(path)
    if (path / CHECKPOINTS).is_dir():
        return path / CHECKPOINTS
    if (path / LATEST).is_file() or any(STEP_DIR.fullmatch(p.name) for p in _entries(path)):
        return path
    return path / CHECKPOINTS


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Step dirs by ascending step (staged .tmp-* dirs are never listed)."""
    found = []
    for entry in _entries(checkpoints_dir(run_dir)):
        match = STEP_DIR.fullmatch(entry.name)
        if match and entry.is_dir():
            found.append((int(match[1]), entry))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The step dir `latest` names; if that is missing or incomplete, the highest complete step; else None.

    Complete means trainer_state.json reads and every file of its manifest is there with its recorded size
    (hashes are checked by `read_checkpoint`).
    """
    ckdir = checkpoints_dir(run_dir)
    pointer = ckdir / LATEST
    if pointer.is_file():
        name = pointer.read_text(errors="replace").strip()
        if STEP_DIR.fullmatch(name) and _is_complete(ckdir / name):
            return ckdir / name
        log.warning("%s names %r, not a complete checkpoint: using the newest complete one", pointer, name)
    for path in reversed(list_checkpoints(ckdir)):
        if _is_complete(path):
            return path
    return None


def step_dir_of(run_dir: str | Path, name: str) -> Path | None:
    """The run's checkpoint dir `name` ("step_000040" or "initial_adapter"), if it is there."""
    if not (STEP_DIR.fullmatch(name) or name == INITIAL_ADAPTER):
        return None
    path = checkpoints_dir(run_dir) / name
    return path if path.is_dir() else None


def adapter_location(path: str | Path) -> Path:
    """`path` as given when it is an adapter file or holds adapter weights; a run dir or its checkpoints/ dir: its
    newest checkpoint, so `--adapter runs/demo` means the same to run and serve as to eval and merge."""
    given = Path(path)
    if not given.is_dir() or holds_adapter(given):
        return given
    try:
        return find_checkpoint(given)
    except CheckpointError:
        return given  # not a run either: loading it says what is missing


def holds_adapter(path: Path) -> bool:
    """An adapter file, or a dir with adapter weights in it."""
    return path.is_file() or any((path / name).is_file() for name in (SAFETENSORS_NAME, NPZ_NAME))


def find_checkpoint(path: str | Path) -> Path:
    """A step dir from a step dir, a run dir or its checkpoints/ dir (-> latest). Raises CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a run dir, its checkpoints/ dir or a step_N dir)")
    if (path / TRAINER_STATE).exists() or STEP_DIR.fullmatch(path.name):
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"{path}: no complete checkpoint found (expected a run dir, checkpoints/ or step_N)")
    return found


def verify_checkpoint(path: str | Path, *, hashes: bool = True) -> dict[str, Any]:
    """Check a step dir against its manifest; return its trainer state. CheckpointError names a bad file."""
    path = Path(path)
    state_file = path / TRAINER_STATE
    if not state_file.is_file():
        raise CheckpointError(f"{state_file}: missing (not a checkpoint, or an incomplete one)")
    try:
        state = json.loads(state_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{state_file}: unreadable ({e})") from None
    files = state.get("files") if isinstance(state, dict) else None
    if not isinstance(files, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{state_file}: no 'files' manifest or 'step' (not written by paraloop?)")
    if CONFIG_NAME not in files or not ({SAFETENSORS_NAME, NPZ_NAME} & files.keys()):
        raise CheckpointError(f"{state_file}: the manifest lists no adapter weights or {CONFIG_NAME}")
    for name, entry in files.items():
        file = path / name
        if not isinstance(entry, dict) or not {"bytes", "sha256"} <= entry.keys() or "/" in name:
            raise CheckpointError(f"{state_file}: bad manifest entry for {name!r}")
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"{file}: size {size} bytes, the manifest says {entry['bytes']} (truncated?)")
        if hashes and _sha256(file) != entry["sha256"]:
            raise CheckpointError(f"{file}: sha256 does not match the manifest (damaged)")
    return state


def read_checkpoint(path: str | Path, *, verify: bool = True) -> Checkpoint:
    """Load a checkpoint (step dir, or a run dir -> its latest). `verify` also checks every file's sha256."""
    step_dir = find_checkpoint(path)
    state = verify_checkpoint(step_dir, hashes=verify)
    try:
        adapter, config = load_adapter(step_dir)
    except (OSError, ValueError) as e:
        raise CheckpointError(str(e)) from None
    if config is None:
        raise CheckpointError(f"{step_dir / CONFIG_NAME}: missing")
    files = state["files"]
    optimizer_state = _load_flat(step_dir / OPTIMIZER) if OPTIMIZER in files else None
    reference = _load_arrays(step_dir / REFERENCE) if REFERENCE in files else None
    # mx.load is lazy: read the data now, while the files surely exist (retention may delete them later)
    mx.eval(adapter, optimizer_state or {}, reference or {})
    return Checkpoint(
        path=step_dir,
        step=state["step"],
        version=state.get("version", state["step"]),
        adapter=adapter,
        adapter_config=config,
        optimizer_state=optimizer_state,
        reference=reference,
        trainer_state=state,
    )


def write_checkpoint(
    run_dir: str | Path,
    *,
    step: int,
    version: int,
    adapter: dict[str, mx.array],
    adapter_config: dict[str, Any] | None,
    optimizer_state: dict[str, Any] | None = None,
    reference: dict[str, mx.array] | None = None,
    trainer_state: dict[str, Any] | None = None,
    adapter_format: str = "safetensors",
    keep_last: int | None = None,
) -> Path:
    """Write RUN_DIR/checkpoints/step_NNNNNN atomically, point `latest` at it, then prune to `keep_last`.

    `adapter_config` None means `adapter` holds full weights (train_mode = "full"): it is written as mlx-lm's
    {"fine_tune_type": "full"}, which `mlx_lm.load(adapter_path=...)` loads too.
    `optimizer_state` is `optimizer.state` (a tree) or its flattened dict; non-array leaves must be JSON-able.
    `trainer_state` is stored as trainer_state.json with step, version, paraloop_version, written_at and the
    file manifest added (those keys are reserved). Rewriting an existing step replaces it. Returns the step
    dir.
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if adapter_format not in ADAPTER_FORMATS:
        raise ValueError(f"adapter_format must be one of {', '.join(ADAPTER_FORMATS)}, got {adapter_format!r}")
    if not adapter:
        raise ValueError("adapter is empty")
    given = trainer_state or {}
    clash = [k for k, v in (("step", step), ("version", version)) if k in given and given[k] != v]
    clash += [k for k in RESERVED[2:] if k in given]
    if clash:
        raise ValueError(f"trainer_state keys {clash} are written by write_checkpoint (or disagree with its arguments)")
    ckdir = Path(run_dir) / CHECKPOINTS
    name = step_dir_name(step)

    def fill(tmp: Path) -> None:
        save_adapter(tmp, adapter, adapter_config or FULL_FINE_TUNE, fmt=adapter_format)
        if optimizer_state is not None:
            _save_tree(tmp / OPTIMIZER, optimizer_state)
        if reference is not None:
            mx.save_safetensors(str(tmp / REFERENCE), reference, metadata={"format": "mlx"})
        files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        state = {
            **given,
            "step": step,
            "version": version,
            "paraloop_version": paraloop.__version__,
            "format_version": FORMAT_VERSION,
            "adapter_format": adapter_format,
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": files,
        }
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2, default=_json_default) + "\n")

    path = _write_dir(ckdir, name, fill)
    _write_latest(ckdir, name)
    if keep_last is not None:
        try:
            prune(ckdir, keep_last)
        except OSError as e:  # the checkpoint is written; old ones stay until a later prune succeeds
            log.warning("could not prune old checkpoints in %s: %s", ckdir, e)
    return path


def write_initial_adapter(
    run_dir: str | Path,
    adapter: dict[str, mx.array],
    adapter_config: dict[str, Any],
    adapter_format: str = "safetensors",
) -> Path:
    """Write RUN_DIR/checkpoints/initial_adapter (an mlx-lm adapter dir) atomically; returns its path."""
    if adapter_format not in ADAPTER_FORMATS:
        raise ValueError(f"adapter_format must be one of {', '.join(ADAPTER_FORMATS)}, got {adapter_format!r}")
    ckdir = Path(run_dir) / CHECKPOINTS
    return _write_dir(
        ckdir, INITIAL_ADAPTER, lambda tmp: save_adapter(tmp, adapter, adapter_config, fmt=adapter_format)
    )


def prune(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` step dirs, never the one `latest` names. Returns the removed.

    Each victim is first renamed to a hidden .trash-* dir, so a crash mid-delete leaves no partial step dir.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    ckdir = checkpoints_dir(run_dir)
    steps = list_checkpoints(ckdir)
    latest = latest_checkpoint(ckdir)
    removed = []
    for path in steps[:-keep_last]:
        if path == latest:
            continue
        trash = ckdir / f".trash-{path.name}-{os.getpid()}"
        os.rename(path, trash)
        removed.append(path)
        shutil.rmtree(trash, ignore_errors=True)
    if removed:
        _fsync_dir(ckdir)
    return removed


# --- writing ------------------------------------------------------------------------------------------------


def _write_dir(ckdir: Path, name: str, fill: Callable[[Path], Any]) -> Path:
    """Stage `name` in a hidden sibling, let `fill(tmp)` write it, fsync everything, rename it into place."""
    ckdir.mkdir(parents=True, exist_ok=True)
    _remove_stale(ckdir)
    tmp = ckdir / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    final = ckdir / name
    try:
        try:
            fill(tmp)
        except RuntimeError as e:
            # mlx reports a failed file operation as RuntimeError ("[write] Unable to write 8 bytes to file." on a
            # full disk, "[save_safetensors] Failed to open file ..."): an OSError to the caller, like Python's.
            if not MLX_IO_ERROR.search(str(e)):
                raise
            raise OSError(f"writing {tmp}: {e}") from e
        for file in tmp.iterdir():
            _fsync_file(file)
        _fsync_dir(tmp)
        if final.exists():  # rewriting a step: rename cannot replace a non-empty dir, move the old aside
            trash = ckdir / f".trash-{name}-{os.getpid()}"
            shutil.rmtree(trash, ignore_errors=True)
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(ckdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _write_latest(ckdir: Path, name: str) -> None:
    tmp = ckdir / f".tmp-latest-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(name + "\n")
            f.flush()
            _fsync(f.fileno())
        os.replace(tmp, ckdir / LATEST)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(ckdir)


def _remove_stale(ckdir: Path) -> None:
    """Remove .tmp-* / .trash-* left by processes that died mid-write (their pid is in the name)."""
    for entry in _entries(ckdir):
        match = STAGED.fullmatch(entry.name)
        if not match or pid_alive(int(match[2])):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours from an earlier failed write (a failed write removes its own, but be sure)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync(fd: int) -> None:
    if sys.platform == "darwin":  # fsync on macOS does not flush the drive's cache; F_FULLFSYNC does
        import fcntl

        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            return
    os.fsync(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        _fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        _fsync(fd)
    finally:
        os.close(fd)


def _save_tree(path: Path, tree: dict[str, Any]) -> None:
    """A tree of arrays and scalars as one safetensors file; non-array leaves go to its metadata as JSON."""
    arrays, leaves = {}, {}
    for key, value in tree_flatten(tree):
        if isinstance(value, mx.array):
            arrays[key] = value
        elif isinstance(value, np.ndarray):
            arrays[key] = mx.array(value)
        else:
            try:
                json.dumps(value, allow_nan=True)
            except TypeError:
                raise ValueError(
                    f"optimizer_state[{key!r}]: {type(value).__name__} is neither an array nor JSON-able"
                ) from None
            leaves[key] = value
    mx.save_safetensors(str(path), arrays, metadata={"format": "mlx", LEAVES_KEY: json.dumps(leaves)})


def _json_default(value: Any) -> Any:
    """trainer_state values that json cannot encode by itself: arrays, NumPy scalars, paths."""
    if isinstance(value, mx.array):
        return value.tolist()
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"trainer_state value of type {type(value).__name__} is not JSON-able")


# --- reading ------------------------------------------------------------------------------------------------


def _entries(path: Path) -> list[Path]:
    try:
        return list(path.iterdir())
    except OSError:
        return []


def _is_complete(path: Path) -> bool:
    try:
        verify_checkpoint(path, hashes=False)
    except CheckpointError:
        return False
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _load_arrays(path: Path) -> dict[str, mx.array]:
    try:
        return mx.load(str(path))
    except Exception as e:  # mlx raises RuntimeError/ValueError for truncated or foreign files
        raise CheckpointError(f"{path}: unreadable safetensors ({e})") from None


def _load_flat(path: Path) -> dict[str, Any]:
    """The optimizer state as written: flat names -> arrays, plus the JSON leaves (restore: tree_unflatten)."""
    try:
        arrays, metadata = mx.load(str(path), return_metadata=True)
        leaves = json.loads(metadata.get(LEAVES_KEY, "{}"))
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    return {**arrays, **leaves}
