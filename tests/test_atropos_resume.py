"""`paraloop run --resume` against Atropos, end to end on the tiny model with the real run-api: the resumed run
registers with the learner step of its checkpoint as `starting_step` (so environments and run-api's step continue
from there), trains the remaining steps, and reports the groups it rejects in /control/status and /metrics."""

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from support import procs
from conftest import ATROPOS_VENV
from paraloop.checkpoint import read_checkpoint
import support
from support import free_port, scored_data, until_blocking, wait_for_server
from support.runs import RUN_ENV, finish, read_metrics

pytestmark = [pytest.mark.atropos, pytest.mark.timeout(300)]
DEADLINE_S = 90


def http(url: str, body: dict | None = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=DEADLINE_S) as response:
        text = response.read().decode()
    try:
        return json.loads(text)
    except ValueError:
        return text


@contextmanager
def run_api() -> Iterator[str]:
    port = free_port()
    with procs.running(
        [str(ATROPOS_VENV / "bin" / "run-api"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    ):
        url = f"http://127.0.0.1:{port}"
        until_blocking(lambda: http(url + "/status"), "run-api to answer", within=DEADLINE_S, ignoring=(OSError,))
        yield url


@contextmanager
def paraloop_run(model: Path, run_dir: Path, api_url: str, *extra: str) -> Iterator[subprocess.Popen]:
    config = run_dir.parent / "atropos.toml"
    config.write_text(f"""
[model]
base_path = "{model}"
[rl_training]
learning_rate = 1e-3
batch_size = 4                 # two groups of two
token_budget = 4096
kl_beta = 0.0
[rl_training.lora]
rank = 4
num_layers = 2
[rl_training.atropos]
api_url = "{api_url}"
poll_interval = 0.1
max_backoff = 1.0
max_token_len = 512
[checkpoint]
dir = "{run_dir}"
save_every_step = true
""")
    cmd = [sys.executable, "-m", "paraloop", "run", str(config), "--port", "0", "--no-plot", *extra]
    with procs.running(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=RUN_ENV) as proc:
        yield proc


def group(tag: int, **changes) -> dict:
    """A valid 2-sequence group as an environment posts it; `tag` is its first token."""
    posted = support.group([1.0, 0.0], prompt=[tag, 5], completions=[[6, 7], [8]], logprobs=[[-0.5, -0.25], [-2.0]])
    return scored_data(posted, **changes)


def register_env(api: str) -> dict:
    """Register an environment once paraloop has registered as the trainer; the answer tells the env's start."""
    body = {"max_token_length": 512, "desired_name": "test", "weight": 1.0, "group_size": 2}
    # run-api opens to environments after the trainer's first GET /batch ("wait for trainer to start" before)
    return until_blocking(
        lambda: (a := http(api + "/register-env", body))["status"] == "success" and a,
        "registration",
        within=DEADLINE_S,
        ignoring=(OSError,),
    )


def test_a_resumed_run_registers_at_its_learner_step_and_reports_rejected_groups(tiny_model_path, tmp_path):
    run_dir = tmp_path / "run"
    with run_api() as api, paraloop_run(tiny_model_path, run_dir, api, "--steps", "2") as proc:
        env = register_env(api)
        assert env["starting_step"] == 0
        for tag in (1, 2, 3, 4):  # two batches
            http(api + "/scored_data", {**group(tag), "env_id": env["env_id"]})
        code, _, err = finish(proc, timeout=DEADLINE_S)
    assert code == 0, err[-3000:]
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]

    # Everything restarted (a fresh run-api too): the resumed run continues from the checkpoint's learner step.
    with (
        run_api() as api,
        paraloop_run(tiny_model_path, run_dir, api, "--steps", "4", "--resume", str(run_dir)) as proc,
    ):
        base = wait_for_server(proc, run_dir)
        env = register_env(api)
        assert env["starting_step"] == 2, "environments are told the resumed step"
        assert http(api + "/status")["current_step"] == 2
        ragged = group(90, masks=[[-100, -100, 6], [-100, -100, 8]])  # a mask row shorter than its tokens
        for body in (ragged, group(5)):  # run-api's batch 3: one malformed group, one good one
            http(api + "/scored_data", {**body, "env_id": env["env_id"]})
        # The good group is 2 sequences, half a learner batch: the run waits for more, reporting the rejection.
        status = until_blocking(
            lambda: (s := http(base + "/control/status"))["rejected_groups"] and s,
            "the rejection",
            within=DEADLINE_S,
            ignoring=(OSError,),
        )
        assert status["rejected_groups"] == 1 and status["source"]["per_env"][str(env["env_id"])]["rejected"] == 1
        assert status["step"] == 2
        assert "paraloop_rejected_groups_total 1.0" in http(base + "/metrics").splitlines()
        for tags in ((6, 7), (8, 9)):  # run-api's batches 4 and 5: the rejected group's place comes from batch 5
            for tag in tags:
                http(api + "/scored_data", {**group(tag), "env_id": env["env_id"]})
            if tags == (6, 7):  # one /batch call could hand out both: their order would be run-api's
                until_blocking(lambda: http(base + "/control/status")["step"] == 3, "step 3", within=DEADLINE_S)
        code, _, err = finish(proc, timeout=DEADLINE_S)
    assert code == 0, err[-3000:]
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # step 3: groups 5 and 6; step 4: groups 7 and 8 (the source goes on past total_steps batches: a run trains
    # total_steps full batches)
    assert [r["sequences"] for r in rows] == [4, 4, 4, 4]
    assert [r["source_step"] for r in rows[2:]] == [4, 5], "run-api's step went on from the resumed step 2"
    assert read_checkpoint(run_dir).step == 4
