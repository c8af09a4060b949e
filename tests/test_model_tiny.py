"""The tiny random-weight model: loadable by mlx-lm and transformers, quantizable, deterministic, fast to build."""

import json
import subprocess
import sys
from pathlib import Path

import paraloop  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
from mlx.utils import tree_flatten

from support import procs
from paraloop.builders.tiny import build_tiny_model

CHAT = [{"role": "user", "content": "What is 12 + 7?"}]


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "f32")


@pytest.fixture(scope="module")
def tiny_q4(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "q4", quantize_bits=4)


def run_model_command(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "paraloop", "model", *args]
    return procs.run(command, timeout=120)


def test_tiny_model_has_the_documented_float32_qwen3_config(tiny_f32):
    config = json.loads((tiny_f32 / "config.json").read_text())
    assert config["model_type"] == "qwen3"
    assert config["torch_dtype"] == "float32"
    assert config["eos_token_id"] == 2
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (128, 4, 256)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 32)
    assert config["vocab_size"] == 1024
    assert "quantization" not in config


def test_tiny_model_loads_with_mlx_lm_and_generates_from_a_chat_prompt(tiny_f32):
    model, tokenizer = mlx_lm.load(str(tiny_f32))
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(model.parameters()))
    for _, module in model.named_modules():
        if isinstance(module, nn.Linear):  # else mlx-lm would silently skip it when quantizing
            assert module.weight.shape[1] % 64 == 0
    prompt = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)
    assert prompt[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token_ids == {2}
    logits = model(mx.array(prompt)[None])
    assert logits.shape == (1, len(prompt), 1024)
    out = mlx_lm.generate(model, tokenizer, prompt, max_tokens=4)
    assert isinstance(out, str)


def test_tokenizer_is_byte_level_bpe_with_chatml_specials_and_individual_digits(tiny_f32):
    _, tokenizer = mlx_lm.load(str(tiny_f32))
    text = "The capital of France is Paris. 123 + 45 = 168"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode()) // 2  # merges learned from the corpus, not bytes
    assert [tokenizer.decode([i]) for i in tokenizer.encode("2026")] == ["2", "0", "2", "6"]
    assert tokenizer.encode("<|im_start|>user<|im_end|><|endoftext|>")[0] == 1
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [
        0,
        1,
        2,
    ]


def test_tokenizer_dir_loads_with_transformers_offline_and_agrees_with_mlx_lm(tiny_f32, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_f32))
    _, tokenizer = mlx_lm.load(str(tiny_f32))
    text = "Thank you very much, 3 times 7 is 21."
    assert hf.encode(text) == tokenizer.encode(text)
    assert hf.eos_token == "<|im_end|>" and hf.eos_token_id == 2
    rendered = hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n<|im_start|>assistant\n"
    assert hf(rendered)["input_ids"] == tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)


def test_building_twice_gives_identical_files_and_another_seed_other_weights(tiny_f32, tmp_path):
    again = build_tiny_model(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_f32 / name).read_bytes(), name
    other = mx.load(str(build_tiny_model(tmp_path / "seed1", seed=1) / "model.safetensors"))
    same = mx.load(str(tiny_f32 / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not mx.array_equal(other[key], same[key])


def test_quantize_4_stores_mlx_lm_group_64_quantization_of_the_same_weights(tiny_f32, tiny_q4):
    config = json.loads((tiny_q4 / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 64
    model, tokenizer = mlx_lm.load(str(tiny_q4))
    float_model, _ = mlx_lm.load(str(tiny_f32))
    linears = [m for _, m in model.named_modules() if isinstance(m, nn.Linear | nn.QuantizedLinear)]
    assert linears and all(isinstance(m, nn.QuantizedLinear) and m.bits == 4 and m.group_size == 64 for m in linears)
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)  # tied: also the output projection
    q = model.layers[0].mlp.down_proj
    w = mx.dequantize(q.weight, q.scales, q.biases, group_size=64, bits=4)
    error = mx.abs(w - float_model.layers[0].mlp.down_proj.weight).max().item()
    assert error < 0.02  # a 4-bit step of N(0, 0.02) weights, not a different model
    prompt = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)
    assert model(mx.array(prompt)[None]).shape == (1, len(prompt), 1024)


def test_llama_layout_loads_as_llama(tmp_path):
    path = build_tiny_model(tmp_path / "llama", layout="llama")
    model, tokenizer = mlx_lm.load(str(path))
    assert json.loads((path / "config.json").read_text())["model_type"] == "llama"
    assert type(model).__module__ == "mlx_lm.models.llama"
    assert model(mx.array(tokenizer.encode("hello"))[None]).shape[-1] == 1024


def test_build_rejects_bad_arguments_and_a_non_empty_out_dir(tmp_path):
    with pytest.raises(ValueError, match="layout"):
        build_tiny_model(tmp_path / "a", layout="gpt2")
    with pytest.raises(ValueError, match="quantize_bits"):
        build_tiny_model(tmp_path / "b", quantize_bits=7)
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16"):
        build_tiny_model(tmp_path / "c", dtype="float64")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        build_tiny_model(tmp_path / "full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # nothing half-written left behind
    (tmp_path / "empty").mkdir()
    assert (build_tiny_model(tmp_path / "empty") / "model.safetensors").is_file()


def test_model_tiny_command_writes_a_quantized_llama(tmp_path):
    result = run_model_command("tiny", str(tmp_path / "m"), "--quantize", "4", "--layout", "llama", "--seed", "3")
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["quantization"]["bits"] == 4


def test_model_tiny_command_writes_a_bfloat16_4bit_model_like_mlx_communitys(tmp_path):
    result = run_model_command("tiny", str(tmp_path / "m"), "--quantize", "4", "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["quantization"]["bits"] == 4
    weights = mx.load(str(tmp_path / "m" / "model.safetensors"))
    assert {str(v.dtype) for v in weights.values()} == {"mlx.core.uint32", "mlx.core.bfloat16"}
    assert weights["model.layers.0.self_attn.q_proj.scales"].dtype == mx.bfloat16


@pytest.mark.parametrize(
    "args, message",
    [
        (["tiny", "{out}", "--layout", "gpt2"], "--layout"),
        (["tiny", "{out}", "--quantize", "7"], "--quantize"),
        (["tiny", "{out}", "--dtype", "float64"], "--dtype"),
        (["tiny", "{existing}"], "not empty"),
        (["tiny"], "required: out"),
        (["resnet", "{out}"], "invalid choice: 'resnet'"),
    ],
    ids=["bad-layout", "bad-bits", "bad-dtype", "out-exists", "no-out", "unknown-kind"],
)
def test_model_command_bad_input_is_one_error_line_and_exit_code_2(tmp_path, args, message):
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "config.json").write_text("{}")
    args = [a.format(out=tmp_path / "new", existing=tmp_path / "existing") for a in args]
    result = run_model_command(*args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("paraloop: error: ")
    assert message in result.stderr
    assert not (tmp_path / "new").exists()
