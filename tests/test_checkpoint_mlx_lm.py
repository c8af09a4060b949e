"""Checkpoints are mlx-lm adapter dirs; mlx-lm's own adapter dirs load through paraloop's read/apply paths."""

import json
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.tuner.utils import linear_to_lora_layers

import paraloop  # noqa: F401  (OpenBLAS before mlx)
from paraloop.checkpoint import read_checkpoint, write_checkpoint
from paraloop.config import LoraConfig
from paraloop.lora import adapter_arrays, adapter_config, apply_adapter, attach_lora, load_adapter
from paraloop.model import load_model

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


def greedy(model, ids: mx.array, n: int = 16) -> list[int]:
    return [int(token) for token, _ in generate_step(ids, model, max_tokens=n)]


def test_mlx_lm_loads_a_paraloop_checkpoint_and_generates_what_paraloop_does(tiny_model_path, tmp_path):
    trained, tokenizer, _, _ = load_model(tiny_model_path)
    config = adapter_config(
        LoraConfig(rank=4, num_layers=2, keys=["self_attn.q_proj", "mlp.down_proj"]), trained
    )
    attach_lora(trained, config, seed=1)
    arrays = randomize_lora_b(trained)
    step_dir = write_checkpoint(
        tmp_path,
        step=3,
        version=3,
        adapter=arrays,
        adapter_config=config,
        optimizer_state={"step": mx.array(3)},
        trainer_state={"metrics": {"loss": 0.1}},
    )

    theirs, their_tokenizer = mlx_lm.load(str(tiny_model_path), adapter_path=str(step_dir))
    ours, _, _, _ = load_model(tiny_model_path)
    apply_adapter(ours, step_dir)
    ours.eval()  # new LoRA layers start in training mode (dropout on); mlx_lm.load switches to eval too
    base, _ = mlx_lm.load(str(tiny_model_path))
    ids = prompt_ids(tokenizer)
    assert their_tokenizer.encode(PROMPT) == tokenizer.encode(PROMPT)

    ours_logits, theirs_logits = ours(ids[None]), theirs(ids[None])
    assert mx.allclose(ours_logits, theirs_logits, atol=1e-5).item()
    assert not mx.allclose(ours_logits, base(ids[None]), atol=1e-2).item()  # the adapter changes the model
    assert greedy(ours, ids) == greedy(theirs, ids) == greedy(trained, ids)


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


def test_an_adapter_dir_written_by_mlx_lm_lora_loads_and_applies(tiny_model_path, tmp_path):
    expected = write_like_mlx_lm_lora(tiny_model_path, tmp_path / "adapters")
    arrays, config = load_adapter(tmp_path / "adapters")
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == 2
    assert all(name.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for name in arrays)

    ours, tokenizer, _, _ = load_model(tiny_model_path)
    apply_adapter(ours, tmp_path / "adapters")
    ours.eval()
    assert mx.allclose(ours(prompt_ids(tokenizer)[None]), expected, atol=1e-5).item()
    assert sorted(adapter_arrays(ours)) == sorted(arrays)


def test_a_checkpoint_made_from_an_mlx_lm_adapter_round_trips(tiny_model_path, tmp_path):
    write_like_mlx_lm_lora(tiny_model_path, tmp_path / "adapters")
    arrays, config = load_adapter(tmp_path / "adapters")
    write_checkpoint(
        tmp_path / "run", step=1, version=1, adapter=arrays, adapter_config=config, adapter_format="npz"
    )
    ckpt = read_checkpoint(tmp_path / "run")
    assert ckpt.adapter_config == config
    assert all(mx.array_equal(ckpt.adapter[k], v).item() for k, v in arrays.items())
