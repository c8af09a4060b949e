"""Two ranks on loopback over MLX's ring backend, tiny model: one run, one adapter.

- the trainer over the ring equals one process on the same whole batches (every loss option), bitwise on both ranks;
- `paraloop launch -n 2` trains with identical adapters on both ranks; a 1-rank checkpoint resumes on 2 ranks and
  the 2-rank one on 1, each rank starting bitwise from rank 0's checkpoint;
- /control on rank 0 pauses and single-steps both ranks; a follower's /control answers 409 naming rank 0;
- a rank that dies, or freezes, ends the other with exit 1 and its name, within the stated bound;
- from Atropos: rank 0 fetches the batches both ranks train, and the environment generates from both ranks.

Every process runs in its own process group (a launcher and its ranks share one), killed when a test ends.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import procs
from paraloop.checkpoint import read_checkpoint
from paraloop.distributed import digest
from support import until_blocking
from support.runs import call, read_metrics, run_args, run_cmd

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PARALOOP_LOG": "warning", "PYTHONUNBUFFERED": "1"}
WAIT_S = 60  # for a state the run reaches on its own (a step, a checkpoint)
FAULT_BOUND_S = 15  # a lost rank ends the others within this (peer_timeout 3 s here; a dead one at once)

pytestmark = pytest.mark.slow


def ring_hostfile(path: Path, ranks: int = 2) -> Path:
    from paraloop.run.launch import free_ports

    first = free_ports(ranks)
    path.write_text(json.dumps([[f"127.0.0.1:{first + r}"] for r in range(ranks)]))
    return path


def start(cmd: list[str], cwd: Path = REPO, **env: str) -> subprocess.Popen:
    return procs.spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**ENV, **env}, cwd=cwd)


def kill(*children: subprocess.Popen) -> None:
    for child in children:
        procs.kill_group(child, grace_s=1.0)


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str]:
    _, err = procs.communicate(proc, timeout=timeout)
    return proc.returncode, err


def launch(model: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    return start(
        [
            sys.executable,
            "-m",
            "paraloop",
            "launch",
            "-n",
            "2",
            "--grace",
            "20",
            "--",
            "run",
            *run_args(model, run_dir, "--no-plot", *extra),
        ]
    )


def rank(r: int, hostfile: Path, model: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    return start(
        run_cmd(model, run_dir, "--no-plot", *extra),
        MLX_RANK=str(r),
        MLX_HOSTFILE=str(hostfile),
    )


def rank_files(run_dir: Path, children: list[subprocess.Popen], count: int = 2, timeout: float = 120) -> list[dict]:
    deadline = time.time() + timeout
    paths = [run_dir / "ranks" / f"rank_{r}.json" for r in range(count)]
    while time.time() < deadline:
        for p in children:
            if p.poll() is not None:
                raise AssertionError(f"exited early ({p.returncode}): {p.stderr.read()[-3000:]}")
        if all(p.is_file() for p in paths):
            try:
                return [json.loads(p.read_text()) for p in paths]
            except json.JSONDecodeError:
                pass
        time.sleep(0.2)
    raise AssertionError("the ranks did not start serving in time")


def status(url: str) -> dict:
    code, body = call(f"{url}/control/status")
    assert code == 200, body
    return body


def meet_again(url: str, collectives: int = 10) -> None:
    """Wait until the ranks have met in `collectives` more collectives. Paused, these are ticks, each of which could
    decide a step; a step takes only a few (rollouts, reduce, compare) and a tick comes only after it ends, so a
    step decided at any of them shows in the step counts by then."""
    seen = status(url)["ranks"]["collectives"]
    until_blocking(
        lambda: status(url)["ranks"]["collectives"] >= seen + collectives,
        f"{collectives} more collectives",
        within=WAIT_S,
    )


def test_ring_trainer_equals_one_process_on_the_same_batches(tiny_model_path, tmp_path):
    """Each rank makes its part of every batch; the parts are exchanged as a run does; the adapters after the
    steps are bitwise equal on both ranks and within 1e-5 of one process stepping through the whole batches."""
    from support.trainers import CASES

    hostfile = ring_hostfile(tmp_path / "hosts.json")
    cmd = [
        sys.executable,
        str(REPO / "tests" / "scripts" / "distributed_trainer_script.py"),
        str(tiny_model_path),
        *CASES,
    ]
    tests_path = os.pathsep.join(filter(None, [str(REPO / "tests"), ENV.get("PYTHONPATH")]))  # for `support`
    ranks = [
        start(cmd, REPO / "tests", MLX_RANK=str(r), MLX_HOSTFILE=str(hostfile), PYTHONPATH=tests_path) for r in range(2)
    ]
    try:
        outs = [p.communicate(timeout=240) for p in ranks]
    finally:
        kill(*ranks)
    for p, (_, err) in zip(ranks, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    lines = [[json.loads(line) for line in out.splitlines() if line.startswith("{")] for out, _ in outs]
    assert [line["case"] for line in lines[0]] == [line["case"] for line in lines[1]] == list(CASES)
    for mine, theirs in zip(*lines, strict=True):
        assert mine["digest"] == theirs["digest"] and mine["differ"] == [], mine["case"]
        assert mine["max_diff"] <= 1e-5, mine
        assert mine["collectives"] == theirs["collectives"] > 0


def test_launch_trains_resumes_across_rank_counts_with_identical_adapters(tiny_model_path, tmp_path):
    run_dir = tmp_path / "run"
    code, err = finish(start(run_cmd(tiny_model_path, run_dir, "--no-plot", "--steps", "2")))
    assert code == 0, err[-3000:]
    two = read_checkpoint(run_dir / "checkpoints" / "step_000002")

    proc = launch(
        tiny_model_path,
        run_dir,
        "--steps",
        "4",
        "--resume",
        str(run_dir),
        "--checkpoint-interval",
        "0",
        "--set",
        "distributed.checksum_interval=1",
    )
    code, err = finish(proc)
    assert code == 0, err[-3000:]
    files = [json.loads((run_dir / "ranks" / f"rank_{r}.json").read_text()) for r in range(2)]
    for f in files:  # both ranks started bitwise from rank 0's step-2 checkpoint, and ended equal to its step 4
        assert f["size"] == 2 and f["started"]["step"] == 2 and f["verified"]["step"] == 4
        assert f["started"]["adapter_sha256"] == digest(two.adapter)
    four = read_checkpoint(run_dir / "checkpoints" / "step_000004")
    assert files[0]["verified"]["adapter_sha256"] == files[1]["verified"]["adapter_sha256"] == digest(four.adapter)
    assert files[0]["verified"]["optimizer_sha256"] == files[1]["verified"]["optimizer_sha256"]
    assert four.trainer_state["source_state"]["next_group"] == 4 * 4, "both ranks' groups, as one process counts"

    code, err = finish(
        start(
            [
                sys.executable,
                "-m",
                "paraloop",
                "run",
                *run_args(tiny_model_path, run_dir, "--no-plot", "--steps", "5", "--resume", str(run_dir)),
            ]
        )
    )
    assert code == 0, err[-3000:]
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4, 5], "rank 0 alone wrote metrics.jsonl"
    assert read_checkpoint(run_dir).step == 5


def test_control_on_rank_0_pauses_and_steps_both_ranks(tiny_model_path, tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(tiny_model_path, run_dir, "--steps", "1000", "--checkpoint-interval", "0")
    try:
        r0, r1 = (f["url"] for f in rank_files(run_dir, [proc]))
        until_blocking(lambda: status(r0)["step"] >= 1, "a first step", within=WAIT_S)
        assert call(f"{r0}/control/pause", "POST")[0] == 200
        # a step already decided when the pause came may finish; then both ranks hold still, at the same step
        step = until_blocking(
            lambda: status(r0)["learner_held"] and (s := status(r0)["step"]) == status(r1)["step"] and s,
            "both ranks paused at one step",
            within=WAIT_S,
        )
        meet_again(r0)  # ticks that would each decide a step, were the pause not held
        assert status(r0)["step"] == status(r1)["step"] == step and status(r1)["paused"] is True
        ranks = status(r0)["ranks"]  # rank 0's view of the group, as docs/metrics.md describes it
        assert (ranks["rank"], ranks["size"]) == (0, 2) and list(ranks["peers"]) == ["1"] and ranks["collectives"] > 0
        code, body = call(f"{r1}/control/step", "POST")
        assert code == 409 and r0 in body["error"]["message"], "a follower's /control names rank 0"
        code, stepped = call(f"{r0}/control/step", "POST")
        assert code == 200 and stepped["step"] == step + 1
        until_blocking(lambda: status(r1)["step"] == step + 1, "rank 1 to take the single step", within=WAIT_S)
        meet_again(r0)
        assert status(r0)["step"] == status(r1)["step"] == step + 1, "exactly one step, on both ranks"
        code, snap = call(f"{r0}/control/snapshot", "POST")
        assert code == 200 and read_checkpoint(snap["path"]).step == step + 1
        assert call(f"{r0}/control/resume", "POST")[0] == 200
        until_blocking(lambda: status(r1)["step"] > step + 2, "both ranks to go on", within=WAIT_S)
        assert call(f"{r0}/control/stop", "POST")[0] == 200
        code, err = finish(proc)
        assert code == 0, err[-3000:]
        final = read_checkpoint(run_dir)
        files = [json.loads((run_dir / "ranks" / f"rank_{r}.json").read_text()) for r in range(2)]
        assert files[0]["verified"]["step"] == files[1]["verified"]["step"] == final.step
        assert files[0]["verified"]["adapter_sha256"] == files[1]["verified"]["adapter_sha256"] == digest(final.adapter)
    finally:
        kill(proc)


@pytest.mark.parametrize("fault", ["killed", "frozen"])
def test_a_lost_rank_ends_the_other_naming_it(tiny_model_path, tmp_path, fault):
    """kill -9: its sockets close and rank 0's collective fails at once; SIGSTOP: nothing closes, rank 0's
    heartbeats go unanswered for peer_timeout. Either way rank 0 exits 1 naming rank 1, and its newest
    checkpoint stands."""
    run_dir, hostfile = tmp_path / "run", ring_hostfile(tmp_path / "hosts.json")
    extra = (
        "--steps",
        "1000",
        "--checkpoint-interval",
        "2",
        "--set",
        "distributed.peer_timeout=3",
        "--set",
        "distributed.heartbeat_interval=0.5",
    )
    ranks = [rank(r, hostfile, tiny_model_path, run_dir, *extra) for r in range(2)]
    try:
        files = rank_files(run_dir, ranks)
        until_blocking(lambda: (run_dir / "checkpoints" / "latest").is_file(), "a checkpoint", within=WAIT_S)
        lost = time.time()
        os.kill(files[1]["pid"], signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        code, err = finish(ranks[0], timeout=FAULT_BOUND_S + 30)
        took = time.time() - lost
        assert code == 1, err[-3000:]
        assert took < FAULT_BOUND_S, f"rank 0 took {took:.1f} s to end"
        message = err.strip().splitlines()[-1]
        assert message.startswith("paraloop: ") and "rank 1" in message, message
        assert ("heartbeat" in message) == (fault == "frozen"), message
        read_checkpoint(run_dir)  # the newest complete checkpoint stands
    finally:
        kill(*ranks)


ATROPOS_VENV = Path(os.environ.get("PARALOOP_ATROPOS_VENV", REPO / ".venv-atropos"))


@pytest.mark.atropos
def test_atropos_batches_come_to_rank_0_and_both_ranks_serve_and_train(tiny_model_path, tmp_path):
    """run-api, a real environment (tests/scripts/atropos_env.py) configured with both ranks' /generate as its servers,
    and two ranks: rank 0 alone registers and fetches, both train every batch, both engines serve generations."""
    from paraloop.run.launch import free_ports

    api, http = free_ports(1), free_ports(2)
    run_dir, hostfile, steps = tmp_path / "run", ring_hostfile(tmp_path / "hosts.json"), 3
    config = tmp_path / "atropos.toml"
    config.write_text(f"""
[server]
port = {http}
[model]
base_path = "{tiny_model_path}"
[rl_training]
learning_rate = 1e-3
batch_size = 4
total_steps = {steps}
kl_beta = 0.0
[rl_training.lora]
rank = 4
num_layers = 2
[rl_training.atropos]
api_url = "http://127.0.0.1:{api}"
poll_interval = 0.2
max_backoff = 2.0
max_token_len = 512
[checkpoint]
dir = "{run_dir}"
interval = 0
[distributed]
checksum_interval = 1
""")
    server = {
        "server_type": "vllm",
        "model_name": "paraloop",
        "api_key": "x",
        "tokenizer_name": str(tiny_model_path),
        "timeout": 120,
        "num_max_requests_at_once": 8,
    }
    env_config = tmp_path / "env.yaml"  # JSON is YAML: a list of two servers, which atroposlib balances over
    env_config.write_text(
        json.dumps(
            {
                "env": {
                    "rollout_server_url": f"http://127.0.0.1:{api}",
                    "tokenizer_name": str(tiny_model_path),
                    "use_wandb": False,
                    "group_size": 2,
                    "total_steps": 1000,
                },
                "openai": [{**server, "base_url": f"http://127.0.0.1:{http + r}/v1"} for r in range(2)],
            }
        )
    )
    children = [start([str(ATROPOS_VENV / "bin" / "run-api"), "--host", "127.0.0.1", "--port", str(api)])]
    try:
        children += [
            start(
                [sys.executable, "-m", "paraloop", "run", str(config), "--no-plot"],
                MLX_RANK=str(r),
                MLX_HOSTFILE=str(hostfile),
            )
            for r in range(2)
        ]
        rank_files(run_dir, children[1:])
        children.append(
            start(
                [
                    str(ATROPOS_VENV / "bin" / "python"),
                    str(REPO / "tests" / "scripts" / "atropos_env.py"),
                    "serve",
                    "--config",
                    str(env_config),
                ],
                HF_HUB_OFFLINE="1",
                WANDB_MODE="disabled",
            )
        )
        for r in (1, 2):
            code, err = finish(children[r], timeout=240)
            assert code == 0, err[-3000:]
    finally:
        kill(*children)
    files = [json.loads((run_dir / "ranks" / f"rank_{r}.json").read_text()) for r in range(2)]
    assert [f["verified"]["step"] for f in files] == [steps, steps]
    assert files[0]["verified"]["adapter_sha256"] == files[1]["verified"]["adapter_sha256"]
    assert all(f["engine"]["requests_served"] > 0 for f in files), [f["engine"] for f in files]
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, steps + 1))
