"""Command-line flags that override configuration keys (the predecessor's flag names, kept for its users).

Only flags the user actually gave become overrides (argparse SUPPRESS defaults): a flag's default can never
silently beat a TOML value, the predecessor's bug. `--set section.key=value` reaches every other key.
"""

import argparse
import json
import typing
from typing import Any, Literal

from paraloop.config import ConfigError, Settings, load_config, set_dotted

# flag -> (dotted config key, value parser, help)
FLAGS: dict[str, tuple[str, Any, str]] = {
    "--model-path": ("model.base_path", str, "model directory or Hugging Face repo id"),
    "--revision": ("model.revision", str, "branch, tag or commit of a Hugging Face repo id"),
    "--adapter": (
        "model.lora_path",
        str,
        "adapter to start from (run) or serve (serve): an adapter dir or file, a checkpoint, or a run dir",
    ),
    "--auto-init-lora": ("model.auto_init_lora", "bool", "attach fresh LoRA layers when no adapter is given"),
    "--compute": (
        "model.compute",
        str,
        "how the frozen base computes (auto: float32 on the CPU, 4-bit kernels on Metal/CUDA)",
    ),
    "--lora-rank": ("rl_training.lora.rank", int, "LoRA rank"),
    "--lora-layers": ("rl_training.lora.num_layers", int, "blocks with LoRA, counted from the last (-1: all)"),
    "--lora-dropout": ("rl_training.lora.dropout", float, "LoRA dropout while training"),
    "--lora-scale": ("rl_training.lora.scale", float, "LoRA scale"),
    "--algorithm": ("rl_training.algorithm", str, "policy-gradient algorithm (docs/training.md)"),
    "--steps": ("rl_training.total_steps", int, "learner steps"),
    "--batch-size": ("rl_training.batch_size", int, "sequences per learner step"),
    "--learning-rate": ("rl_training.learning_rate", float, "AdamW learning rate"),
    "--update-epochs": ("rl_training.update_epochs", int, "optimizer passes per batch"),
    "--kl-beta": ("rl_training.kl_beta", float, "KL penalty weight"),
    "--kl-estimator": ("rl_training.kl_estimator", str, "KL estimator"),
    "--ref-ema": ("rl_training.ref_ema", float, "reference adapter EMA (1.0: frozen)"),
    "--entropy-weight": ("rl_training.entropy_weight", float, "entropy bonus weight"),
    "--clip-ratio": ("rl_training.clip_ratio", float, "PPO clip epsilon"),
    "--max-tokens": ("rl_training.max_tokens", int, "rollout generation cap"),
    "--token-budget": ("rl_training.token_budget", int, "most tokens per micro-batch"),
    "--max-memory-gb": ("rl_training.max_memory_gb", float, "learner memory target (GiB)"),
    "--mode": ("rl_training.mode", str, "sync: generation waits for the learner; async: it overlaps"),
    "--max-staleness": (
        "rl_training.max_staleness",
        int,
        "most versions a rollout may lag (async; Atropos in both modes)",
    ),
    "--seed": ("rl_training.seed", int, "random seed"),
    "--task": ("rl_training.mock.task", str, "mock environment task, module:function"),
    "--group-size": ("rl_training.mock.group_size", int, "mock environment completions per prompt"),
    "--atropos-url": ("rl_training.atropos.api_url", str, "Atropos API URL (unset: mock environment)"),
    "--checkpoint-dir": ("checkpoint.dir", str, "run directory"),
    "--run-dir": ("checkpoint.dir", str, "run directory (same as --checkpoint-dir)"),
    "--checkpoint-interval": ("checkpoint.interval", int, "checkpoint every N steps"),
    "--save-every-step": ("checkpoint.save_every_step", "bool", "checkpoint after every step"),
    "--adapter-format": ("checkpoint.adapter_format", str, "adapter files written in checkpoints"),
    "--keep-last": ("checkpoint.keep_last", int, "keep the newest N checkpoints"),
    "--resume": ("checkpoint.resume", str, "run directory or checkpoint to resume from"),
    "--host": ("server.host", str, "HTTP bind address"),
    "--port": ("server.port", int, "HTTP port"),
    "--control-token": ("server.control_token", str, "bearer token for /control (and every route but /health)"),
    "--served-model-name": ("server.served_model_name", str, "model name reported by /v1/models"),
    "--diverse-mode": (
        "engine.diverse_mode",
        "bool",
        "the predecessor's flag: no effect (samples are always independent)",
    ),
    "--lora-modules": ("server.lora_modules", "name=path", "named adapters served beside the policy (vLLM's flag)"),
    "--max-loras": ("server.max_loras", int, "most named adapters loaded at once"),
    "--max-lora-rank": ("server.max_lora_rank", int, "highest rank of a named adapter"),
}


# Other spellings of a flag, accepted everywhere the flag is: the predecessor's and mlx-lm's names for an adapter.
ALIASES: dict[str, tuple[str, ...]] = {"--adapter": ("--adapter-path", "--lora-path")}
SEE_ALSO = (
    "every key, its default and its environment variable: `paraloop config show [FILE]` (the resolved values) "
    "and docs/configuration.md. Precedence: flag > PARALOOP_SECTION__KEY > TOML file > default."
)


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_name_path(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def _field(key: str) -> Any:
    """The pydantic field of a dotted key, for its default and allowed values."""
    model: Any = Settings
    *sections, leaf = key.split(".")
    for name in sections:
        model = model.model_fields[name].annotation
    return model.model_fields[leaf]


def flag_help(key: str, help_: str) -> str:
    """The flag's help with its key, its default and, for a choice, the allowed values (argparse %-escaped)."""
    try:
        field = _field(key)
    except KeyError:  # a predecessor's key accepted and dropped with a warning (engine.diverse_mode)
        return f"{help_} [{key}]".replace("%", "%%")
    default = field.get_default(call_default_factory=True)
    choices = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is Literal else ()
    allowed = f"; one of {', '.join(map(str, choices))}" if choices else ""
    shown = "unset" if default is None or default == {} or default == [] else repr(default)
    return f"{help_} [{key}; default {shown}{allowed}]".replace("%", "%%")


def add_config_flags(parser: argparse.ArgumentParser, *, only: tuple[str, ...] | None = None) -> None:
    """Add `--config`, `--set` and the override flags (all, or only the flags named in `only`), each with its key,
    default and allowed values in its help, and a pointer to `paraloop config show` in the parser's epilog."""
    parser.add_argument("--config", help="TOML configuration file (its relative paths are relative to the file)")
    group = parser.add_argument_group("configuration overrides (beat the environment and the TOML file)")
    for flag, (key, kind, help_) in FLAGS.items():
        if only and flag not in only:
            continue
        names, dest, text = (flag, *ALIASES.get(flag, ())), flag.lstrip("-").replace("-", "_"), flag_help(key, help_)
        if kind == "bool":
            group.add_argument(
                *names,
                dest=dest,
                type=parse_bool,
                nargs="?",
                const=True,
                default=argparse.SUPPRESS,
                metavar="BOOL",
                help=text,
            )
        elif kind == "name=path":
            group.add_argument(
                *names,
                dest=dest,
                type=parse_name_path,
                nargs="+",
                action="extend",
                default=argparse.SUPPRESS,
                metavar="NAME=PATH",
                help=text,
            )
        else:
            group.add_argument(*names, dest=dest, type=kind, default=argparse.SUPPRESS, help=text)
    parser.epilog = SEE_ALSO
    group.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any key, e.g. --set rl_training.lora.keys='[\"self_attn.q_proj\"]'",
    )


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The nested override dict holding only what was given on the command line."""
    tree: dict[str, Any] = {}
    given = vars(args)
    for flag, (key, _, _) in FLAGS.items():
        dest = flag.lstrip("-").replace("-", "_")
        if dest in given:
            value = given[dest]
            tree = set_dotted(tree, key, dict(value) if FLAGS[flag][1] == "name=path" else value)
    for item in given.get("set") or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        tree = set_dotted(tree, key.strip(), value)
    return tree


def settings_from_args(args: argparse.Namespace, *, config_path: str | None = None) -> Settings:
    return load_config(config_path if config_path is not None else args.config, overrides_from_args(args))
