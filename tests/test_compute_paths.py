"""The two compute paths against each other, and the Mac default's bfloat16 4-bit model.

Both paths compute the same function of the same 4-bit weights (so an adapter trained on one serves on the other,
in either file format), and a bfloat16 model computing in bfloat16 on quantized kernels, as mlx-community's 4-bit
models do on Metal and CUDA, serves, trains and swaps with float32 log-probs.
"""

import json

import paraloop  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from paraloop.config import EngineConfig, LoraConfig, RLTrainingConfig
from paraloop.engine import Engine
from paraloop.learn import Trainer
from paraloop.lora import AdapterSlots, adapter_config, apply_adapter, save_adapter
from paraloop.model import is_quantized, load_model, twin
from paraloop.tools import convert_adapter
from support.compute_paths import LOGPROB_TOL, SAME_FUNCTION_TOL, assert_within, max_gap
from support.engines import make_engine, prompts, reference_logprobs, request, serve
from support.trainers import random_batch

BF16_LOGPROB_TOL = LOGPROB_TOL["quantized-bfloat16"]


def lora_config(model: nn.Module) -> dict:
    return adapter_config(LoraConfig(rank=4, num_layers=-1, keys="all", dropout=0.0), model)


def trained_adapter(model_path, compute: str, steps: int = 2) -> tuple[dict, dict]:
    """(adapter arrays, adapter_config) after `steps` learner steps on `compute`."""
    model, _, _, _ = load_model(model_path, compute=compute)
    config = RLTrainingConfig(learning_rate=1e-2, kl_beta=0.0, lora=LoraConfig(rank=4, num_layers=-1, dropout=0.0))
    cfg = lora_config(model)
    trainer = Trainer(model, config=config, adapter_config=cfg)
    for i in range(steps):
        assert not trainer.step(random_batch(40 + i)).skipped
    return trainer.adapter(), cfg


def test_both_paths_compute_the_same_logits_and_lora_gradients(tiny_q4_model_path):
    ids = mx.array([[1, 17, 230, 4, 99, 512, 8, 3, 700, 21]])
    logits, grads = {}, {}
    for compute in ("dequantized", "quantized"):
        model, _, _, _ = load_model(tiny_q4_model_path, compute=compute)
        assert is_quantized(model) == (compute == "quantized")
        Trainer(model, config=RLTrainingConfig(kl_beta=0.0), adapter_config=lora_config(model))
        for name, value in tree_flatten(model.trainable_parameters()):  # B = 0 has no gradient on A: move B
            if name.endswith("lora_b"):
                owner = dict(model.named_modules())[name.rsplit(".", 1)[0]]
                owner.lora_b = mx.random.normal(value.shape, key=mx.random.key(len(name))) * 0.05

        def loss(m: nn.Module) -> mx.array:
            return nn.losses.cross_entropy(m(ids[:, :-1]), ids[:, 1:]).mean()

        logits[compute] = model(ids)
        _, grad = nn.value_and_grad(model, loss)(model)
        grads[compute] = dict(tree_flatten(grad))
    assert_within(
        "quantized vs dequantized logits", max_gap(logits["quantized"], logits["dequantized"]), SAME_FUNCTION_TOL
    )
    assert grads["quantized"].keys() == grads["dequantized"].keys() and grads["quantized"]
    for name, g in grads["quantized"].items():
        scale = float(mx.abs(grads["dequantized"][name]).max().item()) or 1.0
        np.testing.assert_allclose(np.array(g), np.array(grads["dequantized"][name]), atol=1e-4 * scale, err_msg=name)


@pytest.mark.parametrize(("trained_on", "served_on"), [("quantized", "dequantized"), ("dequantized", "quantized")])
def test_an_adapter_trained_on_one_path_serves_on_the_other_in_either_format(
    tiny_q4_model_path, tmp_path, trained_on, served_on
):
    arrays, cfg = trained_adapter(tiny_q4_model_path, trained_on)
    save_adapter(tmp_path / "adapter", arrays, cfg)
    assert convert_adapter.main([str(tmp_path / "adapter"), str(tmp_path / "as_npz")]) == 0
    ids = mx.array([[1, 17, 230, 4, 99, 512, 8, 3]])
    out = {}
    for compute, path in ((trained_on, tmp_path / "adapter"), (served_on, tmp_path / "as_npz")):
        model, _, _, _ = load_model(tiny_q4_model_path, compute=compute)
        apply_adapter(model, path)
        model.eval()
        out[compute] = model(ids)
    base, _, _, _ = load_model(tiny_q4_model_path, compute=served_on)
    assert mx.abs(out[served_on] - base(ids)).max().item() > 1e-3, "the adapter changes the output"
    assert_within("quantized vs dequantized logits", max_gap(out[served_on], out[trained_on]), SAME_FUNCTION_TOL)


def test_a_bfloat16_4bit_model_serves_float32_logprobs_on_quantized_kernels(tiny_q4_bf16_model_path):
    """Before the engine cast logits to float32, its first decode step failed on such a model (NumPy cannot read
    bfloat16) and every row ended with "abort"."""
    engine, model = make_engine(tiny_q4_bf16_model_path, compute="quantized")
    assert is_quantized(model) and model.model.norm.weight.dtype == mx.bfloat16
    prompt_a, prompt_b, *_ = prompts(engine.tokenizer)
    specs = [
        request(prompt_a, n=2, temperature=0.8, max_tokens=8, ignore_eos=True, top_logprobs=3, seed=1),
        request(prompt_b, temperature=0, max_tokens=8, ignore_eos=True),
    ]

    async def body(engine):
        return [await engine.complete(spec) for spec in specs]

    for spec, rows in zip(specs, serve(engine, body), strict=True):
        for row in rows:
            assert row.finish_reason == "length" and len(row.tokens) == 8
            expected = reference_logprobs(model, spec.prompt_tokens, row.tokens, spec.params.temperature)
            assert_within("bfloat16 engine vs float32 forward", max_gap(row.logprobs, expected), BF16_LOGPROB_TOL)
            if spec.params.top_logprobs:
                assert all(len(top) == 3 and top[0][1] >= top[-1][1] for top in row.top_logprobs)


def test_a_bfloat16_4bit_model_trains_float32_lora_and_the_engine_swaps_it_in(tiny_q4_bf16_model_path):
    """bfloat16 activations on this CPU run at ~0.2 GFLOP/s: one small step."""
    model, tokenizer, _, _ = load_model(tiny_q4_bf16_model_path, compute="quantized")
    config = RLTrainingConfig(learning_rate=1e-2, kl_beta=0.1, lora=LoraConfig(rank=4, num_layers=2, dropout=0.0))
    trainer = Trainer(model, config=config, adapter_config=adapter_config(config.lora, model))
    engine_model = twin(model)  # as `paraloop run` builds them: LoRA attached, base arrays shared
    engine_model.eval()
    before = {k: np.array(v) for k, v in trainer.adapter().items()}
    result = trainer.step(random_batch(50, groups=1, size=3))
    assert not result.skipped and all(np.isfinite(v) for v in result.metrics.values())
    after = trainer.adapter()
    assert all(v.dtype == mx.float32 for v in after.values()), "LoRA arrays stay float32 on a bfloat16 base"
    assert any(not np.array_equal(before[k], np.array(v)) for k, v in after.items())

    engine = Engine(engine_model, tokenizer, config=EngineConfig(), adapter=AdapterSlots(engine_model))
    prompt = prompts(tokenizer)[0]

    async def body(engine):
        await engine.swap_adapter(after, version=1)
        return (await engine.complete(request(prompt, temperature=0, max_tokens=6, ignore_eos=True)))[0]

    row = serve(engine, body)
    assert row.versions == [1] * 6 and row.finish_reason == "length"
    expected = reference_logprobs(model, prompt, row.tokens, 1.0)  # the learner's twin holds the same adapter
    assert_within("bfloat16 engine vs float32 forward", max_gap(row.logprobs, expected), BF16_LOGPROB_TOL)


def test_dequantized_compute_expands_half_precision_weights_to_float32(tmp_path, caplog):
    """Not only quantized layers: float16/bfloat16 matmul on the CPU never reaches BLAS, so a bfloat16 model is
    computed in float32 too (and says so when it loads)."""
    from paraloop.builders.tiny import build_tiny_model

    path = build_tiny_model(tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with caplog.at_level("INFO", logger="paraloop.model"):
        model, _, _, quantized = load_model(path, compute="dequantized")
    assert not quantized and {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.float32}
    assert "bfloat16 weights, expanded to float32 at load (compute = dequantized" in caplog.text
    kept, _, _, _ = load_model(path, compute="quantized")  # nothing to dequantize: computed as stored
    assert {v.dtype for _, v in tree_flatten(kept.parameters())} == {mx.bfloat16}
    ids = mx.array([[1, 17, 230, 4, 99]])
    assert mx.abs(model(ids) - kept(ids).astype(mx.float32)).max().item() < BF16_LOGPROB_TOL


def test_quantized_kernels_run_on_quantized_layers_only_when_asked(tiny_q4_model_path, caplog):
    """`auto` on this CPU backend is the dequantized path; `quantized` keeps every quantized layer."""
    with caplog.at_level("INFO", logger="paraloop.model"):
        auto, _, _, _ = load_model(tiny_q4_model_path)
        kept, _, _, _ = load_model(tiny_q4_model_path, compute="quantized")
    assert not is_quantized(auto)
    layers = [
        m
        for _, m in kept.named_modules()
        if isinstance(m, nn.Linear | nn.QuantizedLinear | nn.Embedding | nn.QuantizedEmbedding)
    ]
    assert layers and all(isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding) for m in layers)
    assert (
        "4-bit quantized weights (float32 scales and norms), expanded to float32 at load (compute = auto, "
        "backend cpu)" in caplog.text
    )
    assert "kept quantized: MLX's quantized kernels (compute = quantized, backend cpu)" in caplog.text
