"""`paraloop launch-atropos`: what it starts (plan), and that every child it started stops, whatever happens."""

import argparse
import asyncio
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import procs
from support import free_port
from paraloop.atropos.launch import ProcessGroup, env_argv, make_plan, parse_args

REPO = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("PARALOOP_ATROPOS_VENV", REPO / ".venv-atropos"))


STUBBORN = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print("grandchild", grandchild.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.timeout(60)
def test_a_child_ignoring_sigterm_is_killed_after_the_grace_with_its_own_children():
    out = io.StringIO()

    async def scenario():
        async with ProcessGroup(grace=0.5, out=out) as procs:
            proc = await procs.start("stubborn", [sys.executable, "-c", STUBBORN])
            deadline = time.monotonic() + 30
            while "[stubborn] grandchild" not in out.getvalue():
                assert time.monotonic() < deadline, "the child never started its grandchild"
                await asyncio.sleep(0.05)
            code = await procs.stop("stubborn")
            return proc.pid, code

    pid, code = asyncio.run(scenario())
    grandchild = int(out.getvalue().split("[stubborn] grandchild ")[1].split()[0])
    assert code == -9  # SIGKILL: it ignored SIGTERM
    assert "did not stop within 0.5 s: SIGKILL" in out.getvalue()
    assert procs.gone_soon(pid, within=10) and procs.gone_soon(grandchild, within=10)


@pytest.mark.timeout(60)
def test_each_exit_is_reported_once_with_prefixed_output_and_the_rest_stopped_on_exit():
    out = io.StringIO()

    async def scenario():
        async with ProcessGroup(grace=5, out=out) as procs:
            sleeper = await procs.start("sleeper", [sys.executable, "-c", "import time; time.sleep(120)"])
            await procs.start("quick", [sys.executable, "-c", "print('hello'); print('bye'); raise SystemExit(3)"])
            first = await procs.wait_any()
        return first, sleeper

    (name, code), sleeper = asyncio.run(scenario())
    assert (name, code) == ("quick", 3)
    assert "[quick] hello\n[quick] bye\n" in out.getvalue()
    assert sleeper.returncode == -15 and not procs.alive(sleeper.pid)  # stopped by SIGTERM when the group closed


def write_config(path: Path, *, api_url: str | None, model_dir: Path, port: int = 8123) -> Path:
    atropos = f'[rl_training.atropos]\napi_url = "{api_url}"\n' if api_url else ""
    path.write_text(
        f'[server]\nport = {port}\n[model]\nbase_path = "{model_dir}"\n[rl_training]\ntotal_steps = 3\n{atropos}'
        f'[checkpoint]\ndir = "{path.parent / "run"}"\n'
    )
    return path


def plan_for(argv: list[str]):
    args, extra = parse_args(argv)
    return make_plan(args, extra)


def launch_plan(config: Path, script: Path, *overrides: str, env_flags: tuple[str, ...] = ()):
    """The plan of `paraloop atropos launch --config C --env-script S [--set O ...] [-- ENV_FLAGS]`."""
    argv = ["--config", str(config), "--env-script", str(script), "--atropos-venv", str(VENV)]
    for override in overrides:
        argv += ["--set", override]
    return plan_for([*argv, "--", *env_flags] if env_flags else argv)


def config_and_script(tmp_path: Path, script_name: str) -> tuple[Path, Path]:
    """A config (run-api at :8555, an empty model dir `tmp_path/model`) and an empty environment script."""
    model = tmp_path / "model"
    model.mkdir()
    script = tmp_path / script_name
    script.write_text("")
    return write_config(tmp_path / "c.toml", api_url="http://127.0.0.1:8555", model_dir=model), script


@pytest.mark.atropos
def test_the_plan_points_environments_at_run_api_and_at_paraloop(tmp_path):
    config, script = config_and_script(tmp_path, "env.py")
    plan = launch_plan(config, script, "rl_training.total_steps=7", env_flags=("--env.group_size", "4"))
    assert plan.api_url == "http://127.0.0.1:8555" and plan.run_api == str(VENV / "bin" / "run-api")
    assert plan.trainer[1:] == ["-m", "paraloop", "run", "--config", str(config), "--set", "rl_training.total_steps=7"]
    argv = env_argv(plan, str(script), 8123)
    assert argv[0] == str(VENV / "bin" / "python") and argv[1].endswith("env_shim.py")
    assert argv[2:4] == [str(script), "serve"]
    flags = dict(zip(argv[4::2], argv[5::2], strict=True))
    assert flags["--openai.base_url"] == "http://127.0.0.1:8123/v1"
    assert flags["--openai.server_type"] == "vllm" and flags["--openai.tokenizer_name"] == str(tmp_path / "model")
    assert (
        flags["--env.rollout_server_url"] == "http://127.0.0.1:8555" and flags["--env.total_steps"] == "14"
    )  # twice the run's steps: room for groups dropped as stale
    assert argv[-2:] == ["--env.group_size", "4"]  # the user's flags come last, so they win


@pytest.mark.atropos
def test_eval_every_steps_becomes_the_environments_own_evaluation_cadence(tmp_path):
    """atroposlib calls an environment's evaluate() every steps_per_eval API steps; its evaluate_log writes into
    data_dir_to_save_evals, one dir per script under RUN_DIR/atropos_evals, where paraloop run reads it back."""
    config, script = config_and_script(tmp_path, "gsm8k_server.py")
    plan = launch_plan(config, script, "eval.every_steps=5", env_flags=("--env.steps_per_eval", "7"))
    argv = env_argv(plan, str(script), 8123)
    flags = list(zip(argv[4::2], argv[5::2], strict=True))
    assert ("--env.steps_per_eval", "5") in flags and flags[-1] == ("--env.steps_per_eval", "7"), "the user's wins"
    assert dict(flags)["--env.data_dir_to_save_evals"] == str(tmp_path / "run" / "atropos_evals" / "gsm8k_server")
    plain = launch_plan(config, script)
    argv = env_argv(plain, str(script), 8123)
    assert "--env.steps_per_eval" not in argv and "--env.data_dir_to_save_evals" not in argv


@pytest.mark.parametrize(
    "problem, expected",
    [
        pytest.param("no api_url", "rl_training.atropos.api_url must be set", marks=pytest.mark.atropos),
        pytest.param("no model dir", "model.base_path must be a local model directory", marks=pytest.mark.atropos),
        pytest.param("no env script", "--env-script", marks=pytest.mark.atropos),
        ("no venv", "scripts/setup-atropos-venv.sh"),
    ],
)
def test_plan_errors_name_what_is_missing(tmp_path, monkeypatch, problem, expected):
    monkeypatch.chdir(tmp_path)  # no ./.venv-atropos here
    monkeypatch.delenv("PARALOOP_ATROPOS_VENV", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    model = tmp_path / "model"
    if problem != "no model dir":
        model.mkdir()
    config = write_config(
        tmp_path / "c.toml", api_url=None if problem == "no api_url" else "http://127.0.0.1:1", model_dir=model
    )
    script = tmp_path / "env.py"
    if problem != "no env script":
        script.write_text("")
    venv = str(tmp_path / "no-venv") if problem == "no venv" else str(VENV)
    with pytest.raises((ValueError, FileNotFoundError), match=expected.replace(".", r"\.")):
        plan_for(["--config", str(config), "--env-script", str(script), "--atropos-venv", venv])


def test_parse_args_sends_everything_after_the_double_dash_to_environments():
    args, extra = parse_args(["--config", "c.toml", "--env-script", "a.py", "--env-script", "b.py", "--", "--x", "1"])
    assert args.env_script == ["a.py", "b.py"] and extra == ["--x", "1"]
    assert isinstance(args, argparse.Namespace) and args.server_type == "vllm"


@pytest.mark.atropos
@pytest.mark.timeout(120)
def test_when_a_child_dies_the_launcher_stops_every_other_and_fails(tmp_path):
    """`paraloop run` cannot load an empty model dir: it exits, and run-api and the environment are stopped."""
    model = tmp_path / "empty-model"
    model.mkdir()
    port = free_port()
    config = write_config(tmp_path / "c.toml", api_url=f"http://127.0.0.1:{port}", model_dir=model)
    sleeper_env = tmp_path / "env.py"
    sleeper_env.write_text("import time\ntime.sleep(120)\n")
    argv = [
        sys.executable,
        "-m",
        "paraloop",
        "launch-atropos",
        "--config",
        str(config),
        "--env-script",
        str(sleeper_env),
        "--atropos-venv",
        str(VENV),
        "--grace",
        "3",
        "--no-env-defaults",
    ]
    proc = procs.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    lines = procs.Lines(proc.stdout)
    try:
        proc.wait(timeout=100)
    finally:  # the launcher stops its children on SIGTERM; any it could not stop die with their groups
        procs.kill_group(proc, grace_s=10)
        out = lines.all()
        pids = [
            int(line.split("(pid ")[1].split(")")[0])
            for line in out.splitlines()
            if line.startswith("[launch] started")
        ]
        procs.kill_groups(pids)
    assert proc.returncode != 0, out
    assert len(pids) == 3, out  # run-api, paraloop run, the environment
    assert "[launch] paraloop exited with code" in out and "stopping every child" in out
    assert all(procs.gone_soon(pid, within=10) for pid in pids)


def test_launch_says_once_when_every_environment_has_finished_while_paraloop_runs(monkeypatch):
    """Environments exiting 0 have queued their share; once the last one has, a run still waiting for batches would
    wait for ever, so the launcher says why and what to do (and goes on: paraloop's exit still ends the launch)."""
    import anyio

    from paraloop.atropos import launch

    said: list[str] = []
    exits = [("env0:a", 0), ("env1:b", 0), ("paraloop", 0)]

    class Children:
        def say(self, who: str, what: str) -> None:
            said.append(what)

        async def wait_any(self) -> tuple[str, int]:
            return exits.pop(0)

    async def started(*args, **kwargs) -> None:
        return None

    monkeypatch.setattr(launch, "start_all", started)
    plan = argparse.Namespace(env_scripts=["a.py", "b.py"])
    code = anyio.run(lambda: launch.supervise(Children(), plan, start_timeout=1, env_defaults=True))
    assert code == 0
    every = [i for i, line in enumerate(said) if line.startswith("every environment has finished")]
    assert every == [2], said  # after the second environment's exit, not the first
