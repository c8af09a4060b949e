"""`paraloop show-checkpoint`: a run's checkpoints (steps, metrics, sizes, latest), or one checkpoint.

    paraloop show-checkpoint DIR [--no-verify]

DIR: a run dir, its checkpoints/ dir, or one step dir. Every checkpoint is checked against its manifest
(sizes and sha256; --no-verify checks sizes only). A damaged checkpoint is listed with the file that is bad,
and the command ends with one `paraloop: error: ...` line and exit code 2, as for a DIR with no checkpoint.
The predecessor's step_N dirs (an adapter, no trainer state) are described as such: its step, the LoRA layout of
its arrays, where the scale comes from, and its metadata files.
"""

import json
from pathlib import Path
from typing import Any

from paraloop.tools import ERRORS, ArgumentParser, fail, parse


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="paraloop show-checkpoint", description="Summarise a run's checkpoints.")
    parser.add_argument("dir", type=Path, help="run dir, its checkpoints/ dir, or a step_N dir")
    parser.add_argument("--no-verify", action="store_true", help="check file sizes only, not sha256")
    return parser


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def format_metrics(metrics: Any) -> str:
    if not isinstance(metrics, dict):
        return ""
    parts = []
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


def show_one(path: Path, *, verify: bool) -> None:
    from paraloop.checkpoint import verify_checkpoint

    state = verify_checkpoint(path, hashes=verify)
    print(f"checkpoint {path}")
    for key in ("step", "version", "written_at", "paraloop_version", "adapter_format"):
        if key in state:
            print(f"  {key}: {state[key]}")
    if state.get("source_state"):  # where the rollout source stands (the mock environment's next prompt group)
        print(f"  source_state: {json.dumps(state['source_state'], sort_keys=True)}")
    print(f"  metrics: {format_metrics(state.get('metrics')) or '-'}")
    print("  files:")
    for name, entry in state["files"].items():
        print(f"    {name:28s} {human_size(entry['bytes']):>10s}  sha256 {entry['sha256'][:12]}")
    model = (state.get("config") or {}).get("model") or {}
    if isinstance(model, dict) and model.get("base_path"):  # what `paraloop merge --base-model` needs
        print(f"  base model: {model['base_path']}")


def show_run(path: Path, *, verify: bool) -> list[str]:
    """Print one line per checkpoint; return the problems found (one line each)."""
    from paraloop.checkpoint import (
        INITIAL_ADAPTER,
        CheckpointError,
        checkpoints_dir,
        latest_checkpoint,
        list_checkpoints,
        verify_checkpoint,
    )

    ckdir = checkpoints_dir(path)
    steps = list_checkpoints(ckdir)
    initial = ckdir / INITIAL_ADAPTER
    if not steps and not initial.is_dir():
        raise FileNotFoundError(f"{path}: no checkpoints (expected a run dir, its checkpoints/ dir or a step_N dir)")
    latest = latest_checkpoint(ckdir)
    print(f"checkpoints in {ckdir}")
    if initial.is_dir():
        print(f"  {INITIAL_ADAPTER:16s} {human_size(dir_size(initial)):>10s}")
    from paraloop.predecessor import find_predecessor_step, is_predecessor_step

    latest = latest or find_predecessor_step(ckdir)
    problems = []
    for step_dir in steps:
        mark = "*" if step_dir == latest else " "
        if is_predecessor_step(step_dir):
            print(f"{mark} {step_dir.name:16s} {human_size(dir_size(step_dir)):>10s}  predecessor (adapter only)")
            continue
        try:
            state = verify_checkpoint(step_dir, hashes=verify)
        except CheckpointError as e:
            problems.append(str(e))
            print(f"{mark} {step_dir.name:16s} {human_size(dir_size(step_dir)):>10s}  DAMAGED: {e}")
            continue
        version = f"v{state.get('version', '?')}"
        metrics = format_metrics(state.get("metrics"))
        print(f"{mark} {step_dir.name:16s} {human_size(dir_size(step_dir)):>10s}  {version:>6s}  {metrics}")
    print(f"latest: {latest.name if latest else 'none'}")
    if latest is not None and is_predecessor_step(latest):
        print(f"  --resume {path} starts at its step with a fresh optimizer (`show-checkpoint {latest}` for more)")
    return problems


def main(argv: list[str]) -> int:
    args = parse(build_parser(), argv)
    if isinstance(args, int):
        return args
    from paraloop.checkpoint import STEP_DIR, TRAINER_STATE
    from paraloop.predecessor import describe, is_predecessor_step

    path: Path = args.dir
    try:
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such directory")
        if is_predecessor_step(path):
            print(f"checkpoint {path}")
            print("\n".join(f"  {line}" for line in describe(path)))
            return 0
        if (path / TRAINER_STATE).exists() or STEP_DIR.fullmatch(path.name):
            show_one(path, verify=not args.no_verify)
            return 0
        problems = show_run(path, verify=not args.no_verify)
    except ERRORS as e:
        return fail(e)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return fail(f"damaged checkpoint: {problems[0]}{more}")
    return 0
