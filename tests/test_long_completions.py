"""Long completions end to end: `paraloop run` generates 2048-token completions, trains on them within a memory
target (one row per micro-batch, blocks checkpointed, the LM head chunked), and a run resumed from its step-1
checkpoint reaches the same adapter at step 2 as the uninterrupted run."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from support import procs
from support.runs import run_cmd

from paraloop.checkpoint import read_checkpoint

REPO = Path(__file__).resolve().parents[1]
COMPLETION = 2048
SETTINGS = [
    "rl_training.batch_size=2",
    "rl_training.mock.group_size=2",
    f"rl_training.max_tokens={COMPLETION}",
    "rl_training.mock.ignore_eos=true",
    f"engine.max_tokens_limit={COMPLETION}",
    "rl_training.lora.dropout=0.1",
    "rl_training.max_memory_gb=0.4",  # each 2k-token row fits alone, two together do not
]


def run(model: Path, run_dir: Path, *extra: str, timeout: float = 240) -> None:
    """`paraloop run` in its own process group, killed with everything it started on failure or timeout."""
    sets = [arg for s in SETTINGS for arg in ("--set", s)]
    cmd = run_cmd(model, run_dir, "--no-plot", "--save-every-step", *sets, *extra)
    with procs.running(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PARALOOP_LOG": "warning"}
    ) as proc:
        out, _ = procs.communicate(proc, timeout=timeout)
    assert proc.returncode == 0, out[-3000:]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


@pytest.mark.slow
def test_2k_token_completions_train_and_resume_exactly(tiny_model_path, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(tiny_model_path, straight, "--steps", "2")
    first = metrics(straight)[0]
    assert first["tokens"] >= 2 * COMPLETION and first["trained_tokens"] == 2 * COMPLETION
    assert first["micro_batches"] == 2 and first["checkpointed_micro_batches"] == 2
    assert 0 < first["peak_memory_gb"] <= first["memory_target_gb"] == pytest.approx(0.4)

    run(tiny_model_path, resumed, "--steps", "2", "--resume", str(straight / "checkpoints" / "step_000001"))
    a = read_checkpoint(straight / "checkpoints" / "step_000002")
    b = read_checkpoint(resumed / "checkpoints" / "step_000002")
    assert a.version == b.version == 2
    assert metrics(resumed)[-1]["trained_tokens"] == 2 * COMPLETION
    for name, array in a.adapter.items():
        assert np.array_equal(np.array(array), np.array(b.adapter[name])), f"{name} differs after resume"
