"""`paraloop run` as a subprocess on the tiny config, its control API and its metrics: what the run, eval, resume,
fault and distributed tests share."""

import contextlib
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from support import procs

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "tiny.toml"


def run_args(model: Path, run_dir: Path, *extra: str, config: Path = TINY_CONFIG) -> list[str]:
    """`paraloop run`'s arguments for a test run: `config` (the tiny one) on `model`, in `run_dir`, any free port."""
    return [str(config), "--model-path", str(model), "--run-dir", str(run_dir), "--port", "0", *extra]


def run_cmd(model: Path, run_dir: Path, *extra: str, config: Path = TINY_CONFIG) -> list[str]:
    return [sys.executable, "-m", "paraloop", "run", *run_args(model, run_dir, *extra, config=config)]


RUN_ENV = {**os.environ, "PARALOOP_LOG": "warning", "PYTHONUNBUFFERED": "1"}


@contextlib.contextmanager
def paraloop_run(model: Path, run_dir: Path, *extra: str) -> Iterator[subprocess.Popen]:
    """`paraloop run` in its own process group, killed with everything it started when the block is left."""
    with procs.running(
        run_cmd(model, run_dir, *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=RUN_ENV
    ) as proc:
        yield proc


def run_to_end(
    model: Path, run_dir: Path, *extra: str, timeout: float = 180, log: str = "warning"
) -> subprocess.CompletedProcess:
    return procs.run(run_cmd(model, run_dir, *extra), timeout=timeout, env={**RUN_ENV, "PARALOOP_LOG": log})


def call(url: str, method: str = "GET", body: dict | None = None, token: str | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        procs.kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError(f"paraloop run did not finish in {timeout}s: {err[-3000:]}") from None
    return proc.returncode, out, err


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
