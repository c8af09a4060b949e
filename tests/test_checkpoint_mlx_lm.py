"""Checkpoints are mlx-lm adapter dirs; mlx-lm's own adapter dirs load through paraloop's read/apply paths."""

import mlx.core as mx
import mlx_lm
from mlx_lm.generate import generate_step

import paraloop  # noqa: F401  (OpenBLAS before mlx)
from paraloop.checkpoint import read_checkpoint, write_checkpoint
from paraloop.config import LoraConfig
from paraloop.lora import adapter_arrays, adapter_config, apply_adapter, attach_lora, load_adapter
from paraloop.model import load_model
from support.checkpoints import PROMPT, prompt_ids, randomize_lora_b, write_like_mlx_lm_lora


def greedy(model, ids: mx.array, n: int = 16) -> list[int]:
    return [int(token) for token, _ in generate_step(ids, model, max_tokens=n)]


def test_mlx_lm_loads_a_paraloop_checkpoint_and_generates_what_paraloop_does(tiny_model_path, tmp_path):
    trained, tokenizer, _, _ = load_model(tiny_model_path)
    config = adapter_config(LoraConfig(rank=4, num_layers=2, keys=["self_attn.q_proj", "mlp.down_proj"]), trained)
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
    write_checkpoint(tmp_path / "run", step=1, version=1, adapter=arrays, adapter_config=config, adapter_format="npz")
    ckpt = read_checkpoint(tmp_path / "run")
    assert ckpt.adapter_config == config
    assert all(mx.array_equal(ckpt.adapter[k], v).item() for k, v in arrays.items())
