"""Command-line tools around adapters and checkpoints: `paraloop merge`, `convert-adapter`, `show-checkpoint`.

Each tool is a module with `main(argv) -> int` (argv: the arguments after the verb); paraloop.cli dispatches.
Shared here: the argument parser that raises instead of printing a usage block, the one-line error convention
(`paraloop: error: ...` on stderr, exit code 2, never a traceback), and finding the adapter a path points at.
"""

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from paraloop.checkpoint import TRAINER_STATE, find_checkpoint, verify_checkpoint
from paraloop.lora import NPZ_NAME, SAFETENSORS_NAME

ERRORS = (OSError, ValueError, KeyError)  # CheckpointError is a ValueError


class UsageError(Exception):
    pass


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)  # one line instead of argparse's usage block


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace | int:
    """Parsed arguments, or the exit code to return: 0 after --help, 2 after a usage error (printed)."""
    try:
        return parser.parse_args(argv)
    except UsageError as e:
        return fail(e)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0


def fail(error: BaseException | str) -> int:
    message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    print(f"paraloop: error: {message}", file=sys.stderr)
    return 2


def resolve_adapter(path: str | Path) -> Path:
    """The adapter `path` points at: an adapter file (.safetensors / .npz), an adapter dir, a checkpoint step
    dir (verified against its manifest), or a run dir / checkpoints dir (-> its latest checkpoint, or, in the
    predecessor's checkpoint dir, its highest step_N)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"adapter not found: {path}")
    if path.is_file():
        if path.suffix not in (".safetensors", ".npz"):
            raise ValueError(f"{path}: not an adapter file (expected .safetensors or .npz)")
        return path
    if not ((path / SAFETENSORS_NAME).is_file() or (path / NPZ_NAME).is_file() or (path / TRAINER_STATE).exists()):
        from paraloop.predecessor import find_predecessor_step

        path = find_predecessor_step(path) or find_checkpoint(path)
    if (path / TRAINER_STATE).exists():
        verify_checkpoint(path)
    return path
