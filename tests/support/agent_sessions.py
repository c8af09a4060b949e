"""`paraloop run` in sessions mode (rl_training.source = "sessions") on the tiny model, and an agent's side of the
session protocol over plain HTTP: tagged turns and rewards (docs/agents.md)."""

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from support import procs, served_port
from support.runs import call

REPO = Path(__file__).resolve().parents[2]
HOOKED = REPO / "tests" / "scripts" / "hooked_run.py"  # PARALOOP_TEST_TRAINED_LOG: which groups each step trained


def sessions_config(
    directory: Path, model: Path, *, steps: int, batch_size: int = 4, group_size: int = 2, extra: str = ""
) -> Path:
    """A sessions-mode run on the tiny model: `batch_size` sequences per step, groups of `group_size` sessions."""
    config = directory / "sessions.toml"
    config.write_text(f"""
[model]
base_path = "{model}"
[engine]
max_prompt_tokens = 256
max_tokens_limit = 16
[rl_training]
source = "sessions"
learning_rate = 3e-3
batch_size = {batch_size}
total_steps = {steps}
kl_beta = 0.0
max_staleness = 8
[rl_training.lora]
rank = 4
num_layers = 2
[rl_training.sessions]
group_size = {group_size}
{extra}
""")
    return config


@contextlib.contextmanager
def sessions_run(
    config: Path, run_dir: Path, *extra: str, env: dict[str, str] | None = None, log: str = "run.log"
) -> Iterator[tuple[subprocess.Popen, str, Path]]:
    """The run in its own process group (killed with everything it started when the block is left): (process, base
    URL once it serves, its log file)."""
    log_path = run_dir.parent / log
    cmd = [sys.executable, str(HOOKED), str(config), "--run-dir", str(run_dir), "--port", "0", "--no-plot", *extra]
    full_env = {**os.environ, "PARALOOP_LOG": "info", "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("w") as out, procs.running(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env) as proc:
        port = served_port(proc, run_dir, log=log_path)
        yield proc, f"http://127.0.0.1:{port}", log_path


def turn(base: str, session: str, prompt: list[int], *, max_tokens: int = 4) -> list[int]:
    """One tagged /v1/completions turn on token ids; the completion's ids."""
    code, body = call(
        f"{base}/v1/completions",
        "POST",
        {"prompt": prompt, "max_tokens": max_tokens, "metadata": {"paraloop_session": session}},
    )
    assert code == 200, body
    return body["choices"][0]["token_ids"]


def play(base: str, session: str, tag: int, *, turns: int = 2) -> None:
    """A session of `turns` turns, each prompt extending the last (the environment adds two tokens); its first
    token is `tag`, which the hooked run logs for each trained group."""
    prompt = [tag, 5, 6]
    for _ in range(turns):
        prompt = prompt + turn(base, session, prompt) + [7, 8]


def reward(base: str, session: str, value: float, group: str) -> dict:
    code, body = call(f"{base}/v1/sessions/{session}/reward", "POST", {"reward": value, "group": group})
    assert code == 200, body
    return body


def play_group(base: str, tag: int, size: int) -> None:
    """`size` sessions of one group (key "g<tag>"), rewarded 0, 1, 0, ... (a group with signal)."""
    for i in range(size):
        play(base, f"t{tag}-{i}", tag)
    for i in range(size):
        reward(base, f"t{tag}-{i}", float(i % 2), f"g{tag}")


def status(base: str) -> dict:
    code, body = call(f"{base}/control/status")
    assert code == 200, body
    return body


def wait(predicate, what: str, proc: subprocess.Popen, log: Path, *, within: float = 120.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) waiting for {what}: {log.read_text()[-3000:]}")
        assert time.monotonic() < deadline, f"gave up waiting for {what}: {log.read_text()[-3000:]}"
        time.sleep(0.05)


def trained(log: Path) -> list[dict]:
    """The hooked run's lines: {"pid", "step", "tags"} per step."""
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
