"""What `paraloop run` checks before it loads anything, so that a mistake costs a second, not a model load.

In: the resolved Settings. Out: the model's local directory (a Hugging Face repo id is resolved here: from the
cache, or downloaded now), or SetupError listing every problem found, each naming its keys and a fix. Reads only
small files (the model's config.json, the reward task's module); settings that are consistent but surprising are
logged as warnings. `paraloop run --dry-run` runs only this.
"""

import json
import logging
import math
from pathlib import Path

from paraloop.config import Settings
from paraloop.run.setup import SetupError

log = logging.getLogger("paraloop.run")


def preflight(settings: Settings, *, follower: bool = False) -> Path:
    """Check the configuration, the paths it names and the model's config.json; return the model directory.
    `follower`: a rank > 0 of a distributed run, which takes the checkpoint or adapter to start from from rank 0
    (so their paths need not exist on its machine)."""
    problems = settings_problems(settings, follower=follower)
    if problems:
        raise SetupError("; ".join(problems))
    model_dir = resolve_model(settings)
    problems = model_problems(settings, model_dir)
    if problems:
        raise SetupError("; ".join(problems))
    return model_dir


def settings_problems(settings: Settings, *, follower: bool = False) -> list[str]:
    """Contradictions between keys, and the files the keys name; the model is not looked at."""
    rl, model, ckpt = settings.rl_training, settings.model, settings.checkpoint
    problems = []
    if not model.base_path:
        problems.append("model.base_path is not set (TOML [model] base_path, or --model-path)")
    if ckpt.resume and model.lora_path:
        problems.append(
            "checkpoint.resume and model.lora_path are both set: a resumed run continues its checkpoint's adapter, "
            "so lora_path would be ignored; drop one (--set model.lora_path=null)"
        )
    from paraloop.checkpoint import list_checkpoints

    if follower:
        pass  # the run dir's checkpoints, resume and lora_path are rank 0's
    elif not ckpt.resume and list_checkpoints(ckpt.dir):  # run_async checks this again; here it is found by --dry-run
        problems.append(
            f"checkpoint.dir: {ckpt.dir} already holds checkpoints of an earlier run: continue it with "
            f"--resume {ckpt.dir}, or give another --run-dir (nothing is overwritten)"
        )
    paths = [
        ("checkpoint.resume", ckpt.resume),
        ("model.lora_path", model.lora_path),
        *((f"server.lora_modules.{name}", path) for name, path in settings.server.lora_modules.items()),
    ]
    for key, value in paths:
        if value and not follower and not Path(value).exists():
            problems.append(f"{key}: {value}: no such file or directory")
    if settings.server.lora_modules and rl.train_mode == "full":
        problems.append(
            "server.lora_modules: named LoRA adapters are served beside a LoRA policy only; this run "
            "trains every weight (rl_training.train_mode = 'full')"
        )
    if rl.train_mode == "lora" and not (ckpt.resume or model.lora_path or model.auto_init_lora):
        problems.append(
            "nothing to train: set model.auto_init_lora = true or model.lora_path "
            "(or rl_training.train_mode = 'full' on a non-quantized model)"
        )
    if rl.train_mode == "full" and rl.kl_beta > 0:
        problems.append(
            "rl_training.kl_beta > 0 needs a reference adapter, and train_mode = 'full' keeps none "
            "(paraloop never holds a second copy of the model): set rl_training.kl_beta = 0"
        )
    if rl.rollout_source == "mock":
        problems += mock_problems(settings)
    if rl.rollout_source == "sessions" and settings.distill.teacher:
        problems.append(
            "[distill] teacher: not supported with rl_training.source = 'sessions' yet (a session's group is journaled "
            "before a teacher could score it, so a resumed run would train it unscored)"
        )
    if rl.rollout_source == "sessions" and rl.sessions.group_size > rl.batch_size:
        problems.append(
            f"rl_training.sessions.group_size = {rl.sessions.group_size} sessions can never fit a batch of "
            f"rl_training.batch_size = {rl.batch_size} sequences (groups are never split)"
        )
    problems += eval_problems(settings)
    return problems


def eval_problems(settings: Settings) -> list[str]:
    """[eval]: the task's held-out split and the engine's limits, when the built-in evaluation will run."""
    if not settings.eval.every_steps or (settings.rl_training.rollout_source != "mock" and not settings.eval.task):
        return []
    from paraloop.config import ConfigError
    from paraloop.evaluation import eval_plan

    try:
        eval_plan(settings)
    except ConfigError as e:
        return [str(e)]
    return []


def mock_problems(settings: Settings) -> list[str]:
    """The built-in mock environment's batches, requests and task (Atropos environments are checked per batch)."""
    rl, engine = settings.rl_training, settings.engine
    group, batch = rl.mock.group_size, rl.batch_size
    problems = []
    if batch % group:
        fixes = [f"--batch-size {math.ceil(batch / group) * group}"]
        divisors = [d for d in range(min(group, batch), 1, -1) if batch % d == 0]
        fixes += [f"--group-size {divisors[0]}"] if divisors else []
        problems.append(
            f"rl_training.batch_size ({batch}) must be a multiple of rl_training.mock.group_size ({group}): a batch "
            f"counts sequences and holds whole groups of completions of one prompt ({' or '.join(fixes)})"
        )
    if group > engine.max_n:
        problems.append(
            f"rl_training.mock.group_size ({group}) is more than engine.max_n ({engine.max_n}), the most "
            "completions one request may ask for: lower it or raise engine.max_n"
        )
    max_tokens = rl.mock.max_tokens or rl.max_tokens
    if max_tokens > engine.max_tokens_limit:
        key = "rl_training.mock.max_tokens" if rl.mock.max_tokens else "rl_training.max_tokens"
        problems.append(
            f"{key} ({max_tokens}) is more than engine.max_tokens_limit ({engine.max_tokens_limit}), "
            "the largest max_tokens a request may ask for: lower it or raise engine.max_tokens_limit"
        )
    from paraloop.envs.tasks import load_task

    try:
        load_task(rl.mock.task)
    except ValueError as e:
        problems.append(f"rl_training.mock.task: {e}")
    return problems


def resolve_model(settings: Settings) -> Path:
    from paraloop.model import ModelNotFoundError, resolve_model_path

    try:
        return resolve_model_path(settings.model.base_path, revision=settings.model.revision)
    except ModelNotFoundError as e:
        raise SetupError(f"model.base_path: {e}") from None


def model_problems(settings: Settings, model_dir: Path) -> list[str]:
    """What the model's config.json says against the settings: its architecture, quantization and depth."""
    from mlx_lm.utils import _get_classes

    rl, lora = settings.rl_training, settings.rl_training.lora
    file = model_dir / "config.json"
    try:
        config = json.loads(file.read_text())
        if not isinstance(config, dict) or "model_type" not in config:
            return [f"model.base_path: {file}: no model_type (not an mlx-lm or Hugging Face model config)"]
        if "model_file" not in config:  # a custom architecture file is mlx-lm's to load (trust_remote_code)
            _get_classes(config)  # mlx-lm's own lookup of the architecture: ValueError when unsupported
    except (OSError, ValueError) as e:
        return [f"model.base_path: {file}: {e}"]
    problems = []
    quantized = "quantization" in config or "quantization_config" in config
    if rl.train_mode == "full" and quantized:
        problems.append(
            "rl_training.train_mode = 'full' needs a non-quantized model, and model.base_path is "
            "quantized (quantized weights have no gradient): use train_mode = 'lora'"
        )
    blocks = config.get("num_hidden_layers") or (config.get("text_config") or {}).get("num_hidden_layers")
    fresh_lora = rl.train_mode == "lora" and not (settings.checkpoint.resume or settings.model.lora_path)
    if fresh_lora and isinstance(blocks, int) and lora.num_layers > blocks:
        log.warning(
            "rl_training.lora.num_layers = %d but the model has %d blocks: LoRA goes on all %d",
            lora.num_layers,
            blocks,
            blocks,
        )
    return problems
