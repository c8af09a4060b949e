"""Exact resume: a run stopped at step k and resumed reaches the same adapter at step n as an uninterrupted run
(on the tiny 4-bit model, once per compute path: both must be deterministic)."""

import json
import os
from pathlib import Path

import numpy as np

from support import procs
from support.runs import run_cmd
from paraloop.checkpoint import read_checkpoint

REPO = Path(__file__).resolve().parents[1]


def run(model: Path, run_dir: Path, *extra: str) -> None:
    cmd = run_cmd(model, run_dir, "--no-plot", "--save-every-step", *extra)
    proc = procs.run(cmd, timeout=300, env={**os.environ, "PARALOOP_LOG": "warning"})
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_stopped_and_resumed_run_matches_uninterrupted_run(tiny_q4_model_path, compute, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ("--set", "rl_training.lora.dropout=0.1", "--compute", compute)
    run(tiny_q4_model_path, straight, "--steps", "6", *common)
    run(tiny_q4_model_path, split, "--steps", "3", *common)
    run(tiny_q4_model_path, split, "--steps", "6", *common, "--resume", str(split))

    a = read_checkpoint(straight / "checkpoints" / "step_000006")
    b = read_checkpoint(split / "checkpoints" / "step_000006")
    assert a.version == b.version == 6
    assert b.trainer_state["source_state"]["next_group"] == a.trainer_state["source_state"]["next_group"] == 6 * 4
    for name, array in a.adapter.items():
        assert np.array_equal(np.array(array), np.array(b.adapter[name])), f"{name} differs after resume"
    for name, array in a.optimizer_state.items():
        if hasattr(array, "shape"):
            assert np.array_equal(np.array(array), np.array(b.optimizer_state[name])), name


def test_run_continues_from_an_adapter_trained_by_mlx_lm_lora(tiny_model_path, tmp_path):
    from support.checkpoints import write_like_mlx_lm_lora

    from paraloop.lora import load_adapter

    write_like_mlx_lm_lora(tiny_model_path, tmp_path / "adapters")
    start, _ = load_adapter(tmp_path / "adapters")
    # temperature 1: the tiny model samples near-uniformly, so scores differ inside groups and there is a gradient
    run(
        tiny_model_path,
        tmp_path / "run",
        "--steps",
        "2",
        "--lora-path",
        str(tmp_path / "adapters"),
        "--set",
        "rl_training.temperature=1.0",
    )
    final = read_checkpoint(tmp_path / "run")
    assert final.step == 2
    assert final.adapter_config["num_layers"] == 2 and final.adapter_config["lora_parameters"]["rank"] == 8
    assert sorted(final.adapter) == sorted(start), "the same LoRA layout as the mlx-lm adapter"
    initial, _ = load_adapter(tmp_path / "run" / "checkpoints" / "initial_adapter")
    for name, array in start.items():  # the run started from the mlx-lm adapter's arrays, not a fresh init
        assert np.array_equal(np.array(initial[name]), np.array(array)), name
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["grad_norm"] > 0 and m["reward_std"] > 0 for m in metrics), metrics
    assert any(not np.array_equal(np.array(final.adapter[k]), np.array(v)) for k, v in start.items()), "it trained"
