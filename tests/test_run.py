"""`paraloop run` end to end on the tiny model: it learns, checkpoints, obeys /control, swaps under load, fails loudly.

Learning and swapping under load run on the tiny 4-bit model with each compute path (support/compute_paths.py)."""

import asyncio
import re
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import pytest

from support import procs
from support import wait_for_server
from support.doc_tables import documented_keys
from support.runs import TINY_CONFIG, call, finish, paraloop_run, read_metrics, run_args, run_to_end

LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ \S+ [A-Z]+ ")  # logs.FORMAT's lines
COMPUTED_AS = {"dequantized": "expanded to float32 at load", "quantized": "kept quantized: MLX's quantized kernels"}


def text(url: str, token: str | None = None) -> str:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.read().decode()


def wait_status(base: str, token: str | None, predicate: Callable[[dict], bool], timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while not predicate(status := call(f"{base}/control/status", token=token)[1]):
        assert time.monotonic() < deadline, f"status never matched: {status}"
        time.sleep(0.05)
    return status


def test_run_learns_checkpoints_and_exits_zero(tiny_q4_model_path, compute, tmp_path):
    run_dir = tmp_path / "run"
    done = run_to_end(
        tiny_q4_model_path,
        run_dir,
        "--steps",
        "24",
        "--checkpoint-interval",
        "10",
        "--keep-last",
        "2",
        "--compute",
        compute,
        log="info",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert COMPUTED_AS[compute] in done.stderr, "the base computed on the path under test"
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 25))
    assert [r["version"] for r in rows] == list(range(1, 25)), "every step publishes the next adapter version"
    first = sum(r["reward_mean"] for r in rows[:4]) / 4
    last = sum(r["reward_mean"] for r in rows[-4:]) / 4
    assert last > first + 0.15, f"reward did not rise: first steps {first:.3f}, last steps {last:.3f}"
    documented = documented_keys("metrics.md", "metrics.jsonl")
    # docs/metrics.md names every key; a mock run without [distill] lacks only Atropos's source_step and the
    # distillation keys (tests/test_distill_teacher.py sees those in a distilling run)
    absent = {"source_step", "distill_kl", "distill_tokens", "distill_rows_missing"}
    for row in rows:
        assert set(row) <= documented, f"undocumented metrics.jsonl keys: {set(row) - documented}"
        assert documented - set(row) == absent, documented - set(row)
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_000020", "step_000024"], "--keep-last 2 keeps the newest two"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000024"
    assert (run_dir / "checkpoints" / "initial_adapter" / "adapters.safetensors").is_file()
    assert (run_dir / "metrics.png").read_bytes().startswith(b"\x89PNG")
    assert f"wrote {run_dir / 'metrics.png'}" in done.stderr
    assert "reward_mean" in done.stderr  # the closing table


def test_control_api_pause_step_snapshot_stop_and_auth(tiny_model_path, tmp_path):
    from paraloop.checkpoint import latest_checkpoint, read_checkpoint

    run_dir, token = tmp_path / "run", "s3cret"
    with paraloop_run(tiny_model_path, run_dir, "--steps", "1000", "--control-token", token) as proc:
        base = wait_for_server(proc, run_dir)
        assert call(f"{base}/control/status")[0] == 401
        assert call(f"{base}/control/pause", "POST", token="wrong")[0] == 401
        assert call(f"{base}/control/step", "POST", token=token)[0] == 409, "single steps only while paused"
        assert call(f"{base}/control/pause", "POST", token=token)[0] == 200
        status, body = call(
            f"{base}/v1/completions", "POST", {"prompt": "hello", "max_tokens": 4, "ignore_eos": True}, token=token
        )
        assert status == 200 and len(body["choices"][0]["token_ids"]) == 4, "generation goes on while paused"
        status, one = call(f"{base}/control/step", "POST", token=token)
        assert status == 200 and "loss" in one["metrics"] and one["adapter_version"] == one["step"]
        status, two = call(f"{base}/control/step", "POST", token=token)
        assert status == 200 and two["step"] == one["step"] + 1, "each single step is exactly one step"

        state = wait_status(base, token, lambda s: s["step"] == two["step"] and s["learner_held"])
        assert state["paused"] is True and state["stopping"] is False and state["mode"] == "sync"
        # every field is documented; `ranks` appears only in a distributed run (tests/test_distributed_run.py)
        assert set(state) | {"ranks"} == documented_keys("metrics.md", "GET /control/status")
        assert set(state["engine"]) == documented_keys("metrics.md", "engine")
        assert set(state["buffer"]) == documented_keys("metrics.md", "buffer")
        assert set(state["queues"]) == {"rollouts", "publish", "checkpoints", "metrics"}
        assert state["run_dir"] == str(run_dir) and state["uptime_s"] > 0 and state["rejected_groups"] == 0
        assert state["last_metrics"]["reward_mean"] == two["metrics"]["reward_mean"]
        assert state["source"]["source"] == "mock" and state["source"]["groups"] > 0

        metrics = text(f"{base}/metrics", token=token)
        families = set(re.findall(r"^(paraloop_\w+)", metrics, re.M))
        assert families == documented_keys("metrics.md", "GET /metrics"), "docs/metrics.md lists every metric"
        assert f"paraloop_step {float(two['step'])}" in metrics.splitlines()
        assert "paraloop_paused 1.0" in metrics.splitlines()
        assert f'paraloop_metric{{name="loss"}} {float(two["metrics"]["loss"])}' in metrics.splitlines()

        status, snap = call(f"{base}/control/snapshot", "POST", token=token)
        assert status == 200
        checkpoint = read_checkpoint(snap["path"])
        assert checkpoint.step == two["step"] and checkpoint.adapter
        # The run's checkpoints are served by name, loaded when first asked for (docs/api.md, Adapters).
        name, ask = f"policy@{Path(snap['path']).name}", {"prompt": "hello", "max_tokens": 4, "temperature": 0}
        wait_status(base, token, lambda s: s["serving_version"] == two["step"])
        status, old = call(f"{base}/v1/completions", "POST", {**ask, "model": name}, token=token)
        assert status == 200 and old["adapter"] == name and old["adapter_versions"] == [checkpoint.version]
        _, now = call(f"{base}/v1/completions", "POST", {**ask, "model": "policy"}, token=token)
        assert now["choices"][0]["token_ids"] == old["choices"][0]["token_ids"], "paused: the policy is the snapshot"
        assert name in [card["id"] for card in call(f"{base}/v1/models", token=token)[1]["data"]]
        assert call(f"{base}/control/stop", "POST", token=token)[0] == 200
        code, _, err = finish(proc)
    assert code == 0, err[-3000:]
    # Paused through the snapshot and the stop: no step after the second single step, and none was lost.
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, two["step"] + 1))
    assert read_checkpoint(latest_checkpoint(run_dir)).step == two["step"]


def test_sigterm_writes_final_checkpoint_and_exits_zero(tiny_model_path, tmp_path):
    from paraloop.checkpoint import latest_checkpoint, read_checkpoint

    run_dir = tmp_path / "run"
    with paraloop_run(tiny_model_path, run_dir, "--steps", "1000", "--checkpoint-interval", "0") as proc:
        base = wait_for_server(proc, run_dir)
        wait_status(base, None, lambda s: s["step"] >= 2, timeout=60)
        proc.send_signal(signal.SIGTERM)
        code, _, err = finish(proc)
    assert code == 0, err[-3000:]
    final = read_checkpoint(latest_checkpoint(run_dir))
    assert final.step >= 2 and final.step == read_metrics(run_dir)[-1]["step"]


@pytest.mark.parametrize(
    ("mode", "compute"), [("sync", "dequantized"), ("async", "dequantized"), ("async", "quantized")]
)
def test_swaps_under_load_fail_no_request(tiny_q4_model_path, tmp_path, mode, compute):
    """32 HTTP clients keep generating through 20 adapter swaps: no failure, versions monotone per client, and in
    sync mode no response mixes versions. On quantized kernels in async mode only: there swaps land between decode
    steps of running rows, the harder case for a quantized base (sync mode's drain is the same on both paths)."""
    run_dir = tmp_path / "run"
    failures, mixed, seen = [], [], {i: [] for i in range(32)}
    stop = threading.Event()
    with paraloop_run(
        tiny_q4_model_path, run_dir, "--steps", "20", "--mode", mode, "--checkpoint-interval", "0", "--compute", compute
    ) as proc:
        base = wait_for_server(proc, run_dir)

        def training() -> bool:  # errors after the last step are the server shutting down, not failures
            rows = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
            return proc.poll() is None and (not rows or rows[-1]["step"] < 20)

        def client(i: int) -> None:
            while not stop.is_set():
                try:
                    status, body = call(
                        f"{base}/v1/completions",
                        "POST",
                        {"prompt": f"client {i} says", "max_tokens": 6, "temperature": 1.0},
                    )
                except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                    if training():
                        failures.append(repr(e))
                    return
                if status != 200:
                    if training():
                        failures.append((status, body))
                    return
                versions = body["choices"][0]["adapter_versions"]
                if len(set(versions)) > 1:
                    mixed.append(versions)
                seen[i].append(min(versions))

        with ThreadPoolExecutor(32) as pool:
            for i in range(32):
                pool.submit(client, i)
            try:
                code, _, err = finish(proc, timeout=300)
            finally:
                stop.set()  # the clients end before the pool is joined, however the run ended
        assert code == 0, err[-3000:]
        assert not failures, failures[:3]
        assert read_metrics(run_dir)[-1]["version"] == 20
        for versions in seen.values():
            assert versions == sorted(versions), "a client saw an older adapter after a newer one"
        assert max(max(v) for v in seen.values() if v) >= 10, "clients did not live through the swaps"
        if mode == "sync":
            assert not mixed, f"sync mode mixed versions in a response: {mixed[:3]}"


def test_failing_actor_ends_the_run_with_its_error(tiny_model_path, tmp_path, monkeypatch, capsys):
    from paraloop.run import main as run
    from paraloop.learn.trainer import Trainer

    original = Trainer.step

    def failing_step(self, batch):
        if self.step_count == 2:
            raise RuntimeError("injected learner failure")
        return original(self, batch)

    monkeypatch.setattr(Trainer, "step", failing_step)
    code = run.main(run_args(tiny_model_path, tmp_path / "run", "--steps", "50", "--no-plot"))
    assert code == 1
    assert "injected learner failure" in capsys.readouterr().err


class Late:
    """An actor inbox whose every message arrives `delay_s` late (wraps a memory object receive stream)."""

    def __init__(self, inbox, delay_s: float) -> None:
        self.inbox, self.delay_s = inbox, delay_s

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.inbox.aclose()

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self.inbox.__anext__()
        await anyio.sleep(self.delay_s)
        return item


@pytest.mark.parametrize("end", ["total_steps", "stop"])
def test_the_last_metrics_line_is_written_however_the_run_ends(tiny_model_path, tmp_path, monkeypatch, end):
    """The monitor lags the learner (each StepFinished reaches it 0.3 s late): the run still waits for it, so
    metrics.jsonl ends with the last step, whether the run reached total_steps or was stopped."""
    from paraloop.run import main as run
    from paraloop.run import monitor

    original = monitor.run_monitor
    monkeypatch.setattr(monitor, "run_monitor", lambda inbox, **kw: original(Late(inbox, 0.3), **kw))
    stop_at = None
    if end == "stop":
        from paraloop.learn.trainer import Trainer
        from paraloop.run.control import LearnerControl

        controls = []
        init = LearnerControl.__init__

        def recorded(self, status):
            init(self, status)
            controls.append((self, asyncio.get_running_loop()))

        monkeypatch.setattr(LearnerControl, "__init__", recorded)
        step = Trainer.step

        def step_then_stop(self, batch):  # runs on the learner's thread: a stop arrives while step 2 computes
            result = step(self, batch)
            if self.step_count == 2:
                control, loop = controls[0]
                loop.call_soon_threadsafe(control.stop)
            return result

        monkeypatch.setattr(Trainer, "step", step_then_stop)
        stop_at = 2
    run_dir = tmp_path / "run"
    code = run.main(run_args(tiny_model_path, run_dir, "--steps", "3", "--checkpoint-interval", "0", "--no-plot"))
    assert code == 0
    last = stop_at or 3
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, last + 1))


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    proc = procs.run(
        [sys.executable, "-m", "paraloop", "run", str(TINY_CONFIG), "--model-path", str(tmp_path / "missing")],
        timeout=60,
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if not LOG_LINE.match(line)]  # the BLAS line comes first
    assert len(errors) == 1 and errors[0].startswith("paraloop: error: ") and "missing" in errors[0], proc.stderr
    proc = procs.run([sys.executable, "-m", "paraloop", "run", str(tmp_path / "nope.toml")], timeout=60)
    assert proc.returncode == 2 and "not found" in proc.stderr


def test_a_new_run_never_overwrites_an_earlier_runs_checkpoints(tiny_model_path, tmp_path):
    run_dir = tmp_path / "run"
    done = run_to_end(tiny_model_path, run_dir, "--steps", "1", "--no-plot")
    assert done.returncode == 0, done.stderr[-3000:]
    before = (run_dir / "checkpoints" / "step_000001" / "trainer_state.json").read_text()
    done = run_to_end(tiny_model_path, run_dir, "--steps", "1", "--no-plot")
    assert done.returncode == 2 and "--resume" in done.stderr
    assert (run_dir / "checkpoints" / "step_000001" / "trainer_state.json").read_text() == before
