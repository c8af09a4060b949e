"""Checkpoint layout, exact round trip, exact optimizer resume, retention, clear errors on damaged ones."""

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from support import procs

import paraloop  # noqa: F401  (OpenBLAS before mlx)
from paraloop.checkpoint import (
    CheckpointError,
    find_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    prune,
    read_checkpoint,
    write_checkpoint,
    write_initial_adapter,
)

CONFIG = {
    "fine_tune_type": "lora",
    "num_layers": 2,
    "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.q_proj"]},
}


def make_adapter(seed: int = 0) -> dict[str, mx.array]:
    rng = np.random.default_rng(seed)
    arrays = {}
    for layer in (2, 3):
        prefix = f"model.layers.{layer}.self_attn.q_proj"
        arrays[f"{prefix}.lora_a"] = mx.array(rng.standard_normal((64, 4)).astype(np.float32))
        arrays[f"{prefix}.lora_b"] = mx.array(rng.standard_normal((4, 64)).astype(np.float32))
    return arrays


def write(run: Path, step: int, **kwargs) -> Path:
    kwargs.setdefault("version", step)
    kwargs.setdefault("adapter", make_adapter(step))
    kwargs.setdefault("adapter_config", CONFIG)
    return write_checkpoint(run, step=step, **kwargs)


def assert_same_arrays(a: dict[str, mx.array], b: dict[str, mx.array]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]).item(), k


def test_a_checkpoint_has_the_documented_layout_and_reads_back_exactly(tmp_path):
    adapter, reference = make_adapter(1), make_adapter(2)
    optimizer_state = {
        "step": mx.array(7, mx.uint64),
        "learning_rate": mx.array(1e-4),
        "model": {"layers": [{}, {}, {"q": {"m": mx.ones((3,)), "v": mx.zeros((3,), mx.bfloat16)}}]},
        "note": "adamw",
        "warm": True,
    }
    trainer_state = {
        "metrics": {"loss": 0.25, "reward_mean": 0.5},
        "atropos_step": 12,
        "config": {"lr": 1e-4},
        "rng": {"seed": 3, "key": mx.array([1, 2], mx.uint32)},
    }
    path = write(
        tmp_path,
        7,
        version=9,
        adapter=adapter,
        reference=reference,
        optimizer_state=optimizer_state,
        trainer_state=trainer_state,
    )

    assert path == tmp_path / "checkpoints" / "step_000007"
    assert sorted(p.name for p in path.iterdir()) == [
        "adapter_config.json",
        "adapters.safetensors",
        "optimizer.safetensors",
        "reference.safetensors",
        "trainer_state.json",
    ]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000007"
    ckpt = read_checkpoint(tmp_path)
    assert (ckpt.path, ckpt.step, ckpt.version) == (path, 7, 9)
    assert ckpt.adapter_config == CONFIG
    assert_same_arrays(ckpt.adapter, adapter)
    assert_same_arrays(ckpt.reference, reference)
    flat = dict(ckpt.optimizer_state)  # flattened, as tree_flatten names it
    assert (flat.pop("note"), flat.pop("warm")) == ("adamw", True)
    assert_same_arrays(flat, {k: v for k, v in tree_flatten(optimizer_state) if isinstance(v, mx.array)})
    tree = tree_unflatten(list(ckpt.optimizer_state.items()))
    assert tree["model"]["layers"][:2] == [{}, {}] and tree["note"] == "adamw"
    state = ckpt.trainer_state
    assert state["metrics"] == {"loss": 0.25, "reward_mean": 0.5}
    assert (state["atropos_step"], state["rng"]["key"], state["paraloop_version"]) == (
        12,
        [1, 2],
        paraloop.__version__,
    )
    assert set(state["files"]) == {
        "adapter_config.json",
        "adapters.safetensors",
        "optimizer.safetensors",
        "reference.safetensors",
    }
    assert state["files"]["adapters.safetensors"]["bytes"] == (path / "adapters.safetensors").stat().st_size


@pytest.mark.parametrize(
    ("fmt", "files"),
    [
        ("safetensors", {"adapters.safetensors"}),
        ("npz", {"adapter.npz"}),
        ("both", {"adapters.safetensors", "adapter.npz"}),
    ],
)
def test_adapter_format_chooses_the_adapter_files_and_each_reads_back(tmp_path, fmt, files):
    path = write(tmp_path, 1, adapter_format=fmt)
    assert {p.name for p in path.iterdir()} == files | {"adapter_config.json", "trainer_state.json"}
    assert_same_arrays(read_checkpoint(path).adapter, make_adapter(1))


def test_initial_adapter_is_an_adapter_dir_beside_the_steps_and_not_a_step(tmp_path):
    path = write_initial_adapter(tmp_path, make_adapter(0), CONFIG, "both")
    assert path == tmp_path / "checkpoints" / "initial_adapter"
    assert {p.name for p in path.iterdir()} == {"adapters.safetensors", "adapter.npz", "adapter_config.json"}
    assert latest_checkpoint(tmp_path) is None
    assert list_checkpoints(tmp_path) == []


def test_find_checkpoint_accepts_a_run_dir_its_checkpoints_dir_or_a_step_dir(tmp_path):
    write(tmp_path, 1)
    second = write(tmp_path, 2)
    assert find_checkpoint(tmp_path) == second
    assert find_checkpoint(tmp_path / "checkpoints") == second
    assert find_checkpoint(tmp_path / "checkpoints" / "step_000001") == tmp_path / "checkpoints" / "step_000001"
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        find_checkpoint(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no such file"):
        find_checkpoint(tmp_path / "absent")


def test_latest_ignores_staged_dirs_and_falls_back_when_the_pointer_is_missing_or_broken(tmp_path):
    write(tmp_path, 1)
    write(tmp_path, 2)
    ckdir = tmp_path / "checkpoints"
    (ckdir / ".tmp-step_000003-999999").mkdir()  # a writer died here
    assert latest_checkpoint(tmp_path) == ckdir / "step_000002"
    (ckdir / "latest").write_text("step_000009\n")  # names nothing
    assert latest_checkpoint(tmp_path) == ckdir / "step_000002"
    (ckdir / "latest").unlink()
    (ckdir / "step_000002" / "optimizer.safetensors").write_bytes(b"x")  # not in its manifest: harmless
    (ckdir / "step_000002" / "adapters.safetensors").unlink()
    assert latest_checkpoint(tmp_path) == ckdir / "step_000001"


def test_latest_follows_the_pointer_not_the_highest_step(tmp_path):
    write(tmp_path, 30)
    write(tmp_path, 10)  # e.g. resumed from an older checkpoint
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_000010"


def test_rewriting_a_step_replaces_it(tmp_path):
    write(tmp_path, 5, adapter=make_adapter(1))
    write(tmp_path, 5, adapter=make_adapter(2))
    assert_same_arrays(read_checkpoint(tmp_path).adapter, make_adapter(2))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")] == []


def test_a_dead_writers_staged_dirs_are_removed_by_the_next_write(tmp_path):
    dead = procs.run([sys.executable, "-c", "import os; print(os.getpid())"], timeout=60)
    pid = int(dead.stdout)
    ckdir = tmp_path / "checkpoints"
    ckdir.mkdir()
    (ckdir / f".tmp-step_000004-{pid}").mkdir()
    (ckdir / f".trash-step_000001-{pid}").mkdir()
    (ckdir / f".tmp-latest-{pid}").write_text("step_000004\n")
    write(tmp_path, 5)
    assert sorted(p.name for p in ckdir.iterdir()) == ["latest", "step_000005"]


def test_retention_keeps_the_newest_n_steps_and_always_the_latest(tmp_path):
    for step in (10, 20, 30, 40):
        write(tmp_path, step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000030", "step_000040"]
    # a run resumed from an older step: `latest` now names a step that is not among the newest
    write(tmp_path, 15)
    removed = prune(tmp_path, 1)
    assert [p.name for p in removed] == ["step_000030"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000015", "step_000040"]
    assert latest_checkpoint(tmp_path).name == "step_000015"


def test_trainer_state_may_not_contradict_the_arguments(tmp_path):
    with pytest.raises(ValueError, match="step"):
        write(tmp_path, 3, trainer_state={"step": 4})
    with pytest.raises(ValueError, match="files"):
        write(tmp_path, 3, trainer_state={"files": {}})
    write(tmp_path, 3, trainer_state={"step": 3, "version": 3})
    with pytest.raises(ValueError, match="adapter_format"):
        write(tmp_path, 4, adapter_format="pt")
    with pytest.raises(ValueError, match="optimizer_state.*'model.fn'"):
        write(tmp_path, 4, optimizer_state={"model": {"fn": print}})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000003"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")] == []


def damage_missing(path: Path) -> str:
    (path / "optimizer.safetensors").unlink()
    return "optimizer.safetensors: missing"


def damage_truncated(path: Path) -> str:
    data = (path / "adapters.safetensors").read_bytes()
    (path / "adapters.safetensors").write_bytes(data[: len(data) // 2])
    return "adapters.safetensors: size"


def damage_flipped(path: Path) -> str:
    data = bytearray((path / "reference.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "reference.safetensors").write_bytes(bytes(data))
    return "reference.safetensors: sha256"


def damage_json(path: Path) -> str:
    (path / "trainer_state.json").write_text('{"step": 1, "files": ')
    return "trainer_state.json: unreadable"


def damage_state_missing(path: Path) -> str:
    (path / "trainer_state.json").unlink()
    return "trainer_state.json: missing"


@pytest.mark.parametrize(
    "damage", [damage_missing, damage_truncated, damage_flipped, damage_json, damage_state_missing]
)
def test_a_damaged_checkpoint_raises_an_error_naming_the_file(tmp_path, damage):
    path = write(tmp_path, 1, optimizer_state={"step": mx.array(1)}, reference=make_adapter(3))
    expected = damage(path)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    assert expected in str(info.value)
    assert str(path) in str(info.value)


def test_unreadable_safetensors_with_the_right_size_is_named_when_hashes_are_skipped(tmp_path):
    path = write(tmp_path, 1, optimizer_state={"step": mx.array(1), "m": mx.ones((100,))})
    size = (path / "optimizer.safetensors").stat().st_size
    (path / "optimizer.safetensors").write_bytes(b"\xff" * size)
    with pytest.raises(CheckpointError, match="optimizer.safetensors: unreadable"):
        read_checkpoint(path, verify=False)
    with pytest.raises(CheckpointError, match="optimizer.safetensors: sha256"):
        read_checkpoint(path)


def test_a_worker_thread_can_write_a_checkpoint(tmp_path):
    with ThreadPoolExecutor(max_workers=1) as pool:  # the checkpointer actor calls in from a worker thread
        path = pool.submit(write, tmp_path, 1, optimizer_state={"step": mx.array(1)}).result()
    assert read_checkpoint(path).step == 1


class Net(nn.Module):
    """A stand-in for a LoRA model: a list of layers, the first frozen (its optimizer state is {})."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = [nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 1)]
        self.layers[0].freeze()

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = nn.relu(layer(x))
        return self.layers[-1](x)


def make_optimizer() -> optim.Optimizer:
    return optim.AdamW(learning_rate=optim.cosine_decay(1e-2, 10), weight_decay=0.01)


def train(model: Net, optimizer: optim.Optimizer, steps: int) -> None:
    loss_and_grad = nn.value_and_grad(model, lambda m, x, y: ((m(x) - y) ** 2).mean())
    for i in range(steps):
        x = mx.random.normal((16, 8), key=mx.random.key(i))
        _, grads = loss_and_grad(model, x, x.sum(axis=1, keepdims=True))
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)


def test_resuming_from_a_checkpoint_continues_bit_exactly(tmp_path):
    mx.random.seed(0)
    model, optimizer = Net(), make_optimizer()
    initial = dict(tree_flatten(model.parameters()))
    train(model, optimizer, 3)
    write(tmp_path, 3, adapter=dict(tree_flatten(model.trainable_parameters())), optimizer_state=optimizer.state)
    train(model, optimizer, 2)

    resumed = Net()
    resumed.load_weights(list(initial.items()))
    ckpt = read_checkpoint(tmp_path)
    resumed.load_weights(list(ckpt.adapter.items()), strict=False)
    optimizer2 = make_optimizer()
    optimizer2.state = tree_unflatten(list(ckpt.optimizer_state.items()))
    train(resumed, optimizer2, 2)
    assert optimizer2.state["step"].item() == 5
    assert_same_arrays(dict(tree_flatten(resumed.parameters())), dict(tree_flatten(model.parameters())))


def test_the_manifest_is_json_with_a_size_and_sha256_per_file(tmp_path):
    path = write(tmp_path, 2)
    files = json.loads((path / "trainer_state.json").read_text())["files"]
    assert set(files) == {"adapters.safetensors", "adapter_config.json"}
    assert all(len(entry["sha256"]) == 64 and entry["bytes"] > 0 for entry in files.values())
