"""`paraloop run` end to end on the tiny model: it learns, checkpoints, obeys /control, swaps under load, fails loudly."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.toml"


def paraloop_run(model: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PARALOOP_LOG": "warning", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "paraloop", "run", str(TINY_CONFIG), "--model-path", str(model),
           "--run-dir", str(run_dir), "--port", "0", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def wait_for_server(proc: subprocess.Popen, run_dir: Path, timeout: float = 120) -> str:
    deadline = time.time() + timeout
    path = run_dir / "server.json"
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"paraloop run exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if path.is_file():
            try:
                info = json.loads(path.read_text())
            except json.JSONDecodeError:
                info = None
            if info and info.get("pid") == proc.pid:
                return f"http://127.0.0.1:{info['port']}"
        time.sleep(0.1)
    raise AssertionError("paraloop run did not start serving in time")


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
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"paraloop run did not finish in {timeout}s: {err[-3000:]}") from None
    return proc.returncode, out, err


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_run_learns_checkpoints_and_exits_zero(tiny_model_path, tmp_path):
    run_dir = tmp_path / "run"
    proc = paraloop_run(tiny_model_path, run_dir, "--steps", "24", "--checkpoint-interval", "10")
    code, _, err = finish(proc)
    assert code == 0, err[-3000:]
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 25))
    assert [r["version"] for r in rows] == list(range(1, 25)), "every step publishes the next adapter version"
    first = sum(r["reward_mean"] for r in rows[:4]) / 4
    last = sum(r["reward_mean"] for r in rows[-4:]) / 4
    assert last > first + 0.15, f"reward did not rise: first steps {first:.3f}, last steps {last:.3f}"
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_000010", "step_000020", "step_000024"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000024"
    assert (run_dir / "checkpoints" / "initial_adapter" / "adapters.safetensors").is_file()
    assert (run_dir / "metrics.png").is_file()
    assert "reward_mean" in err  # the closing table


def test_control_api_pause_step_snapshot_stop_and_auth(tiny_model_path, tmp_path):
    from paraloop.checkpoint import read_checkpoint

    run_dir, token = tmp_path / "run", "s3cret"
    proc = paraloop_run(tiny_model_path, run_dir, "--steps", "1000", "--control-token", token)
    try:
        base = wait_for_server(proc, run_dir)
        assert call(f"{base}/control/status")[0] == 401
        assert call(f"{base}/control/pause", "POST", token="wrong")[0] == 401
        assert call(f"{base}/control/pause", "POST", token=token)[0] == 200
        time.sleep(1.0)  # a step in flight when pausing may still finish
        step = call(f"{base}/control/status", token=token)[1]["step"]
        status, body = call(f"{base}/v1/completions", "POST", {"prompt": "hello", "max_tokens": 4}, token=token)
        assert status == 200 and body["choices"][0]["text"] is not None, "generation goes on while paused"
        time.sleep(1.5)
        paused = call(f"{base}/control/status", token=token)[1]
        assert paused["paused"] is True and paused["step"] == step, "no learner step while paused"
        status, stepped = call(f"{base}/control/step", "POST", token=token)
        assert status == 200 and stepped["step"] == step + 1 and "loss" in stepped["metrics"]
        time.sleep(1.0)
        assert call(f"{base}/control/status", token=token)[1]["step"] == step + 1, "exactly one step"
        status, snap = call(f"{base}/control/snapshot", "POST", token=token)
        assert status == 200
        checkpoint = read_checkpoint(snap["path"])
        assert checkpoint.step == step + 1 and checkpoint.adapter
        assert call(f"{base}/control/resume", "POST", token=token)[0] == 200
        assert call(f"{base}/control/step", "POST", token=token)[0] == 409, "single steps only while paused"
        assert call(f"{base}/control/stop", "POST", token=token)[0] == 200
        code, _, err = finish(proc)
        assert code == 0, err[-3000:]
        assert (run_dir / "checkpoints" / "latest").is_file()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_sigterm_writes_final_checkpoint_and_exits_zero(tiny_model_path, tmp_path):
    from paraloop.checkpoint import latest_checkpoint, read_checkpoint

    run_dir = tmp_path / "run"
    proc = paraloop_run(tiny_model_path, run_dir, "--steps", "1000", "--checkpoint-interval", "0")
    try:
        base = wait_for_server(proc, run_dir)
        deadline = time.time() + 60
        while call(f"{base}/control/status")[1]["step"] < 2 and time.time() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        code, _, err = finish(proc)
        assert code == 0, err[-3000:]
        final = read_checkpoint(latest_checkpoint(run_dir))
        assert final.step >= 2 and final.step == read_metrics(run_dir)[-1]["step"]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_swaps_under_load_fail_no_request(tiny_model_path, tmp_path, mode):
    """32 HTTP clients keep generating through 20 adapter swaps: no failure, versions monotone per client, and in
    sync mode no response mixes versions."""
    run_dir = tmp_path / "run"
    proc = paraloop_run(tiny_model_path, run_dir, "--steps", "20", "--mode", mode, "--checkpoint-interval", "0")
    failures, mixed, seen = [], [], {i: [] for i in range(32)}
    stop = threading.Event()
    try:
        base = wait_for_server(proc, run_dir)

        def training() -> bool:  # errors after the last step are the server shutting down, not failures
            rows = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
            return proc.poll() is None and (not rows or rows[-1]["step"] < 20)

        def client(i: int) -> None:
            while not stop.is_set():
                try:
                    status, body = call(f"{base}/v1/completions", "POST",
                                        {"prompt": f"client {i} says", "max_tokens": 6, "temperature": 1.0})
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
            code, _, err = finish(proc, timeout=300)
            stop.set()
        assert code == 0, err[-3000:]
        assert not failures, failures[:3]
        assert read_metrics(run_dir)[-1]["version"] == 20
        for versions in seen.values():
            assert versions == sorted(versions), "a client saw an older adapter after a newer one"
        assert max(max(v) for v in seen.values() if v) >= 10, "clients did not live through the swaps"
        if mode == "sync":
            assert not mixed, f"sync mode mixed versions in a response: {mixed[:3]}"
    finally:
        stop.set()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_failing_actor_ends_the_run_with_its_error(tiny_model_path, tmp_path, monkeypatch, capsys):
    from paraloop.run import main as run
    from paraloop.learn.trainer import Trainer

    original = Trainer.step

    def failing_step(self, batch):
        if self.step_count == 2:
            raise RuntimeError("injected learner failure")
        return original(self, batch)

    monkeypatch.setattr(Trainer, "step", failing_step)
    code = run.main([str(TINY_CONFIG), "--model-path", str(tiny_model_path), "--run-dir", str(tmp_path / "run"),
                     "--port", "0", "--steps", "50", "--no-plot"])
    assert code == 1
    assert "injected learner failure" in capsys.readouterr().err


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "paraloop", "run", str(TINY_CONFIG), "--model-path",
                           str(tmp_path / "missing")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "missing" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "paraloop", "run", str(tmp_path / "nope.toml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "not found" in proc.stderr


def test_a_new_run_never_overwrites_an_earlier_runs_checkpoints(tiny_model_path, tmp_path):
    run_dir = tmp_path / "run"
    code, _, err = finish(paraloop_run(tiny_model_path, run_dir, "--steps", "1", "--no-plot"))
    assert code == 0, err[-3000:]
    before = (run_dir / "checkpoints" / "step_000001" / "trainer_state.json").read_text()
    code, _, err = finish(paraloop_run(tiny_model_path, run_dir, "--steps", "1", "--no-plot"))
    assert code == 2 and "--resume" in err
    assert (run_dir / "checkpoints" / "step_000001" / "trainer_state.json").read_text() == before
