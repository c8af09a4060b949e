"""`paraloop tinker` as a child process for the tests that drive it over HTTP (test_tinker_sdk.py,
test_tinker_fuzz.py): its own process group, killed on the way out however the block is left."""

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from support import procs

KEY = "tml-test-token"  # the server's control token is the key (the SDK wants keys that start with tml-)
SDK_SETS = ("tinker.max_num_samples=16", "tinker.max_data=64", "tinker.max_clients=32")


@dataclass
class Server:
    url: str
    model: str
    state_dir: Path
    log: procs.Lines  # its stderr, every line


@contextlib.contextmanager
def serving(
    model: Path, state_dir: Path, *, sets: Sequence[str] = SDK_SETS
) -> Iterator[tuple[Server, subprocess.Popen]]:
    """`paraloop tinker` on `model` with --control-token KEY and `--set` each of `sets` (tinker.state_dir is
    `state_dir`), once it serves."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src"), "PARALOOP_LOG": "info"}
    cmd = [sys.executable, "-m", "paraloop", "tinker", "--model-path", str(model), "--port", "0"]
    for item in (f"tinker.state_dir={state_dir}", *sets):
        cmd += ["--set", item]
    cmd += ["--control-token", KEY]
    with procs.running(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env) as proc:
        lines = procs.Lines(proc.stderr)
        port = lines.expect(r"Tinker API for .* on http://127\.0\.0\.1:(\d+)", timeout=120)[1]
        yield Server(f"http://127.0.0.1:{port}", str(model), state_dir, lines), proc
