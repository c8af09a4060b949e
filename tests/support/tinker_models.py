"""The model the Tinker SDK tests train: the tiny model with its output sharpened (test_tinker_sdk.py,
test_tinker_inflight.py)."""

import shutil
from pathlib import Path

import mlx.core as mx


def sharpened(tiny_model_path: Path, out: Path) -> Path:
    """The tiny model with its final RMSNorm scale raised to 10: stock, its logits span ~0.2 and no adapter inside
    the blocks could make a token set likely within a test's few RL steps (as in test_learn_trainer.py)."""
    shutil.copytree(tiny_model_path, out)
    weights = mx.load(str(out / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 10.0
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    return out
