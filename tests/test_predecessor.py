"""The predecessor's checkpoints, written as its design document describes them (checkpoints/initial_adapter and
checkpoints/step_N/adapter.npz: LoRA arrays only, no adapter_config.json, no optimizer state): `--lora-path` loads
one with the configuration's LoRA scale and says so, `--resume` continues at its step with a fresh optimizer,
`show-checkpoint` describes it and `merge` fuses it."""

import json
import logging
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from support.runs import run_args

from paraloop.checkpoint import read_checkpoint
from paraloop.config import LoraConfig, load_config
from paraloop.lora import adapter_arrays, adapter_config, apply_adapter, attach_lora
from paraloop.model import load_model
from paraloop.predecessor import apply_adapter_assuming

PROMPT = "The capital of France is Paris. The morning was cold and clear"


def trained_arrays(model_path: Path, *, seed: int) -> dict[str, np.ndarray]:
    """LoRA arrays in the predecessor's default layout (rank 16 on q_proj and v_proj of the last 8 blocks, which is
    all 4 of the tiny model's) with a non-zero B, as after training; mlx-lm's names, float32."""
    model, _, _, _ = load_model(model_path)
    attach_lora(model, adapter_config(LoraConfig(rank=16, num_layers=8), model), seed=seed)
    rng = np.random.default_rng(seed)
    return {
        k: rng.normal(0.0, 0.05, v.shape).astype(np.float32) if k.endswith("lora_b") else np.array(v)
        for k, v in adapter_arrays(model).items()
    }


def write_predecessor_checkpoints(root: Path, model_path: Path, steps=(1, 2)) -> Path:
    """CHECKPOINT_DIR as mlx_parallm_train --adapter-format npz left it: initial_adapter/ and step_N/adapter.npz,
    plus the metadata.json its trainer wrote next to them."""
    ckdir = root / "checkpoints"
    initial = trained_arrays(model_path, seed=0)
    (ckdir / "initial_adapter").mkdir(parents=True)
    np.savez(
        ckdir / "initial_adapter" / "adapter.npz",
        **{k: v * 0 if k.endswith("lora_b") else v for k, v in initial.items()},
    )
    for step in steps:
        (ckdir / f"step_{step}").mkdir()
        np.savez(ckdir / f"step_{step}" / "adapter.npz", **trained_arrays(model_path, seed=step))
    metadata = {
        "step": steps[-1],
        "created_at": "2025-08-20T13:17:28Z",
        "adapter_path": None,
        "config": {"model_path": "./models/hermes-qwen3-14b-4bit", "learning_rate": 1e-5, "batch_size": 2},
    }
    (ckdir / "metadata.json").write_text(json.dumps(metadata, indent=2))
    return ckdir


@pytest.fixture
def predecessor(tmp_path, tiny_model_path) -> Path:
    return write_predecessor_checkpoints(tmp_path / "old", tiny_model_path)


def logits(model, tokenizer) -> np.ndarray:
    return np.array(model(mx.array(tokenizer.encode(PROMPT))[None]))


def reference_logits(model_path: Path, arrays: dict[str, np.ndarray], *, scale: float) -> np.ndarray:
    """Base + the arrays as mlx-lm computes them with an explicit adapter_config (the truth to compare with)."""
    model, tokenizer = mlx_lm.load(str(model_path))
    config = {
        "fine_tune_type": "lora",
        "num_layers": 4,
        "lora_parameters": {
            "rank": 16,
            "scale": scale,
            "dropout": 0.0,
            "keys": ["self_attn.q_proj", "self_attn.v_proj"],
        },
    }
    attach_lora(model, config)
    model.load_weights([(k, mx.array(v)) for k, v in arrays.items()], strict=False)
    model.eval()
    return logits(model, tokenizer)


def test_lora_path_takes_the_layout_from_the_arrays_and_the_scale_from_the_config(predecessor, tiny_model_path, caplog):
    from paraloop.serve import build_engine

    settings = load_config(
        None,
        {
            "model": {"base_path": str(tiny_model_path), "lora_path": str(predecessor / "step_2")},
            "rl_training": {"lora": {"scale": 4.0, "rank": 8}},
        },
    )
    with caplog.at_level(logging.WARNING, logger="paraloop.predecessor"):
        build_engine(settings)  # `paraloop serve --lora-path OLD/checkpoints/step_2` up to serving
    assumed = caplog.text
    assert "step_2 has no adapter_config.json" in assumed and "rank 16" in assumed
    assert "scale 4 and dropout 0.05 taken from rl_training.lora" in assumed

    model, tokenizer, _, _ = load_model(tiny_model_path)
    config = apply_adapter_assuming(model, predecessor / "step_2", assume=settings.rl_training.lora)
    assert config["num_layers"] == 4 and config["lora_parameters"]["rank"] == 16
    assert config["lora_parameters"]["keys"] == ["self_attn.q_proj", "self_attn.v_proj"]
    model.eval()
    arrays = dict(np.load(predecessor / "step_2" / "adapter.npz"))
    np.testing.assert_allclose(
        logits(model, tokenizer), reference_logits(tiny_model_path, arrays, scale=4.0), atol=1e-5
    )
    with pytest.raises(ValueError, match="no adapter_config.json"):  # without settings to assume, it says why
        apply_adapter(load_model(tiny_model_path)[0], predecessor / "step_2")


def test_the_predecessor_runs_own_adapter_config_wins_over_the_configuration(predecessor, tiny_model_path, caplog):
    recorded = {
        "fine_tune_type": "lora",
        "num_layers": 8,
        "lora_parameters": {"rank": 16, "scale": 2.5, "dropout": 0.1, "keys": ["self_attn.q_proj", "self_attn.v_proj"]},
    }
    (predecessor / "initial_adapter" / "adapter_config.json").write_text(json.dumps(recorded))
    model, _, _, _ = load_model(tiny_model_path)
    with caplog.at_level(logging.WARNING, logger="paraloop.predecessor"):
        config = apply_adapter_assuming(model, predecessor / "step_2" / "adapter.npz", assume=LoraConfig(scale=4.0))
    assert config["lora_parameters"]["scale"] == 2.5 and config["lora_parameters"]["dropout"] == 0.1
    assert "initial_adapter/adapter_config.json" in caplog.text


def test_a_run_starts_from_a_predecessor_step_given_as_lora_path(predecessor, tiny_model_path, tmp_path, caplog):
    from paraloop.lora import load_adapter
    from paraloop.run.main import main as run

    run_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="paraloop.predecessor"):
        code = run(
            run_args(tiny_model_path, run_dir, "--lora-path", str(predecessor / "step_1"), "--steps", "1", "--no-plot")
        )
    assert code == 0 and "scale 10 and dropout 0 taken from rl_training.lora" in caplog.text
    initial, config = load_adapter(run_dir / "checkpoints" / "initial_adapter")
    assert config["lora_parameters"] == {
        "rank": 16,
        "scale": 10.0,
        "dropout": 0.0,
        "keys": ["self_attn.q_proj", "self_attn.v_proj"],
    }
    start = np.load(predecessor / "step_1" / "adapter.npz")
    for name in start.files:  # a new run (step 0 -> 1) from the predecessor's arrays, not from a fresh init
        np.testing.assert_array_equal(np.array(initial[name]), start[name])
    assert read_checkpoint(run_dir).step == 1


@pytest.mark.slow
def test_resume_from_a_predecessor_dir_continues_at_its_step_with_a_fresh_optimizer(
    predecessor, tiny_model_path, tmp_path, caplog
):
    from paraloop.run.main import main as run

    run_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        code = run(run_args(tiny_model_path, run_dir, "--resume", str(predecessor), "--steps", "3", "--no-plot"))
    assert code == 0
    assert "step_2 is a predecessor checkpoint (adapter only): resuming at step 2 with a fresh optimizer" in caplog.text
    assert "scale 10 and dropout 0 taken from rl_training.lora" in caplog.text  # tiny.toml's settings
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [3]
    final = read_checkpoint(run_dir)
    assert final.step == 3 and final.version == 3
    assert final.adapter_config["lora_parameters"]["rank"] == 16  # the predecessor's layout, not tiny.toml's 8
    assert sorted(final.adapter) == sorted(np.load(predecessor / "step_2" / "adapter.npz").files)
    assert final.optimizer_state["step"].item() == 1, "AdamW started afresh: one update since the resume"
    assert not (run_dir / "checkpoints" / "initial_adapter").exists()  # a resumed run starts from the checkpoint


def test_show_checkpoint_describes_the_predecessors_dir_and_step(predecessor, capsys):
    from paraloop.tools.show_checkpoint import main as show

    assert show([str(predecessor)]) == 0
    listing = capsys.readouterr().out
    assert "step_1" in listing and "* step_2" in listing and "predecessor (adapter only)" in listing
    assert "latest: step_2" in listing and "fresh optimizer" in listing

    assert show([str(predecessor / "step_2")]) == 0
    details = capsys.readouterr().out
    assert "step: 2" in details and "rank 16 on self_attn.q_proj, self_attn.v_proj of blocks 0-3" in details
    assert "scale: not recorded" in details and "optimizer state: none" in details
    assert "base model: ./models/hermes-qwen3-14b-4bit" in details  # from its metadata.json


def test_merge_fuses_a_predecessor_step_with_its_spellings(predecessor, tiny_model_path, tmp_path):
    from paraloop.tools.merge import main as merge

    out = tmp_path / "merged"
    assert (
        merge(["--base-model", str(tiny_model_path), "--lora-path", str(predecessor), "--output-path", str(out)]) == 0
    )  # the checkpoint dir: its highest step
    fused, tokenizer = mlx_lm.load(str(out))
    arrays = dict(np.load(predecessor / "step_2" / "adapter.npz"))
    expected = reference_logits(tiny_model_path, arrays, scale=10.0)  # the predecessor's scale
    np.testing.assert_allclose(logits(fused, tokenizer), expected, atol=1e-4)


def test_a_damaged_paraloop_checkpoint_is_never_taken_for_a_predecessor_one(tiny_model_path, tmp_path):
    from support.checkpoints import save_run, trained_model

    from paraloop.checkpoint import CheckpointError
    from paraloop.predecessor import is_predecessor_step, read_for_resume

    model, _, config = trained_model(tiny_model_path)
    step_dir = save_run(tmp_path / "run", model, config)
    (step_dir / "trainer_state.json").unlink()  # damage: the adapter and optimizer files are still there
    assert not is_predecessor_step(step_dir)
    with pytest.raises(CheckpointError, match="trainer_state.json"):
        read_for_resume(step_dir)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        read_for_resume(tmp_path / "run")
