"""scripts/device-check.sh, the parts that run without a GPU: its arguments, its plan, its steps' bookkeeping (a
failed or hung step, what is skipped after it) and the one summary it ends with (scripts/device_summary.py)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import procs

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "device-check.sh"
SUMMARY = REPO / "scripts" / "device_summary.py"
STEPS = ["gpu", "install", "backend", "tests", "models", "bench"]


def check(*args: str, path_first: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    if path_first is not None:
        env["PATH"] = f"{path_first}{os.pathsep}{env['PATH']}"
    return procs.run(["bash", str(SCRIPT), *args], timeout=timeout, env=env)


def fake_nvidia_smi(tmp_path: Path, body: str) -> Path:
    """A bin dir whose nvidia-smi runs `body` (a shell snippet), ahead of any real one."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "nvidia-smi"
    tool.write_text(f"#!/bin/sh\n{body}\n")
    tool.chmod(0o755)
    return bin_dir


def steps(out: Path) -> list[list[str]]:
    return [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "unknown argument: --bogus"),
        (["--backend", "cuda11"], "--backend must be cuda12 or cuda13, not 'cuda11'"),
        (["--backend"], "--backend needs a value"),
        (["--wheels", "--dry-run"], "--wheels needs a value"),
        (["--wheels", "/no/such/dir"], "--wheels: no such folder: /no/such/dir"),
        (["--budget", "ten"], "--budget must be a whole number of seconds >= 60, not 'ten'"),
        (["--budget", "30"], "--budget must be a whole number of seconds >= 60, not '30'"),
        (["--have", "x.txt"], "--have and --part-mb go with --prepare"),
        (["--prepare", "d", "--out", "o"], "--prepare takes --backend, --python, --have, --part-mb only"),
        (["--prepare", "d", "--have", "/no/such/file"], "--have: no such file: /no/such/file"),
        (["--prepare", "d", "--part-mb", "-1"], "--part-mb must be a whole number of MiB, not '-1'"),
        (["--prepare", "d", "--python", "3"], "--python must look like 3.12, not '3'"),
    ],
)
def test_bad_arguments_are_one_error_line_then_the_usage_and_exit_2(args, message):
    done = check(*args)
    assert done.returncode == 2
    first, usage, *rest = done.stderr.splitlines()
    assert first == f"device-check: error: {message}" and usage.startswith("usage: scripts/device-check.sh")
    assert not rest and not done.stdout


def test_prepare_refuses_a_folder_that_is_not_empty(tmp_path):
    (tmp_path / "old.whl").write_text("x")
    done = check("--prepare", str(tmp_path))
    assert done.returncode == 2 and f"--prepare: {tmp_path} exists and is not empty" in done.stderr


def test_help_prints_the_header_and_exits_0():
    done = check("--help")
    assert done.returncode == 0 and "--prepare DIR" in done.stdout and "Budget: 480 s" in done.stdout


def test_dry_run_prints_every_step_of_the_plan(tmp_path):
    online = check("--dry-run", "--backend", "cuda12", "--out", str(tmp_path / "logs"))
    assert online.returncode == 0, online.stderr
    lines = online.stdout.splitlines()
    assert lines[0] == f"device-check (dry run): backend cuda12 (mlx-cuda-12), budget 480 s, logs in {tmp_path}/logs"
    assert [line.split()[0] for line in lines[1:]] == [*STEPS, "summary"]
    assert "from PyPI" in online.stdout and "-e .[cuda12]" in online.stdout
    assert "tests/test_compute_paths.py" in online.stdout and "--only http,learner --quick" in online.stdout
    offline = check("--dry-run", "--wheels", str(tmp_path))
    assert f"offline from {tmp_path}" in offline.stdout and "--no-index" in offline.stdout
    assert not (tmp_path / "logs").exists(), "a dry run writes nothing"


def test_without_a_gpu_the_check_stops_at_the_first_step_and_says_so(tmp_path):
    bin_dir = fake_nvidia_smi(tmp_path, 'echo "NVIDIA-SMI has failed: no driver" >&2; exit 9')
    out = tmp_path / "logs"
    done = check("--out", str(out), "--venv", str(tmp_path / "venv"), path_first=bin_dir)
    assert done.returncode == 1
    assert steps(out) == [
        ["gpu", "failed", steps(out)[0][2], "exit 1: NVIDIA-SMI has failed: no driver"],
        *[[s, "skipped", "0", "an earlier step failed"] for s in STEPS[1:]],
    ]
    assert "== paraloop device check: FAILED" in done.stdout
    assert "failed   gpu" in done.stdout and "skipped  install" in done.stdout
    assert (out / "summary.txt").read_text() in done.stdout
    assert not (tmp_path / "venv").exists(), "nothing was installed"


def test_a_failing_install_is_logged_with_its_last_line_and_the_gpu_facts_are_kept(tmp_path):
    bin_dir = fake_nvidia_smi(tmp_path, 'echo "NVIDIA H200, 580.159.04"')
    out, wheels = tmp_path / "logs", tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "SHA256SUMS").write_text("0" * 64 + "  mlx-0.0-py3-none-any.whl\n")
    (wheels / "mlx-0.0-py3-none-any.whl").write_text("not the wheel that was downloaded")
    done = check(
        "--out", str(out), "--venv", str(tmp_path / "venv"), "--wheels", str(wheels), path_first=bin_dir, timeout=120
    )
    assert done.returncode == 1
    rows = steps(out)
    assert rows[0][:2] == ["gpu", "ok"] and rows[1][:2] == ["install", "failed"]
    assert "does not match" in rows[1][3], "the wheel's checksum is checked before anything installs"
    assert "   gpu: NVIDIA H200\n   driver: 580.159.04\n" in done.stdout


def test_a_step_that_hangs_is_stopped_at_its_limit_and_the_rest_is_skipped(tmp_path):
    bin_dir = fake_nvidia_smi(tmp_path, "sleep 600")
    out = tmp_path / "logs"
    done = check("--out", str(out), "--venv", str(tmp_path / "venv"), path_first=bin_dir, timeout=90)
    assert done.returncode == 1
    rows = steps(out)
    assert rows[0][:2] == ["gpu", "timeout"] and rows[0][3] == "stopped after 15 s"
    assert 15 <= int(rows[0][2]) < 40
    assert [r[1] for r in rows[1:]] == ["skipped"] * 5


# --- the summary ------------------------------------------------------------------------------------------------------


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1"
skipped="2" tests="10" time="93.5"><testcase classname="tests.test_engine" name="test_a[quantized]" time="1"/>
<testcase classname="tests.test_run" name="test_b[quantized]" time="9"><failure message="boom">x</failure></testcase>
</testsuite></testsuites>"""


def write_logs(out: Path, rows: list[str], *, junit: str | None = JUNIT, bench: dict | None = None) -> Path:
    (out / "bench").mkdir(parents=True)
    (out / "facts.txt").write_text(
        "budget_s=480\ngpu=NVIDIA H200\ndriver=580.159.04\nmlx=0.32.4 (mlx-cuda-13 "
        "0.32.4)\nbackend=cuda\npython=3.12.3\n"
    )
    (out / "steps.tsv").write_text("".join(row + "\n" for row in rows))
    if junit is not None:
        (out / "pytest.xml").write_text(junit)
    if bench is not None:
        (out / "bench" / f"{bench['bench']}.json").write_text(json.dumps(bench))
    return out


def summarize(out: Path) -> subprocess.CompletedProcess:
    return procs.run([sys.executable, str(SUMMARY), str(out)], timeout=30)


def test_the_summary_has_the_facts_every_step_the_suite_and_each_benchmark_line(tmp_path):
    bench = {
        "bench": "learner",
        "error": None,
        "lines": [
            {
                "bench": "learner",
                "name": "tiny: GRPO step tokens/s over SFT step (4x64 tokens)",
                "ours": 5120.0,
                "baseline": 4096.0,
                "unit": "tok/s",
            },
            {"bench": "learner", "name": "tiny: MLX peak memory", "ours": 12.5, "baseline": None, "unit": "MiB"},
        ],
    }
    rows = [
        "gpu\tok\t1\t",
        "install\tok\t61\t",
        "backend\tok\t3\t",
        "tests\tfailed\t120\texit 1: 1 failed",
        "models\tskipped\t0\tan earlier step failed",
        "bench\tskipped\t0\tan earlier step failed",
    ]
    done = summarize(write_logs(tmp_path, rows, bench=bench))
    assert done.returncode == 1
    assert done.stdout == (tmp_path / "summary.txt").read_text()
    expected = """== paraloop device check: FAILED
   gpu: NVIDIA H200
   driver: 580.159.04
   python: 3.12.3
   mlx: 0.32.4 (mlx-cuda-13 0.32.4)
   backend: cuda
   budget_s: 480
   time: 185 s of a 480 s budget
-- steps
   ok       gpu             1 s
   ok       install        61 s
   ok       backend         3 s
   failed   tests         120 s  exit 1: 1 failed
   skipped  models          0 s  an earlier step failed
   skipped  bench           0 s  an earlier step failed
-- core suite
   7 passed, 1 failed, 2 skipped in 94 s
   FAILED tests.test_run::test_b[quantized]
-- benchmarks (ours / baseline = ratio)
   learner: tiny: GRPO step tokens/s over SFT step (4x64 tokens): 5,120 tok/s / 4,096 tok/s = 1.25x
   learner: tiny: MLX peak memory: 12.5 MiB / -
"""
    assert done.stdout == expected


def test_a_summary_of_passed_steps_exits_0_and_notes_a_run_over_budget(tmp_path):
    rows = [f"{s}\tok\t90\t" for s in STEPS]
    done = summarize(write_logs(tmp_path, rows, junit=None))
    assert done.returncode == 0
    assert done.stdout.startswith("== paraloop device check: PASSED\n")
    assert "time: 540 s of a 480 s budget (OVER)" in done.stdout and "-- core suite" not in done.stdout


def test_the_summary_names_a_broken_report_and_a_benchmark_error(tmp_path):
    rows = ["gpu\tok\t1\t", "bench\ttimeout\t300\tstopped after 300 s"]
    done = summarize(
        write_logs(
            tmp_path,
            rows,
            junit="<testsuites><oops",
            bench={"bench": "http", "error": "BenchTimeout: over its hard time limit\ntraceback...", "lines": []},
        )
    )
    assert done.returncode == 1
    assert "   unreadable pytest.xml: " in done.stdout
    assert "   http: ERROR BenchTimeout: over its hard time limit\n" in done.stdout
    assert "timeout  bench         300 s  stopped after 300 s" in done.stdout


def test_the_summary_of_a_dir_that_is_no_log_dir_is_exit_2(tmp_path):
    done = summarize(tmp_path)
    assert done.returncode == 2 and "has no steps.tsv" in done.stderr
    assert procs.run([sys.executable, str(SUMMARY)], timeout=30).returncode == 2


def test_stopping_the_check_stops_the_step_it_is_running(tmp_path):
    """A step runs in a process group of its own (`timeout`): SIGTERM to the check ends it too, not 15 s later."""
    pid_file = tmp_path / "pid"
    bin_dir = fake_nvidia_smi(tmp_path, f"echo $$ > {pid_file}; exec sleep 600")
    out = tmp_path / "logs"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": sys.executable}
    cmd = ["bash", str(SCRIPT), "--out", str(out), "--venv", str(tmp_path / "venv")]
    with procs.running(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        deadline = time.monotonic() + 30
        while not (pid_file.is_file() and pid_file.read_text().strip()):
            assert time.monotonic() < deadline and proc.poll() is None, "the gpu step never started"
            time.sleep(0.05)
        step_pid = int(pid_file.read_text())
        proc.terminate()
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 130 and "device-check: stopped" in err
    deadline = time.monotonic() + 10
    while Path(f"/proc/{step_pid}").exists():
        assert time.monotonic() < deadline, "the step outlived the check"
        time.sleep(0.05)
