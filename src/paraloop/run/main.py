"""`paraloop run config.toml`: the command line of a run: its arguments, the checks before anything loads, and its
exit codes. What the run builds and runs is run/wiring.py.

Exit codes: 0 done (total steps, /control/stop, a first SIGINT/SIGTERM), 1 an actor failed, 2 bad configuration or
input, 3 stalled past stall_timeout, 130 a second SIGINT/SIGTERM or an interrupt.
"""

import argparse
import logging
import sys
from pathlib import Path

import anyio

from paraloop.config import ConfigError
from paraloop.flags import add_config_flags, settings_from_args
from paraloop.plot import plot_run
from paraloop.run.preflight import preflight
from paraloop.run.setup import SetupError
from paraloop.run.watchdog import RunStalled

log = logging.getLogger("paraloop.run")

EXIT_STALLED = 3


def error_of(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="paraloop run", description="serve and train with GRPO in one process")
    parser.add_argument("config_file", nargs="?", help="TOML configuration (same as --config)")
    add_config_flags(parser)
    parser.add_argument("--no-plot", action="store_true", help="do not write RUN_DIR/metrics.png at the end")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check the configuration, the paths it names and the "
        "model's config.json (resolving a Hugging Face id), then exit without loading the model",
    )
    args = parser.parse_args(argv)
    from paraloop.blas import SLOW, log_blas

    slow_blas = log_blas()  # the first line: a CPU run without OpenBLAS is ~40x slower, said before anything else
    try:
        settings = settings_from_args(args, config_path=args.config_file or args.config)
    except ConfigError as e:
        print(f"paraloop: error: {e}", file=sys.stderr)
        return 2
    # Imported here, not at the top: paraloop.distributed imports MLX (a second or more), which --help and a bad
    # configuration never need.
    from paraloop.distributed import launch_rank

    try:
        # before anything loads: a mistake costs a second, not a model load
        model_dir = preflight(settings, follower=launch_rank() > 0)
    except SetupError as e:
        print(f"paraloop: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # e.g. while a Hugging Face download runs
        print("paraloop: interrupted", file=sys.stderr)
        return 130
    if args.dry_run:
        print(f"configuration ok: model {settings.model.base_path} at {model_dir}")
        return 0
    # Imported here, not at the top: the wiring imports MLX, mlx-lm and aiohttp (seconds), which --help, --dry-run
    # and a bad configuration never need.
    from paraloop.run.wiring import run_async

    try:
        anyio.run(run_async, settings)
    except KeyboardInterrupt:
        print("paraloop: interrupted", file=sys.stderr)
        return 130
    except BaseException as e:  # noqa: BLE001 - report the actor's error in one line, exit non-zero
        err = error_of(e)
        if isinstance(err, SetupError):
            print(f"paraloop: error: {err}", file=sys.stderr)
            return 2
        if isinstance(err, KeyboardInterrupt):
            return 130
        if isinstance(err, RunStalled):
            print(f"paraloop: error: {err} (stall_timeout)", file=sys.stderr)
            return EXIT_STALLED
        log.exception("run failed", exc_info=err)
        print(f"paraloop: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    if not args.no_plot and launch_rank() == 0 and (Path(settings.checkpoint.dir) / "metrics.jsonl").is_file():
        try:  # plot_run imports matplotlib, an optional extra
            print(f"wrote {plot_run(settings.checkpoint.dir)}", file=sys.stderr)
        except ImportError:
            print("paraloop: no plot: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        except (OSError, ValueError) as e:  # the run itself succeeded: say why there is no picture, exit 0
            print(f"paraloop: no plot: {e}", file=sys.stderr)
    if slow_blas:  # again at the end, under the tables, where a demo's user looks
        print(f"paraloop: warning: this run was slow for want of OpenBLAS: {SLOW}", file=sys.stderr)
    return 0
