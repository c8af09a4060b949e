"""`paraloop tinker`'s losses and optimizer against float64 references written from the Tinker SDK's documentation.

Each loss: the learner's loss:sum equals the documented formula evaluated in float64 on the learner's own target
log-probs, and its gradient equals the gradient of sum(lp * g) where g = dL/dlp is derived by hand, in float64,
from the same formula (the chain rule through the model is then the same MLX computation on both sides). The
losses are float32 sums of ~40 terms, so they agree to 1e-5 relative; gradients to 1e-4 of their largest entry.
optim_step equals a float64 AdamW step (PyTorch's decoupled-decay form) to 1e-5 relative: both round once per op.
"""

import math

import mlx.core as mx
import numpy as np
import pytest

from paraloop.learn.logprobs import token_logprobs
from paraloop.model import load_model, twin
from paraloop.tinker.learner import MICRO_TOKENS, AdamParams, Learner, TrainingModel, check_data, micro_batches
from paraloop.tinker.losses import DEFAULTS, LOSSES, resolve_config
from paraloop.tinker.proto import DatumIn
from support.tinker_losses import inputs_for, reference

SEQS = [[3, 17, 42, 99, 7, 250, 31, 8, 64], [5, 6, 7, 300, 301, 2], [9, 10, 11, 12, 13, 14, 15]]


@pytest.fixture(scope="module")
def learner(tiny_model_path) -> Learner:
    model, _, _, _ = load_model(tiny_model_path)
    return Learner(twin(model))


def client(learner: Learner, seed: int = 0) -> TrainingModel:
    arrays = learner.new_adapter(4, seed)
    rng = np.random.default_rng(seed)  # a nonzero B, so the adapter matters
    arrays = {
        k: mx.array(rng.normal(0, 0.02, a.shape).astype(np.float32)) if k.endswith("lora_b") else a
        for k, a in arrays.items()
    }
    return TrainingModel("m", "tiny", 4, arrays)


def learner_logprobs(learner: Learner, tm: TrainingModel) -> list[np.ndarray]:
    data = [DatumIn(np.array(s[:-1]), {"target_tokens": np.array(s[1:])}) for s in SEQS]
    outputs, _ = learner.forward_backward(tm, data, "cross_entropy", {}, forward_only=True)
    return [o["logprobs"].astype(np.float64) for o in outputs]


@pytest.mark.parametrize("loss_fn", list(LOSSES))
def test_loss_and_gradient_match_the_float64_reference(learner: Learner, loss_fn: str) -> None:
    tm = client(learner)
    lps = learner_logprobs(learner, tm)
    rng = np.random.default_rng(1)
    xs = inputs_for(loss_fn, lps, rng)
    config = resolve_config(loss_fn, {})
    data = [DatumIn(np.array(s[:-1]), {"target_tokens": np.array(s[1:]), **x}) for s, x in zip(SEQS, xs, strict=True)]
    check_data(data, loss_fn, vocab=1 << 20, max_tokens=4096)
    outputs, metrics = learner.forward_backward(tm, data, loss_fn, config, forward_only=False)
    for out, lp in zip(outputs, lps, strict=True):
        np.testing.assert_array_equal(out["logprobs"], lp.astype(np.float32))  # the same forward both times
    refs = [reference(loss_fn, lp, x, config) for lp, x in zip(lps, xs, strict=True)]
    expected = sum(r[0] for r in refs)
    assert metrics["loss:sum"] == pytest.approx(expected, rel=1e-5, abs=1e-5)

    # the gradient: d/dθ sum(lp(θ) * g) with g = dL/dlp from the reference
    width = max(len(s) - 1 for s in SEQS)
    g = np.zeros((len(SEQS), width), np.float32)
    for i, (_, grad) in enumerate(refs):
        g[i, : len(grad)] = grad
    ids = np.zeros((len(SEQS), width), np.int32)
    targets = np.zeros((len(SEQS), width), np.int32)
    for i, s in enumerate(SEQS):
        ids[i, : len(s) - 1], targets[i, : len(s) - 1] = s[:-1], s[1:]
    learner.use(tm.arrays)

    def surrogate(arrays: dict[str, mx.array]) -> mx.array:
        learner.slots.swap(arrays)
        lp, _ = token_logprobs(
            learner.model(mx.array(ids)), mx.array(targets), mx.ones((len(SEQS),)), with_entropy=False
        )
        return (lp * mx.array(g)).sum()

    ref_grads = mx.grad(surrogate)(tm.arrays)
    learner.slots.swap(tm.arrays)
    assert tm.grads is not None
    worst = max(float(mx.abs(ref_grads[k]).max()) for k in ref_grads)
    assert worst > 0
    for k in ref_grads:
        np.testing.assert_allclose(np.array(tm.grads[k]), np.array(ref_grads[k]), rtol=0, atol=1e-4 * worst)


def test_forward_only_accumulates_nothing_and_forward_backward_accumulates(learner: Learner) -> None:
    tm = client(learner)
    data = [DatumIn(np.array(s[:-1]), {"target_tokens": np.array(s[1:])}) for s in SEQS]
    learner.forward_backward(tm, data, "cross_entropy", {}, forward_only=True)
    assert tm.grads is None
    learner.forward_backward(tm, data, "cross_entropy", {}, forward_only=False)
    once = {k: np.array(v) for k, v in tm.grads.items()}
    learner.forward_backward(tm, data, "cross_entropy", {}, forward_only=False)
    for k, v in tm.grads.items():
        np.testing.assert_allclose(np.array(v), 2 * once[k], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("loss_fn", ["cross_entropy", "gspo"])
def test_a_batch_where_only_some_datums_have_weights_is_the_sum_of_each_alone(learner: Learner, loss_fn: str) -> None:
    """A datum without `weights` beside ones with them is trained as it would be alone (found by test_tinker_fuzz:
    the padded batch had no weights row for it, a KeyError in the learner)."""
    tm = client(learner)
    xs = inputs_for(loss_fn, learner_logprobs(learner, tm), np.random.default_rng(5))
    data = [DatumIn(np.array(s[:-1]), {"target_tokens": np.array(s[1:]), **x}) for s, x in zip(SEQS, xs, strict=True)]
    data[1].inputs.pop("weights")
    config = resolve_config(loss_fn, {})
    alone = [learner.forward_backward(tm, [d], loss_fn, config, forward_only=True)[1]["loss:sum"] for d in data]
    _, metrics = learner.forward_backward(tm, data, loss_fn, config, forward_only=True)
    assert metrics["loss:sum"] == pytest.approx(sum(alone), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_optim_step_is_a_reference_adamw_step(learner: Learner, clip: float) -> None:
    tm = client(learner)
    rng = np.random.default_rng(2)
    p = AdamParams(learning_rate=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_clip_norm=clip)
    ref = {k: np.array(a, dtype=np.float64) for k, a in tm.arrays.items()}
    m = {k: np.zeros_like(a) for k, a in ref.items()}
    v = {k: np.zeros_like(a) for k, a in ref.items()}
    for t in (1, 2, 3):
        grads = {k: rng.normal(0, 1e-2, a.shape).astype(np.float32) for k, a in ref.items()}
        tm.grads = {k: mx.array(g) for k, g in grads.items()}
        metrics = learner.optim_step(tm, p)
        g64 = {k: g.astype(np.float64) for k, g in grads.items()}
        norm = math.sqrt(sum((g**2).sum() for g in g64.values()))
        assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-5)
        if clip:
            g64 = {k: g * min(1.0, clip / norm) for k, g in g64.items()}
        for k, g in g64.items():
            m[k] = p.beta1 * m[k] + (1 - p.beta1) * g
            v[k] = p.beta2 * v[k] + (1 - p.beta2) * g * g
            mhat, vhat = m[k] / (1 - p.beta1**t), v[k] / (1 - p.beta2**t)
            ref[k] = ref[k] * (1 - p.learning_rate * p.weight_decay) - p.learning_rate * mhat / (np.sqrt(vhat) + p.eps)
        assert tm.grads is None and tm.step == t
        for k in ref:
            np.testing.assert_allclose(np.array(tm.arrays[k]), ref[k], rtol=1e-5, atol=1e-7)


def test_config_and_inputs_are_checked() -> None:
    assert resolve_config("ppo", {"clip_low_threshold": 0.5}) == {**DEFAULTS["ppo"], "clip_low_threshold": 0.5}
    with pytest.raises(ValueError, match=r"loss_fn_config\.beta: ppo takes no such setting"):
        resolve_config("ppo", {"beta": 0.1})
    with pytest.raises(ValueError, match=r"loss_fn_config\.beta: must be a finite number"):
        resolve_config("dro", {"beta": float("nan")})
    datum = DatumIn(np.array([1, 2]), {"target_tokens": np.array([2, 3])})
    with pytest.raises(ValueError, match=r"data\[0\]\.loss_fn_inputs\.logprobs: required by importance_sampling"):
        check_data([datum], "importance_sampling", vocab=10, max_tokens=100)
    with pytest.raises(ValueError, match=r"data\[0\]\.loss_fn_inputs\.target_tokens: token ids must be in \[0, 3\)"):
        check_data([datum], "cross_entropy", vocab=3, max_tokens=100)
    floats = DatumIn(np.array([1, 2]), {"target_tokens": np.array([2.0, 3.0], np.float32)})
    with pytest.raises(ValueError, match=r"data\[0\]\.loss_fn_inputs\.target_tokens: must be integer token ids"):
        check_data([floats], "cross_entropy", vocab=10, max_tokens=100)
    with pytest.raises(ValueError, match="more than tinker.max_batch_tokens = 1"):
        check_data([datum], "cross_entropy", vocab=10, max_tokens=1)


def test_micro_batches_add_up_to_the_whole_batch(learner: Learner) -> None:
    """A forward_backward split into micro-batches (one datum each here) gives the loss and gradient of the whole
    batch: other shapes, so within float32 rounding (1e-5 relative), not bitwise."""
    data = [DatumIn(np.array(s[:-1]), {"target_tokens": np.array(s[1:])}) for s in SEQS]
    whole, split = client(learner), client(learner)
    _, m_whole = learner.forward_backward(whole, data, "cross_entropy", {}, forward_only=False)
    learner.micro_tokens = 8
    try:
        out, m_split = learner.forward_backward(split, data, "cross_entropy", {}, forward_only=False)
    finally:
        learner.micro_tokens = MICRO_TOKENS
    assert [len(o["logprobs"]) for o in out] == [len(s) - 1 for s in SEQS]
    assert m_split["loss:sum"] == pytest.approx(m_whole["loss:sum"], rel=1e-5)
    for k, g in whole.grads.items():
        np.testing.assert_allclose(np.array(split.grads[k]), np.array(g), rtol=1e-4, atol=1e-4 * float(mx.abs(g).max()))
    assert [len(g) for g in micro_batches(data, 8)] == [1, 1, 1] and len(micro_batches(data, 64)) == 1


def test_prompt_logprobs_of_a_one_token_prompt_is_its_nan(learner: Learner) -> None:
    """The first token has no context (found by test_tinker_fuzz: a one-token prompt with prompt_logprobs ran the
    model on no tokens, a reshape error on the learner thread)."""
    only = learner.prompt_logprobs(None, [5])
    assert len(only) == 1 and math.isnan(only[0])
    two = learner.prompt_logprobs(None, [5, 6])
    assert math.isnan(two[0]) and two[1] < 0
