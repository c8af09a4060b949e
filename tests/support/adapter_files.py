"""LoRA adapters written to disk for tests, in mlx-lm's format (adapters.safetensors + adapter_config.json)."""

from pathlib import Path

import mlx.core as mx

from paraloop.config import LoraConfig
from paraloop.lora import adapter_arrays, adapter_config, attach_lora, save_adapter
from paraloop.model import load_model


def random_adapter(path: Path, model_path: Path, cfg: LoraConfig, seed: int) -> Path:
    """An adapter dir with random A and B (a fresh LoRA's B is zero: it would change nothing), strong enough that
    its greedy tokens differ from the base model's."""
    model, _, _, _ = load_model(model_path)
    config = adapter_config(cfg, model)
    attach_lora(model, config, seed=seed)
    mx.random.seed(seed + 1000)
    arrays = {
        k: mx.random.normal(v.shape) * (v.shape[0] ** -0.5 if k.endswith("lora_a") else 0.3)
        for k, v in adapter_arrays(model).items()
    }
    save_adapter(path, arrays, config)
    return path
