"""Faults a run left alone overnight meets, each on a real `paraloop run` process (the tiny model), which the test
owns with its whole process group (killed if the test fails or times out):

- SIGINT: the step in flight finishes, a final checkpoint is written, exit 0;
- a second SIGINT while a step runs: exit 130 at once, without waiting for the step;
- a learner thread that never returns, with stall_timeout: /health says 503 naming the learner, then exit 3;
- kill -9 between fetching Atropos batches and the checkpoint of their step, then --resume: every fetched group
  is trained exactly once in the resumed run's lineage (the journal);
- the Atropos API down at start (the run serves and waits), then stopped and restarted mid-run (it registers
  again and training goes on).
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from support import procs
import pytest
from support import free_port, wait_for_server
from support.run_api import run_api
from support.runs import TINY_CONFIG, call, read_metrics, run_args

from paraloop.checkpoint import latest_checkpoint, list_checkpoints, read_checkpoint

REPO = Path(__file__).resolve().parents[1]
HOOKED = Path(__file__).with_name("scripts") / "hooked_run.py"
needs_run_api = pytest.mark.atropos  # without the venv: fails in make test (tests/conftest.py)


def start(*argv: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A process in its own session (its own process group); its (short) output is read when it ends."""
    return procs.spawn(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PARALOOP_LOG": "info", "PYTHONUNBUFFERED": "1", **(env or {})},
    )


@contextlib.contextmanager
def owned(proc: subprocess.Popen):
    """Whatever happens in the block, the process group is gone after it."""
    try:
        yield proc
    finally:
        procs.kill_group(proc, grace_s=0)


def paraloop(
    run_dir: Path, model: Path, *extra: str, config: Path = TINY_CONFIG, env: dict[str, str] | None = None
) -> subprocess.Popen:
    return start(sys.executable, str(HOOKED), *run_args(model, run_dir, "--no-plot", *extra, config=config), env=env)


def exited(proc: subprocess.Popen, within: float) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        procs.kill_group(proc, grace_s=0)
        _, err = proc.communicate()
        raise AssertionError(f"still running after {within} s: {err[-3000:]}") from None
    return proc.returncode, err


def status(base: str) -> dict:
    return call(f"{base}/control/status")[1]


def wait(predicate, what: str, within: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(
                f"the process exited ({proc.returncode}) while waiting for {what}: {proc.stderr.read()[-3000:]}"
            )
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def test_sigint_finishes_the_step_writes_a_final_checkpoint_and_exits_zero(tiny_model_path, tmp_path):
    run_dir = tmp_path / "run"
    with owned(paraloop(run_dir, tiny_model_path, "--steps", "1000", "--checkpoint-interval", "0")) as proc:
        base = wait_for_server(proc, run_dir)
        wait(lambda: status(base)["step"] >= 2, "two steps", proc=proc)
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C does, to the whole group
        code, err = exited(proc, 60)
    assert code == 0, err[-3000:]
    final = read_checkpoint(latest_checkpoint(run_dir))
    assert final.step >= 2 and final.step == read_metrics(run_dir)[-1]["step"]


def test_a_second_sigint_exits_at_once_without_waiting_for_the_step(tiny_model_path, tmp_path):
    run_dir = tmp_path / "run"
    proc = paraloop(
        run_dir,
        tiny_model_path,
        "--steps",
        "1000",
        "--checkpoint-interval",
        "1",
        env={"PARALOOP_TEST_SLOW_STEP": "3:120"},
    )
    with owned(proc):
        base = wait_for_server(proc, run_dir)
        # step 3 started, and step 2's checkpoint is on disk: the checkpointer writes it on its own thread, so
        # `step == 2` alone can come first (seen under load: the hard exit then left step 1 as the latest)
        wait(
            lambda: (
                (s := status(base))["step"] == 2
                and s["learner_busy"]
                and (s["last_checkpoint"] or "").endswith("step_000002")
            ),
            "step 3 to start with step 2's checkpoint written",
            proc=proc,
        )
        os.killpg(proc.pid, signal.SIGINT)
        wait(lambda: status(base)["stopping"], "the first SIGINT to be taken", proc=proc)
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        code, err = exited(proc, 30)
        took = time.monotonic() - sent
    assert code == 130, err[-3000:]
    assert took < 10, f"the second SIGINT took {took:.1f} s (step 3 sleeps 120 s)"
    assert "second SIGINT: exiting now" in err
    assert read_checkpoint(latest_checkpoint(run_dir)).step == 2, "the checkpoints written before stand"
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_a_stuck_learner_is_reported_then_stall_timeout_ends_the_run_with_exit_3(tiny_model_path, tmp_path):
    run_dir = tmp_path / "run"
    proc = paraloop(
        run_dir,
        tiny_model_path,
        "--steps",
        "1000",
        "--checkpoint-interval",
        "1",
        "--set",
        "watchdog.learner_stall_s=1",
        "--set",
        "watchdog.learner_stall_factor=1",
        "--set",
        "watchdog.stall_timeout=10",
        env={"PARALOOP_TEST_HANG_STEP": "2"},
    )
    with owned(proc):
        base = wait_for_server(proc, run_dir)
        wait(lambda: status(base)["learner_busy"] and status(base)["step"] == 1, "step 2 to start", proc=proc)
        wait(lambda: call(f"{base}/health")[0] == 503, "/health to report the stall", proc=proc)
        # The step-1 checkpoint is written by its own actor while step 2 hangs; the run ends stall_timeout later.
        wait(lambda: (status(base)["last_checkpoint"] or "").endswith("step_000001"), "checkpoint 1", proc=proc)
        code, body = call(f"{base}/health")
        assert "learner: one learner step has run for" in body["error"]["message"]
        assert "learner" in status(base)["stalled"]
        code, err = exited(proc, 30)
    assert code == 3, err[-3000:]
    assert "learner stalled" in err and "cannot be stopped" in err
    assert "--- thread paraloop-learner" in err, "every thread's stack was logged"
    assert read_checkpoint(latest_checkpoint(run_dir)).step == 1


# --- Atropos -------------------------------------------------------------------------------------------------------


def post_groups(port: int, tags: range) -> None:
    """Groups of 2 sequences as an environment posts them; a group's first token is its tag."""
    for tag in tags:
        body = {
            "tokens": [[tag, 5, 6, 7], [tag, 5, 8]],
            "masks": [[-100, -100, 6, 7], [-100, -100, 8]],
            "scores": [1.0, 0.0],
            "env_id": None,
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/scored_data",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        urllib.request.urlopen(request, timeout=10).close()


def atropos_config(tmp_path: Path, port: int, *, steps: int, interval: int, keep_last: int | None = None) -> Path:
    config = tmp_path / "atropos.toml"
    config.write_text(f"""
[rl_training]
learning_rate = 1e-3
batch_size = 4              # two groups of two sequences
total_steps = {steps}
kl_beta = 0.0
mode = "sync"

[rl_training.lora]
rank = 4
num_layers = 2

[rl_training.atropos]
api_url = "http://127.0.0.1:{port}"
poll_interval = 0.1
max_backoff = 0.5
max_token_len = 512

[checkpoint]
interval = {interval}
{f"keep_last = {keep_last}" if keep_last else ""}
""")
    return config


def trained(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


@pytest.mark.atropos
@needs_run_api
def test_kill_9_before_the_checkpoint_then_resume_trains_every_fetched_group_exactly_once(tiny_model_path, tmp_path):
    port, run_dir, log = free_port(), tmp_path / "run", tmp_path / "trained.jsonl"
    config = atropos_config(tmp_path, port, steps=6, interval=2, keep_last=1)
    env = {"PARALOOP_TEST_TRAINED_LOG": str(log)}
    with run_api(port):
        with owned(paraloop(run_dir, tiny_model_path, config=config, env=env)) as first:
            base = wait_for_server(first, run_dir)
            wait(lambda: status(base)["source"]["registered"], "registration", proc=first)
            post_groups(port, range(1, 7))  # three batches: steps 1-3; the checkpoint after step 2
            wait(lambda: len(trained(log)) == 3, "three steps", proc=first)
            assert call(f"{base}/control/pause", "POST")[0] == 200
            post_groups(port, range(7, 9))  # a fourth batch: fetched and journaled, held by the paused learner
            wait(
                lambda: (
                    (s := status(base))["journal"]["appended"] == 4
                    and s["buffer"]["groups"] == 0
                    and s["queues"]["rollouts"] == 0
                    and (s["last_checkpoint"] or "").endswith("step_000002")
                ),
                "the fourth batch to be journaled and taken, and checkpoint 2 written",
                proc=first,
            )
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
        assert read_checkpoint(latest_checkpoint(run_dir)).step == 2
        post_groups(port, range(9, 13))
        with owned(paraloop(run_dir, tiny_model_path, "--resume", str(run_dir), config=config, env=env)) as second:
            code, err = exited(second, 120)
        assert code == 0, err[-3000:]
    lives = {}
    for line in trained(log):
        lives.setdefault(line["pid"], []).append(line)
    (life1, life2) = lives.values()
    assert [s["step"] for s in life1] == [1, 2, 3] and [s["step"] for s in life2] == [3, 4, 5, 6]
    assert life2[0]["tags"] == life1[2]["tags"], "the step lost with the kill is trained again first"
    lineage = [t for s in life1[:2] + life2 for t in s["tags"]]
    assert sorted(lineage) == list(range(1, 13)), "every fetched group trained exactly once in the lineage"
    assert sorted(life2[1]["tags"]) == [7, 8], "the batch fetched but never trained comes next, from the journal"
    assert "replaying 4 journaled group(s)" in err
    assert read_checkpoint(latest_checkpoint(run_dir)).trainer_state["journal"]["below"] == 6
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_000006"]
    assert list((run_dir / "journal").iterdir()) == [], "every entry consumed by the kept checkpoint is pruned"


@pytest.mark.atropos
@needs_run_api
def test_an_api_down_at_start_then_restarted_mid_run_is_waited_for_while_serving(tiny_model_path, tmp_path):
    port, run_dir = free_port(), tmp_path / "run"
    config = atropos_config(tmp_path, port, steps=4, interval=0)
    completion = {"prompt": "hello", "max_tokens": 4}
    with owned(paraloop(run_dir, tiny_model_path, config=config)) as proc:
        base = wait_for_server(proc, run_dir)
        wait(lambda: status(base)["source"]["retries"] >= 2, "retries while the API is down", proc=proc)
        assert status(base)["source"]["state"] == "registering"
        assert call(f"{base}/health")[0] == 200 and call(f"{base}/v1/completions", "POST", completion)[0] == 200
        with run_api(port) as api:
            wait(lambda: status(base)["source"]["registered"], "registration", proc=proc)
            post_groups(port, range(1, 5))
            wait(lambda: status(base)["step"] == 2, "two steps", proc=proc)
            os.killpg(api.pid, signal.SIGTERM)
            api.wait(timeout=30)
        wait(lambda: not status(base)["source"]["connected"], "the client to notice", proc=proc)
        assert call(f"{base}/v1/completions", "POST", completion)[0] == 200, "serving goes on"
        with run_api(port):
            wait(lambda: status(base)["source"]["registrations"] == 2, "registering again", proc=proc)
            post_groups(port, range(5, 9))
            code, err = exited(proc, 120)
    assert code == 0, err[-3000:]
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4]
