"""`paraloop launch-atropos`: run-api, `paraloop run` and Atropos environment processes, started and stopped together.

    paraloop launch-atropos --config configs/atropos.toml --env-script gsm8k_server.py [--set K=V] [-- env flags]

In: a paraloop config (rl_training.atropos.api_url: where run-api listens; server.host/port: where paraloop serves
/generate, port 0 is read back from RUN_DIR/server.json; model.base_path: the tokenizer environments load) and
environment scripts (BaseEnv subclasses with atroposlib's `serve` CLI), which get the flags pointing them at run-api
and at paraloop, then the user's flags after `--` (run through env_shim.py, so a script with a single server config
honours --openai.base_url too). run-api and the environments run from the Atropos venv
(--atropos-venv, $PARALOOP_ATROPOS_VENV, ./.venv-atropos, or run-api on PATH); `paraloop run` from this Python.
Out: every child's output line by line on stdout, prefixed with its name. Stops: when `paraloop run` exits, when
run-api or an environment fails (an environment exiting 0 has queued its share: training goes on), on SIGINT or
SIGTERM. Every child's process group then gets SIGTERM, and SIGKILL after --grace seconds. Exit code: `paraloop
run`'s when it ended first, 1 (or the child's code) when another child failed, 128 + signal on a signal.
"""

import argparse
import contextlib
import functools
import json
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import anyio

from paraloop.atropos.evals import EVAL_DIR
from paraloop.children import Child, Children

# Defaults for every child; a variable already set in the launcher's environment wins (HF_HUB_OFFLINE=0 lets an
# environment download its data set, e.g. GSM8K, on first use).
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}


class ProcessGroup(Children):
    """The launcher's children (paraloop.children): each gets CHILD_ENV under the launcher's own environment, and
    Python children write unbuffered, so their lines come out as they are printed."""

    async def start(self, name: str, argv: list[str], *, env: dict[str, str] | None = None, **options: Any) -> Child:
        """`env`: variables on top of the launcher's environment (not the whole of it, as for Children)."""
        env = {**CHILD_ENV, **os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        return await super().start(name, argv, env=env, **options)


async def wait_http(url: str, *, proc: Child | None = None) -> None:
    """Poll GET url until it answers below 500 (bound it with a deadline); RuntimeError if `proc` exits first."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while True:
            if proc is not None and proc.returncode is not None:
                raise RuntimeError(f"exited with code {proc.returncode} before {url} answered")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url) as resp:
                    if resp.status < 500:
                        return
            await anyio.sleep(0.2)


async def start_run_api(procs: ProcessGroup, run_api: str, api_url: str) -> None:
    """Start run-api as child "api" listening where api_url says; return once it answers GET /."""
    parts = urlsplit(api_url)
    proc = await procs.start("api", [run_api, "--host", str(parts.hostname), "--port", str(parts.port)])
    try:
        await wait_http(api_url.rstrip("/") + "/", proc=proc)
    except RuntimeError as e:
        raise RuntimeError(f"run-api {e}") from None


async def wait_server_port(server_json: Path, proc: Child) -> int:
    """The port `paraloop run` bound (server.port = 0): it writes RUN_DIR/server.json with its pid once serving."""
    while True:
        if proc.returncode is not None:
            raise RuntimeError(f"paraloop run exited with code {proc.returncode} before it served")
        with contextlib.suppress(OSError, ValueError):
            info = json.loads(await anyio.to_thread.run_sync(server_json.read_text))
            if info.get("pid") == proc.pid:  # not a file left by an earlier run
                return int(info["port"])
        await anyio.sleep(0.2)


# --- the command --------------------------------------------------------------------------------------------------


def find_atropos(venv: str | None) -> tuple[str, str]:
    """(run-api executable, python of the Atropos venv), or raise FileNotFoundError saying where it looked."""
    candidates = [venv, os.environ.get("PARALOOP_ATROPOS_VENV"), ".venv-atropos"]
    for root in filter(None, candidates):
        run_api, python = Path(root) / "bin" / "run-api", Path(root) / "bin" / "python"
        if run_api.is_file() and python.is_file():
            return str(run_api), str(python)
    on_path = shutil.which("run-api")
    if on_path:
        python = Path(on_path).parent / "python"
        return on_path, str(python) if python.is_file() else sys.executable
    looked = ", ".join(str(c) for c in filter(None, candidates))
    raise FileNotFoundError(
        f"no Atropos venv with run-api in {looked}, and no run-api on PATH: run scripts/setup-atropos-venv.sh "
        "or pass --atropos-venv DIR"
    )


@dataclass(frozen=True)
class Plan:
    """What to start, resolved and checked before anything starts."""

    api_url: str
    run_api: str
    trainer: list[str]
    env_python: str
    env_scripts: list[str]
    env_flags: list[str]  # everything but --openai.base_url, known once paraloop's port is
    server_host: str
    server_port: int  # 0: read it from server_json once `paraloop run` serves
    server_json: Path
    eval_dir: Path | None = None  # [eval]: each environment's evaluate_log writes under eval_dir/<script>


ENV_STEPS_HEADROOM = 2
"""Environments are told to queue this many times the run's steps: groups the run drops as stale (max_staleness)
count against an environment's total_steps too (run-api counts the batches it hands out), and the run fetches until
it has trained total_steps. What is left unfetched when the run ends costs nothing: launch stops every child then."""


def make_plan(args: argparse.Namespace, extra: list[str]) -> Plan:
    from paraloop.config import load_config  # pydantic is slow to import; --help stays fast
    from paraloop.flags import overrides_from_args

    settings = load_config(args.config, overrides_from_args(argparse.Namespace(set=args.set)))
    api_url = settings.rl_training.atropos.api_url
    if not api_url:
        raise ValueError(f"{args.config}: rl_training.atropos.api_url must be set (e.g. http://127.0.0.1:8001)")
    parts = urlsplit(api_url)
    if parts.hostname is None or parts.port is None:
        raise ValueError(f"rl_training.atropos.api_url {api_url!r} needs a host and a port")
    model_dir = settings.model.base_path
    if not args.no_env_defaults and not (model_dir and Path(model_dir).is_dir()):
        from paraloop.model import ModelNotFoundError, resolve_model_path

        # A Hugging Face repo id becomes its local snapshot, found as paraloop run finds it: environments load the
        # tokenizer from there, offline.
        try:
            model_dir = str(resolve_model_path(model_dir or "", revision=settings.model.revision))
        except ModelNotFoundError as e:
            raise ValueError(
                f"model.base_path must be a local model directory or a Hugging Face repo id "
                f"(environments load its tokenizer): {e}"
            ) from None
    for script in args.env_script:
        if not Path(script).is_file():
            raise FileNotFoundError(f"--env-script {script}: no such file")
    run_api, env_python = find_atropos(args.atropos_venv)
    trainer = [sys.executable, "-m", "paraloop", "run", "--config", args.config]
    trainer += [flag for item in args.set for flag in ("--set", item)]
    env_flags = (
        extra
        if args.no_env_defaults
        else [
            "--env.rollout_server_url",
            api_url,
            "--env.tokenizer_name",
            str(model_dir),
            "--env.use_wandb",
            "false",
            "--env.total_steps",
            str(ENV_STEPS_HEADROOM * settings.rl_training.total_steps),
            "--openai.server_type",
            args.server_type,
            "--openai.model_name",
            settings.server.served_model_name or Path(str(settings.model.base_path)).name,
            "--openai.tokenizer_name",
            str(model_dir),
            "--openai.api_key",
            settings.server.control_token or "x",
            # [eval] every_steps: atroposlib runs each environment's own evaluate() on that cadence of API steps
            *(["--env.steps_per_eval", str(settings.eval.every_steps)] if settings.eval.every_steps else []),
            *extra,
        ]
    )
    host = "127.0.0.1" if settings.server.host in ("0.0.0.0", "::") else settings.server.host
    return Plan(
        api_url=api_url,
        run_api=run_api,
        trainer=trainer,
        env_python=env_python,
        env_scripts=list(args.env_script),
        env_flags=env_flags,
        server_host=host,
        server_port=settings.server.port,
        server_json=Path(settings.checkpoint.dir) / "server.json",
        eval_dir=Path(settings.checkpoint.dir) / EVAL_DIR
        if settings.eval.every_steps and not args.no_env_defaults
        else None,
    )


ENV_SHIM = Path(__file__).with_name("env_shim.py")


def env_argv(plan: Plan, script: str, port: int, *, defaults: bool = True) -> list[str]:
    """`python env_shim.py script serve ...`: every BaseEnv's CLI, pointed at run-api and at paraloop's /generate
    (through env_shim.py, so environments with a single server config honour --openai.base_url too)."""
    base_url = ["--openai.base_url", f"http://{plan.server_host}:{port}/v1"] if defaults else []
    if defaults and plan.eval_dir is not None:  # read back by paraloop run (atropos/evals.py)
        base_url += ["--env.data_dir_to_save_evals", str(plan.eval_dir.resolve() / Path(script).stem)]
    return [plan.env_python, str(ENV_SHIM), script, "serve", *base_url, *plan.env_flags]


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ours, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(
        prog="paraloop launch-atropos",
        description="Start Atropos run-api, environment processes and `paraloop run` together; stop them together. "
        "Arguments after `--` go to every environment script.",
    )
    p.add_argument("--config", required=True, help="paraloop TOML config (rl_training.atropos.api_url must be set)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, here and in `paraloop run` (e.g. --set server.port=8010)",
    )
    p.add_argument(
        "--env-script",
        action="append",
        default=[],
        metavar="PATH",
        help="an Atropos environment script (BaseEnv.cli()); repeat for several",
    )
    p.add_argument("--atropos-venv", help="venv holding atroposlib (default: $PARALOOP_ATROPOS_VENV, ./.venv-atropos)")
    p.add_argument(
        "--server-type",
        choices=("vllm", "openai"),
        default="vllm",
        help="how environments call paraloop: vllm = POST /generate with token ids (default; tokens, "
        "masks and logprobs come from the server), openai = /v1/chat/completions",
    )
    p.add_argument(
        "--no-env-defaults", action="store_true", help="pass environment scripts only the arguments after `--`"
    )
    p.add_argument(
        "--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL when stopping (default 10)"
    )
    p.add_argument(
        "--start-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for run-api, and for `paraloop run` to serve (loading a model; default 600)",
    )
    return p.parse_args(ours), extra


async def launch(plan: Plan, *, grace: float, start_timeout: float, env_defaults: bool = True) -> int:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with ProcessGroup(grace=grace) as procs:
            received: list[int] = []
            with anyio.CancelScope() as supervising:
                procs.start_soon(cancel_on_signal, signals, supervising, received)
                return await supervise(procs, plan, start_timeout=start_timeout, env_defaults=env_defaults)
            procs.say("launch", f"got signal {received[0]}: stopping every child")
            return 128 + received[0]


async def cancel_on_signal(signals: AsyncIterator[int], scope: anyio.CancelScope, received: list[int]) -> None:
    async for sig in signals:
        received.append(sig)
        scope.cancel()
        return


async def supervise(procs: ProcessGroup, plan: Plan, *, start_timeout: float, env_defaults: bool) -> int:
    """Start everything, then wait: `paraloop run` ending ends the launch with its exit code; run-api or an
    environment failing ends it with 1. An environment that finishes cleanly (its total_steps are queued) does not."""
    await start_all(procs, plan, start_timeout=start_timeout, env_defaults=env_defaults)
    running = len(plan.env_scripts)
    while True:
        name, code = await procs.wait_any()
        if name.startswith("env") and code == 0:
            procs.say("launch", f"{name} finished (exit code 0); paraloop goes on with what is queued")
            running -= 1
            if not running:
                procs.say(
                    "launch",
                    "every environment has finished: if paraloop waits for batches, none will come "
                    "(its steps dropped more groups than --env.total_steps left room for); stop it with "
                    "Ctrl-C (a final checkpoint is written) and give the environments more steps after --",
                )
            continue
        procs.say("launch", f"{name} exited with code {code}: stopping every child")
        return code if name == "paraloop" else max(1, code)


async def start_all(procs: ProcessGroup, plan: Plan, *, start_timeout: float, env_defaults: bool) -> None:
    with anyio.fail_after(start_timeout):
        await start_run_api(procs, plan.run_api, plan.api_url)
    trainer = await procs.start("paraloop", plan.trainer)
    port = plan.server_port
    if port == 0 and plan.env_scripts:
        with anyio.fail_after(start_timeout):
            port = await wait_server_port(plan.server_json, trainer)
        procs.say("launch", f"paraloop serves on port {port}")
    for i, script in enumerate(plan.env_scripts):
        await procs.start(f"env{i}:{Path(script).stem}", env_argv(plan, script, port, defaults=env_defaults))


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        plan = make_plan(args, extra)
        return anyio.run(
            functools.partial(
                launch, plan, grace=args.grace, start_timeout=args.start_timeout, env_defaults=not args.no_env_defaults
            )
        )
    except (ValueError, OSError, TimeoutError, RuntimeError) as e:
        print(f"paraloop launch-atropos: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
