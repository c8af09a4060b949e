"""Chunked log-probs (learn/logprobs.py, logits_head.py) against float64 NumPy and against the full-logits path.

Tolerances: the chunked path runs the same float32 operations as the full one in another grouping, so log-probs
and entropies agree to ~1e-6 relative and gradients to ~1e-5 of their largest entry; against float64 NumPy the
loss agrees to 1e-5 relative and gradients (NumPy's by central differences) to 1e-3 relative.
"""

import importlib
import logging

import paraloop  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from support.loss_reference import (
    NORM,
    OPTIONS,
    B,
    T,
    V,
    mx_policy_loss,
    np_grad,
    np_loss,
    random_inputs,
    replay_kept,
    with_importance,
)

from paraloop.logits_head import IDENTITY, LogitsHead, Transform, logits_head
from paraloop.learn.logprobs import auto_chunk_tokens, chunked_logprobs, forward_logprobs
from paraloop.learn.loss import aggregation_weights

D = 5


class HeadOnly(nn.Module):
    """Just an LM head: chunked_logprobs takes the hidden states directly."""

    def __init__(self, weight: np.ndarray, *, tied: bool) -> None:
        super().__init__()
        if tied:
            self.model = nn.Module()
            self.model.embed_tokens = nn.Embedding(V, D)
            self.model.embed_tokens.weight = mx.array(weight, mx.float32)
        else:
            self.lm_head = nn.Linear(D, V, bias=False)
            self.lm_head.weight = mx.array(weight, mx.float32)


def chunked_loss(hidden, weight, inp, opt, *, chunk, tied, transform=IDENTITY, positions=True, keep=False):
    """(loss, d loss / d hidden, d loss / d weight) through the chunked head, in float32; keep: the backward reads
    the forward's logits instead of recomputing them."""
    model = HeadOnly(weight, tied=tied)
    head = LogitsHead(tied=tied, transform=transform)
    module = head.module(model)
    w = aggregation_weights(inp["mask"], opt.get("aggregation", "token-mean"), norm_length=NORM)
    flat = np.flatnonzero(inp["mask"]) if positions else None
    kept = mx.array(inp["kept"]) if "kept" in inp else None

    def f(h, params):
        module.update(params)
        logp, entropy = chunked_logprobs(
            model,
            head,
            h,
            mx.array(inp["targets"]),
            mx.array(inp["temperature"], mx.float32),
            chunk_tokens=chunk,
            positions=flat,
            entropy_grad=opt.get("entropy_weight", 0.0) != 0,
            keep_logits=keep,
            kept=kept,
        )
        return mx_policy_loss(logp, entropy, inp, w, opt)

    params = {"weight": module.weight}
    value, (dh, dp) = mx.value_and_grad(f, argnums=(0, 1))(mx.array(hidden, mx.float32), params)
    return value.item(), np.array(dh, np.float64), np.array(dp["weight"], np.float64)


def inputs_with_hidden(seed: int):
    _, inp = random_inputs(seed)
    rng = np.random.default_rng(100 + seed)
    hidden = rng.normal(0, 1.0, size=(B, T, D))
    weight = rng.normal(0, 0.8, size=(V, D))
    logits = hidden @ weight.T
    # the old policy and the reference sit near the current one, as in test_learn_loss
    from support.loss_reference import np_logprobs

    logp, _ = np_logprobs(logits, inp["targets"], inp["temperature"])
    inp["old_logp"] = logp + rng.normal(0, 0.3, size=(B, T))
    inp["ref_logp"] = logp + rng.normal(0, 0.5, size=(B, T))
    inp["rollout_logp"] = inp["old_logp"] + rng.normal(0, 0.3, size=(B, T))  # near the old policy, as there
    return hidden, weight, logits, inp


@pytest.mark.parametrize("keep", [False, True], ids=["recomputed", "kept"])
@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_every_loss_option_through_the_chunked_head_matches_float64_numpy(opt, keep):
    hidden, weight, logits, inp = inputs_with_hidden(0)
    if opt.get("importance_weight"):
        inp["importance_weight"] = np.minimum(np.exp(np.random.default_rng(0).normal(0, 0.5, (B, T))), 2.0)
    inp = with_importance(inp, opt)
    # 24 positions (18 trained) in chunks of 5: uneven chunks, chunk borders inside rows
    value, dh, dw = chunked_loss(hidden, weight, inp, opt, chunk=5, tied=False, keep=keep)
    np.testing.assert_allclose(value, np_loss(logits, inp, opt), rtol=1e-5, atol=1e-6)
    g = np_grad(logits, inp, opt)  # d loss / d logits (B, T, V), float64
    np.testing.assert_allclose(dh, g @ weight, rtol=1e-3, atol=2e-6)
    np.testing.assert_allclose(dw, np.einsum("btv,btd->vd", g, hidden), rtol=1e-3, atol=2e-6)


@pytest.mark.parametrize("entropy_weight", [0.0, 0.03])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("transform", [IDENTITY, Transform(softcap=3.0, scale=0.5)], ids=["linear", "softcap"])
def test_kept_logits_give_the_recomputed_results_bit_for_bit(entropy_weight, tied, transform):
    # the same operations on the same values, only read back instead of computed again: equal bits
    hidden, weight, _, inp = inputs_with_hidden(2)
    opt = {"kl_beta": 0.1, "kl_estimator": "k3", "entropy_weight": entropy_weight}
    recomputed = chunked_loss(hidden, weight, inp, opt, chunk=7, tied=tied, transform=transform)
    kept = chunked_loss(hidden, weight, inp, opt, chunk=7, tied=tied, transform=transform, keep=True)
    assert kept[0] == recomputed[0]
    for a, b in zip(kept[1:], recomputed[1:], strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "opt",
    [
        {},
        {"kl_beta": 0.1, "kl_estimator": "k3", "entropy_weight": 0.03},
        {"algorithm": "gspo", "clip_ratio": 0.03, "entropy_weight": -0.02},
    ],
    ids=["default", "kl-entropy", "gspo-entropy"],
)
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("keep", [False, True], ids=["recomputed", "kept-logits"])
def test_sampling_mask_replay_through_the_chunked_head_matches_float64_numpy(opt, tied, keep):
    """Kept-set scoring in the chunked forward and its analytic backward (entropy's included), with the backward
    recomputing each chunk's logits or reading the forward's."""
    hidden, weight, logits, inp = inputs_with_hidden(3)
    inp["kept"] = replay_kept(inp, logits, 3)
    value, dh, dw = chunked_loss(hidden, weight, inp, opt, chunk=5, tied=tied, keep=keep)
    np.testing.assert_allclose(value, np_loss(logits, inp, opt), rtol=1e-5, atol=1e-6)
    g = np_grad(logits, inp, opt)
    np.testing.assert_allclose(dh, g @ weight, rtol=1e-3, atol=2e-6)
    np.testing.assert_allclose(dw, np.einsum("btv,btd->vd", g, hidden), rtol=1e-3, atol=2e-6)


@pytest.mark.parametrize("chunk", [1, 7, 1000])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("positions", [False, True])
def test_chunked_equals_full_logits_for_any_chunk_size(chunk, tied, positions):
    hidden, weight, _, inp = inputs_with_hidden(1)
    opt = {"kl_beta": 0.1, "kl_estimator": "k3", "entropy_weight": 0.03}
    full = chunked_loss(hidden, weight, inp, opt, chunk=10_000, tied=tied, positions=False)
    got = chunked_loss(hidden, weight, inp, opt, chunk=chunk, tied=tied, positions=positions)
    assert got[0] == pytest.approx(full[0], rel=1e-6, abs=1e-7)
    for a, b in zip(got[1:], full[1:], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max())


@pytest.mark.parametrize("transform", [Transform(softcap=2.0), Transform(scale=0.5), Transform(2.0, 3.0)])
def test_logit_transforms_match_numpy(transform):
    """Softcap (Gemma-2) and scales (Cohere, Granite) are applied to each chunk and differentiated analytically."""
    hidden, weight, logits, inp = inputs_with_hidden(2)
    raw = logits
    if transform.softcap is not None:
        logits = np.tanh(raw / transform.softcap) * transform.softcap
    logits = logits * transform.scale
    opt = {"entropy_weight": 0.05}
    value, dh, _ = chunked_loss(hidden, weight, inp, opt, chunk=4, tied=True, transform=transform)
    np.testing.assert_allclose(value, np_loss(logits, inp, opt), rtol=1e-5, atol=1e-6)
    g = np_grad(logits, inp, opt)
    if transform.softcap is not None:
        g = g * (1 - np.tanh(raw / transform.softcap) ** 2)
    np.testing.assert_allclose(dh, (g * transform.scale) @ weight, rtol=1e-3, atol=2e-6)


def test_unscored_positions_read_zero():
    hidden, weight, _, inp = inputs_with_hidden(3)
    model, head = HeadOnly(weight, tied=False), LogitsHead(tied=False, transform=IDENTITY)
    positions = np.flatnonzero(inp["mask"])
    logp, entropy = chunked_logprobs(
        model,
        head,
        mx.array(hidden, mx.float32),
        mx.array(inp["targets"]),
        mx.array(inp["temperature"], mx.float32),
        chunk_tokens=3,
        positions=positions,
    )
    full, full_entropy = chunked_logprobs(
        model,
        head,
        mx.array(hidden, mx.float32),
        mx.array(inp["targets"]),
        mx.array(inp["temperature"], mx.float32),
    )
    mask = inp["mask"]
    assert np.all(np.array(logp)[~mask] == 0) and np.all(np.array(entropy)[~mask] == 0)
    np.testing.assert_allclose(np.array(logp)[mask], np.array(full)[mask], rtol=1e-6)
    np.testing.assert_allclose(np.array(entropy)[mask], np.array(full_entropy)[mask], rtol=1e-6)


def test_automatic_chunk_holds_16_mib_of_logits():
    assert auto_chunk_tokens(49152) == 85  # SmolLM2
    assert auto_chunk_tokens(152064) == 27  # Qwen2.5 / Qwen3
    assert auto_chunk_tokens(100) == 16 * 2**20 // 400
    assert auto_chunk_tokens(10**9) == 16  # never below the minimum


# --- mlx-lm layouts --------------------------------------------------------------------------------------------

ARGS = dict(
    hidden_size=128,
    num_hidden_layers=2,
    intermediate_size=256,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    rms_norm_eps=1e-6,
    vocab_size=320,
    max_position_embeddings=512,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    layer_norm_eps=1e-5,
)
LAYOUTS = {
    "qwen3": {},
    "llama": {"tie_word_embeddings": False},  # SmolLM2's architecture, with a separate lm_head
    "gemma2": {"final_logit_softcapping": 5.0},
    "cohere": {"logit_scale": 0.5},
    "granite": {
        "logits_scaling": 4.0,
        "attention_multiplier": 0.1,
        "embedding_multiplier": 2.0,
        "residual_multiplier": 0.5,
        "attention_bias": False,
        "mlp_bias": False,
    },
}


def mlx_lm_model(kind: str, *, seed: int = 0) -> nn.Module:
    arch = importlib.import_module(f"mlx_lm.models.{kind}")
    mx.random.seed(seed)
    model = arch.Model(arch.ModelArgs.from_dict({**ARGS, "model_type": kind, **LAYOUTS[kind]}))
    mx.eval(model.parameters())
    return model


def token_inputs(seed: int = 0, *, rows: int = 3, length: int = 19):
    rng = np.random.default_rng(seed)
    ids = mx.array(rng.integers(0, 320, (rows, length)), mx.int32)
    targets = mx.array(rng.integers(0, 320, (rows, length)), mx.int32)
    return ids, targets, mx.array([1.0, 0.7, 1.3][:rows], mx.float32)


def both_paths(model: nn.Module, head: LogitsHead, *, train_all: bool):
    """(value, gradients) of sum(w1 * logp + w2 * entropy) by the full path and by the chunked path (chunk 7)."""
    ids, targets, temperature = token_inputs()
    w1, w2 = (mx.array(np.random.default_rng(s).normal(size=ids.shape), mx.float32) for s in (1, 2))
    if train_all:
        model.unfreeze()
    out = []
    for chunked in (False, True):

        def loss(chunked=chunked):
            logp, entropy = forward_logprobs(
                model, ids, targets, temperature, head=head if chunked else None, chunk_tokens=7
            )
            return mx.sum(w1 * logp + w2 * entropy)

        value, grads = nn.value_and_grad(model, loss)()
        out.append((value.item(), {k: np.array(v) for k, v in tree_flatten(grads)}))
    return out


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_mlx_lm_layouts_split_exactly(kind):
    model = mlx_lm_model(kind)
    head = logits_head(model)
    assert head is not None and head.tied == (kind != "llama")
    (full_value, full), (value, grads) = both_paths(model, head, train_all=True)
    assert value == pytest.approx(full_value, rel=1e-5)
    assert set(grads) == set(full) and "model.embed_tokens.weight" in grads
    for name, g in full.items():
        np.testing.assert_allclose(grads[name], g, atol=2e-5 * max(1e-3, np.abs(g).max()), err_msg=name)


def test_quantized_head_matches_the_full_path():
    """A 4-bit tied embedding (QuantizedEmbedding.as_linear, the Metal/CUDA default): frozen, gradients flow to x."""
    model = mlx_lm_model("qwen3")
    nn.quantize(model, group_size=64, bits=4)
    from paraloop.config import LoraConfig
    from paraloop.lora import adapter_config, attach_lora

    attach_lora(model, adapter_config(LoraConfig(rank=4, num_layers=2, dropout=0.0), model))
    model.freeze()
    for _, m in model.named_modules():
        if "lora_a" in m:
            m.unfreeze(keys=["lora_a", "lora_b"], recurse=False)
    head = logits_head(model)
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding) and head is not None
    for _, m in model.named_modules():  # lora_b = 0 gives lora_a no gradient: give it a value
        if "lora_b" in m:
            m.lora_b = mx.full(m.lora_b.shape, 0.01)
    (full_value, full), (value, grads) = both_paths(model, head, train_all=False)
    assert value == pytest.approx(full_value, rel=1e-5)
    assert all(k.endswith(("lora_a", "lora_b")) for k in grads)
    for name, g in full.items():
        np.testing.assert_allclose(grads[name], g, atol=2e-5 * max(1e-3, np.abs(g).max()), err_msg=name)


def test_a_model_that_changes_its_logits_unknowingly_falls_back(caplog):
    """A __call__ doing something the split cannot know fails the probe: full logits, with a log line."""
    arch = importlib.import_module("mlx_lm.models.qwen3")

    class Doubled(arch.Model):
        def __call__(self, inputs, cache=None, input_embeddings=None):
            return 2.0 * super().__call__(inputs, cache, input_embeddings)

    model = Doubled(arch.ModelArgs.from_dict({**ARGS, "model_type": "qwen3"}))
    with caplog.at_level(logging.INFO, logger="paraloop.learn"):
        assert logits_head(model) is None
    assert "chunked log-probs off" in caplog.text and "full logits" in caplog.text


def test_probe_leaves_the_training_mode_alone():
    model = mlx_lm_model("qwen3")
    model.train()
    assert logits_head(model) is not None
    assert model.training and all(m.training for _, m in model.named_modules())
