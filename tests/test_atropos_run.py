"""End to end: `paraloop launch-atropos` runs the real run-api, a real environment (tests/scripts/atropos_env.py) and
`paraloop run` on the tiny model; paraloop trains N steps from the environment's batches and everything stops."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import procs
from support import free_port

REPO = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("PARALOOP_ATROPOS_VENV", REPO / ".venv-atropos"))
ENV_SCRIPT = Path(__file__).with_name("scripts") / "atropos_env.py"

pytestmark = [pytest.mark.atropos, pytest.mark.timeout(300)]


def write_config(tmp_path: Path, model: Path, *, steps: int) -> Path:
    config = tmp_path / "atropos.toml"
    config.write_text(f"""
[server]
host = "127.0.0.1"
port = 0                       # the launcher reads the bound port from RUN_DIR/server.json

[model]
base_path = "{model}"

[rl_training]
learning_rate = 1e-3
batch_size = 4                 # two groups of the environment's group_size 2
total_steps = {steps}
token_budget = 4096
kl_beta = 0.0

[rl_training.lora]
rank = 4
num_layers = 2

[rl_training.atropos]
api_url = "http://127.0.0.1:{free_port()}"
poll_interval = 0.2
max_backoff = 2.0
max_token_len = 512

[checkpoint]
dir = "{tmp_path / "run"}"
interval = 0
""")
    return config


@contextlib.contextmanager
def launch(config: Path) -> Iterator[tuple[subprocess.Popen, procs.Lines]]:
    """`paraloop launch-atropos` and its output. However the test ends, the launcher gets SIGTERM (it stops its
    children) and then every child it reported starting is killed with its process group."""
    argv = [
        sys.executable,
        "-m",
        "paraloop",
        "launch-atropos",
        "--config",
        str(config),
        "--env-script",
        str(ENV_SCRIPT),
        "--atropos-venv",
        str(VENV),
        "--grace",
        "10",
        "--",
        "--env.group_size",
        "2",
    ]
    proc = procs.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=config.parent)
    lines = procs.Lines(proc.stdout)
    try:
        yield proc, lines
    finally:
        procs.kill_group(proc, grace_s=20)
        procs.kill_groups(started_pids(lines.text()))


def finish(proc: subprocess.Popen, lines: procs.Lines, timeout: float) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"launch-atropos did not finish in {timeout} s:\n{lines.text()[-6000:]}") from None
    return lines.all()


def started_pids(out: str) -> list[int]:
    return [
        int(line.split("(pid ")[1].split(")")[0]) for line in out.splitlines() if line.startswith("[launch] started")
    ]


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def test_paraloop_trains_n_steps_from_a_real_environment(tiny_model_path, tmp_path):
    with launch(write_config(tmp_path, tiny_model_path, steps=2)) as (proc, lines):
        out = finish(proc, lines, timeout=240)
    assert proc.returncode == 0, out[-6000:]
    steps = [m["step"] for m in metrics(tmp_path / "run") if "step" in m]
    assert steps[-1] == 2 and len(steps) >= 2, out[-3000:]
    # The environment's scores vary within groups, so the adapter moved.
    assert any(m.get("grad_norm", 0) > 0 for m in metrics(tmp_path / "run")), out[-3000:]
    assert "registered with Atropos API" in out
    assert "[launch] paraloop exited with code 0: stopping every child" in out
    pids = started_pids(out)
    assert len(pids) == 3 and all(procs.gone_soon(pid) for pid in pids)


def test_sigterm_stops_the_launcher_and_every_child(tiny_model_path, tmp_path):
    with launch(write_config(tmp_path, tiny_model_path, steps=1000)) as (proc, lines):
        deadline = time.monotonic() + 200
        while not metrics(tmp_path / "run"):  # training from the environment has begun
            assert proc.poll() is None and time.monotonic() < deadline, lines.text()[-6000:]
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out = finish(proc, lines, timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, out[-6000:]
    pids = started_pids(out)
    assert len(pids) == 3 and all(procs.gone_soon(pid) for pid in pids)
