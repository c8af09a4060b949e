"""Adapters and checkpoints as training or another tool leaves them: a trained-looking model, a run's checkpoints,
an adapter dir written the way `mlx_lm.lora --train` writes one."""

import json
from pathlib import Path

import paraloop  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import mlx.core as mx
import mlx_lm
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers

from paraloop.checkpoint import write_checkpoint
from paraloop.config import LoraConfig
from paraloop.lora import adapter_arrays, adapter_config, attach_lora
from paraloop.model import load_model


def trained_model(model_path: Path, *, seed: int = 0, compute: str = "quantized"):
    """Base + a LoRA adapter with non-zero B (as after training), in eval mode: (model, tokenizer, config).
    A quantized base keeps its quantized layers unless compute = "dequantized" (as mlx_lm.load does)."""
    model, tokenizer, _, _ = load_model(model_path, compute=compute)
    config = adapter_config(
        LoraConfig(rank=4, num_layers=2, keys=["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]),
        model,
    )
    attach_lora(model, config, seed=1)
    rng = np.random.default_rng(seed)
    arrays = {
        k: mx.array(rng.normal(0.0, 0.1, v.shape).astype(np.float32)) if k.endswith("lora_b") else v
        for k, v in adapter_arrays(model).items()
    }
    model.load_weights(list(arrays.items()), strict=False)
    model.eval()
    return model, tokenizer, config


def save_run(run: Path, model, config, *, steps=(1,), metrics=None) -> Path:
    for step in steps:
        path = write_checkpoint(
            run,
            step=step,
            version=step,
            adapter=adapter_arrays(model),
            adapter_config=config,
            optimizer_state={"step": mx.array(step)},
            trainer_state={"metrics": metrics or {"loss": 1.0 / step, "reward_mean": 0.1 * step}},
        )
    return path


PROMPT = "The capital of France is Paris. The morning was cold"


def randomize_lora_b(model, *, std: float = 0.1, seed: int = 0) -> dict[str, mx.array]:
    """B starts at zero (the adapter is then a no-op); make it matter, as training would."""
    rng = np.random.default_rng(seed)
    arrays = {
        k: mx.array(rng.normal(0.0, std, v.shape).astype(np.float32)) if k.endswith("lora_b") else v
        for k, v in adapter_arrays(model).items()
    }
    model.load_weights(list(arrays.items()), strict=False)
    model.eval()  # dropout off
    mx.eval(model.parameters())
    return arrays


def prompt_ids(tokenizer) -> mx.array:
    return mx.array(tokenizer.encode(PROMPT))


def write_like_mlx_lm_lora(model_path: Path, out: Path) -> mx.array:
    """An adapter dir as `mlx_lm.lora --train` leaves it; returns the trained model's logits on PROMPT."""
    model, tokenizer = mlx_lm.load(str(model_path))
    model.freeze()
    lora_parameters = {"rank": 8, "dropout": 0.0, "scale": 20.0}  # mlx-lm's defaults: no "keys"
    linear_to_lora_layers(model, 2, lora_parameters)
    randomize_lora_b(model, std=0.02)
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    args = {
        "model": str(model_path),
        "train": True,
        "fine_tune_type": "lora",
        "optimizer": "adam",
        "seed": 0,
        "num_layers": 2,
        "batch_size": 4,
        "iters": 10,
        "learning_rate": 1e-5,
        "adapter_path": str(out),
        "lora_parameters": lora_parameters,
        "lr_schedule": None,
        "max_seq_length": 2048,
    }
    (out / "adapter_config.json").write_text(json.dumps(args, indent=4))
    return model(prompt_ids(tokenizer)[None])
