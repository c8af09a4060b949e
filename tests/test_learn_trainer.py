"""The Trainer on the tiny model: what trains, micro-batching, old/reference policies, skips, exact resume, learning.

What goes through the base model's forward and backward (the LoRA step, micro-batching, the old-policy forward,
exact resume) runs on the tiny 4-bit model once per `compute` path (support/compute_paths.py); the rest on float32."""

import json
import logging

import paraloop  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import mlx.core as mx
import numpy as np
import pytest

from paraloop.learn import Trainer
from paraloop.learn.batch import collate
from paraloop.learn.optim import clip_by_norm, global_norm, learning_rate_at
from paraloop.messages import RolloutBatch, ScoredGroup
from paraloop.model import is_quantized, load_model
from support.trainers import make_config, make_trainer, random_batch, with_logprobs


@pytest.fixture(scope="module")
def q4_base(tiny_q4_model_path, compute):
    """The tiny 4-bit model loaded for one compute path: QuantizedLinear layers, or their float32 expansion."""
    model, _, _, quantized = load_model(tiny_q4_model_path, compute=compute)
    assert quantized and is_quantized(model) == (compute == "quantized")
    return model


def arrays_np(arrays: dict) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in arrays.items()}


# --- what trains ---------------------------------------------------------------------------------------------------


def test_step_trains_only_the_lora_arrays(q4_base):
    trainer = make_trainer(q4_base)
    before = arrays_np(trainer.adapter())
    embed = q4_base.model.embed_tokens.weight
    result = trainer.step(random_batch(0))
    assert not result.skipped and (result.step, result.version) == (1, 1)
    after = trainer.adapter()
    assert set(after) == set(before) and all(k.endswith(("lora_a", "lora_b")) for k in after)
    assert any(not np.array_equal(before[k], np.array(after[k])) for k in after)
    assert trainer.model.model.embed_tokens.weight is embed  # the frozen base is shared, never copied or moved
    for key in (
        "loss",
        "pg_loss",
        "kl",
        "entropy",
        "clip_fraction",
        "ratio_mean",
        "ratio_min",
        "ratio_max",
        "adv_mean",
        "adv_std",
        "reward_mean",
        "reward_std",
        "grad_norm",
        "lr",
        "tokens",
        "tokens_per_s",
        "step_time_s",
        "importance_weight_mean",
    ):
        assert np.isfinite(result.metrics[key]), key


def test_adapter_returns_new_arrays_each_step(base):
    trainer = make_trainer(base)
    first = trainer.adapter()
    snapshot = arrays_np(first)
    trainer.step(random_batch(1))
    assert all(np.array_equal(snapshot[k], np.array(v)) for k, v in first.items())  # shared arrays never mutate


def test_full_mode_trains_every_weight_of_its_twin_only(base):
    trainer = make_trainer(base, train_mode="full", kl_beta=0.0)
    embed = np.array(base.model.embed_tokens.weight)
    trainer.step(random_batch(2))
    assert "model.embed_tokens.weight" in trainer.adapter()
    assert not np.array_equal(np.array(trainer.model.model.embed_tokens.weight), embed)
    assert np.array_equal(np.array(base.model.embed_tokens.weight), embed)  # the engine's twin is untouched


def test_full_mode_rejects_a_quantized_model(tiny_q4_model_path):
    model, _, _, _ = load_model(tiny_q4_model_path, compute="quantized")
    with pytest.raises(ValueError, match="quantized weights have no gradient"):
        Trainer(model, config=make_config(train_mode="full", kl_beta=0.0), adapter_config=None)


def test_full_mode_with_kl_needs_a_reference(base):
    with pytest.raises(ValueError, match="kl_beta = 0"):
        make_trainer(base, train_mode="full", kl_beta=0.1)


# --- micro-batches ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("inference", [False, True])
def test_micro_batched_gradient_equals_the_full_batch_gradient(q4_base, aggregation, inference):
    options = {"loss_aggregation": aggregation, "kl_beta": 0.1, "entropy_weight": 0.01}
    batch = random_batch(3, inference=inference)
    assert len(collate(batch).lengths) * collate(batch).lengths.max() > 64  # the small budget really splits it
    loss_full, full = make_trainer(q4_base, token_budget=65536, **options).gradients(batch)
    loss_micro, micro = make_trainer(q4_base, token_budget=64, **options).gradients(batch)
    assert loss_micro == pytest.approx(loss_full, rel=1e-5, abs=1e-7)
    scale = max(float(np.abs(np.array(g)).max()) for g in full.values())
    for name, g in full.items():
        np.testing.assert_allclose(np.array(micro[name]), np.array(g), atol=1e-5 * scale, err_msg=name)


# --- old policy, reference, importance weights ------------------------------------------------------------------------


def test_reference_starts_as_the_base_model(base):
    trainer = make_trainer(base, kl_beta=0.1)
    initial = arrays_np(trainer.reference())
    assert all(not v.any() for k, v in initial.items() if k.endswith("lora_b"))  # B = 0: the base model
    first = trainer.step(random_batch(4))
    assert first.metrics["kl"] == pytest.approx(0.0, abs=1e-7)
    second = trainer.step(random_batch(4))
    assert second.metrics["kl"] > 1e-6
    assert all(np.array_equal(initial[k], np.array(v)) for k, v in trainer.reference().items())  # ref_ema = 1


def test_reference_ema(base):
    trainer = make_trainer(base, kl_beta=0.1, ref_ema=0.75)
    initial = arrays_np(trainer.reference())
    trainer.step(random_batch(5))
    policy = arrays_np(trainer.adapter())
    for name, ref in trainer.reference().items():
        np.testing.assert_allclose(np.array(ref), 0.75 * initial[name] + 0.25 * policy[name], atol=1e-7)


def test_given_ref_logprobs_win_over_the_reference_forward(base):
    trainer = make_trainer(base, kl_beta=0.1, kl_estimator="mse")
    batch = with_logprobs(random_batch(6), trainer, field="ref_logprobs", shift=0.3)
    result = trainer.step(batch)
    # on-policy first step: logp - ref = -0.3 on every trained token, so mse KL = 0.5 * 0.09 (token mean)
    assert result.metrics["kl"] == pytest.approx(0.045, rel=1e-4)


def test_importance_weights_are_capped(base):
    trainer = make_trainer(base, importance_cap=1.5)
    # the behaviour policy put 0.2 or 0.8 less log-prob on each token than the old (current) policy
    low = with_logprobs(random_batch(7, groups=1), trainer, field="inference_logprobs", shift=-0.2)
    high = with_logprobs(random_batch(8, groups=1), trainer, field="inference_logprobs", shift=-0.8)
    batch = RolloutBatch(groups=low.groups + high.groups, source="test")
    tb = collate(batch)
    tokens = tb.mask.sum(axis=1)
    expected = (tokens[:4].sum() * np.exp(0.2) + tokens[4:].sum() * 1.5) / tokens.sum()
    result = trainer.step(batch)
    assert result.metrics["importance_weight_mean"] == pytest.approx(expected, rel=1e-4)
    assert result.metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # the ratio is against the old policy


def test_ratio_is_against_the_inference_logprobs_when_given(q4_base):
    trainer = make_trainer(q4_base)
    batch = with_logprobs(random_batch(9), trainer, field="inference_logprobs", shift=-0.1)
    result = trainer.step(batch)
    assert result.metrics["ratio_mean"] == pytest.approx(np.exp(0.1), rel=1e-4)
    assert result.metrics["importance_weight_mean"] == 1.0


def test_old_policy_forward_runs_without_dropout(q4_base):
    """Without inference log-probs the old policy is one eval-mode forward: the same as giving those log-probs."""
    options = {"lora": {"dropout": 0.5}, "update_epochs": 2}
    computed = make_trainer(q4_base, **options)
    given = make_trainer(q4_base, **options)
    batch = random_batch(10)
    computed.step(batch)
    given.step(with_logprobs(batch, given, field="inference_logprobs"))
    for name, value in computed.adapter().items():
        np.testing.assert_allclose(np.array(value), np.array(given.adapter()[name]), atol=5e-5)


@pytest.mark.parametrize("given_rows", ["none", "half"])
def test_an_on_policy_step_reads_its_own_forward_as_the_old_policy(q4_base, given_rows):
    """One epoch without dropout: rows without engine log-probs take the gradient forward's own log-probs (detached)
    as the old policy - no separate forward - and train as if the learner's log-probs had been given (ratio 1)."""
    options = {"kl_beta": 0.0}
    own, given = make_trainer(q4_base, **options), make_trainer(q4_base, **options)
    batch = random_batch(14)
    full = with_logprobs(batch, given, field="inference_logprobs")
    if given_rows == "half":  # the first group's rows carry them, the second group's do not
        batch = RolloutBatch(groups=[full.groups[0], batch.groups[1]], source="test")
    forwards = []
    logprobs = own._logprobs
    own._logprobs = lambda mb, **kw: forwards.append(kw) or logprobs(mb, **kw)
    result = own.step(batch)
    assert all(kw.get("with_entropy", True) for kw in forwards)  # only gradient passes (old/reference: no entropy)
    assert result.metrics["ratio_min"] == pytest.approx(1.0, abs=1e-5)
    assert result.metrics["ratio_max"] == pytest.approx(1.0, abs=1e-5)
    given.step(full)
    for name, value in own.adapter().items():
        np.testing.assert_allclose(np.array(value), np.array(given.adapter()[name]), atol=1e-6, err_msg=name)
    # over two epochs the second one's model has moved: the old policy is a forward of its own
    forwards.clear()
    two = make_trainer(q4_base, update_epochs=2, **options)
    logprobs2 = two._logprobs
    two._logprobs = lambda mb, **kw: forwards.append(kw) or logprobs2(mb, **kw)
    two.step(random_batch(14))
    assert any(kw.get("with_entropy") is False for kw in forwards)


def test_second_epoch_moves_the_ratio(base):
    result = make_trainer(base, update_epochs=3, learning_rate=1e-2).step(random_batch(11))
    assert result.metrics["epochs"] == 3
    assert result.metrics["ratio_max"] > 1.0 and result.metrics["ratio_min"] < 1.0


def test_stale_cap_policy_defaults_the_cap_to_two(base):
    assert make_trainer(base, mode="async", stale_policy="cap").importance_cap == 2.0
    assert make_trainer(base, mode="async", stale_policy="cap", importance_cap=3.0).importance_cap == 3.0
    assert make_trainer(base, mode="async", stale_policy="drop").importance_cap is None


def test_algorithm_is_chosen_by_name(base):
    batch = random_batch(15)
    grpo = make_trainer(base).gradients(batch)[1]
    reinforce = make_trainer(base, algorithm="reinforce").gradients(batch)[1]
    # on-policy GRPO's gradient is the policy gradient with std-scaled advantages, REINFORCE's with unscaled ones
    name = next(k for k in grpo if k.endswith("lora_b"))  # lora_a has no gradient while B = 0
    assert not np.allclose(np.array(grpo[name]), np.array(reinforce[name]))
    result = make_trainer(base, algorithm="reinforce").step(batch)
    assert not result.skipped and result.metrics["clip_fraction"] == 0.0


# --- skipped steps ----------------------------------------------------------------------------------------------------


def test_non_finite_loss_skips_the_step(q4_base, caplog):
    trainer = make_trainer(q4_base)
    trainer.step(random_batch(12))
    adapter = arrays_np(trainer.adapter())
    optimizer = {k: np.array(v) for k, v in trainer.state()["optimizer"].items()}
    poisoned = with_logprobs(random_batch(13), trainer, field="inference_logprobs", shift=-1e4)  # exp overflows
    with caplog.at_level(logging.WARNING, logger="paraloop.learn"):
        result = trainer.step(poisoned)
    assert result.skipped and trainer.skipped_steps == 1
    assert (trainer.step_count, trainer.version) == (2, 1)
    assert "skipped (non-finite loss)" in caplog.text
    assert all(np.array_equal(adapter[k], np.array(v)) for k, v in trainer.adapter().items())
    state = trainer.state()["optimizer"]
    assert all(np.array_equal(optimizer[k], np.array(v)) for k, v in state.items())
    assert not trainer.step(random_batch(14)).skipped  # and training goes on


def test_batch_without_trained_tokens_is_skipped(base):
    trainer = make_trainer(base)
    group = ScoredGroup(tokens=[[5, 6, 7], [5, 6, 8]], masks=[[-100] * 3] * 2, scores=[1.0, 0.0])
    assert trainer.step(RolloutBatch(groups=[group], source="test")).skipped


# --- optimisation ----------------------------------------------------------------------------------------------------


def test_learning_rate_schedule():
    cfg = make_config(learning_rate=1.0, warmup_steps=2, lr_schedule="cosine", total_steps=6, min_lr_ratio=0.1)
    lrs = [learning_rate_at(s, cfg) for s in range(8)]
    np.testing.assert_allclose(lrs[:3], [0.5, 1.0, 1.0])
    np.testing.assert_allclose(lrs[4], 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 2 / 4)))
    np.testing.assert_allclose(lrs[6:], [0.1, 0.1])
    constant = make_config(learning_rate=0.3, warmup_steps=0)
    assert [learning_rate_at(s, constant) for s in (0, 100)] == [0.3, 0.3]


def test_gradient_clipping_bounds_the_global_norm():
    grads = {"a": mx.array([3.0, 4.0]), "b": {"c": mx.array([12.0])}}
    norm = global_norm(grads)
    assert norm.item() == pytest.approx(13.0)
    assert global_norm(clip_by_norm(grads, norm, 1.0)).item() == pytest.approx(1.0, rel=1e-5)
    assert clip_by_norm(grads, norm, None) is grads


# --- resume -----------------------------------------------------------------------------------------------------------


def test_resume_continues_bitwise_identically(q4_base, tiny_q4_model_path, compute, tmp_path):
    options = {
        "lora": {"dropout": 0.1},
        "kl_beta": 0.05,
        "ref_ema": 0.9,
        "update_epochs": 2,
        "warmup_steps": 1,
        "lr_schedule": "cosine",
        "total_steps": 4,
        "token_budget": 64,
    }
    batches = [random_batch(20 + i, inference=i % 2 == 1) for i in range(4)]
    straight = make_trainer(q4_base, **options)
    for b in batches:
        straight.step(b)

    first = make_trainer(q4_base, **options)
    for b in batches[:2]:
        first.step(b)
    state = first.state()
    mx.save_safetensors(str(tmp_path / "optimizer.safetensors"), state["optimizer"])
    mx.save_safetensors(str(tmp_path / "adapter.safetensors"), first.adapter())
    mx.save_safetensors(str(tmp_path / "reference.safetensors"), first.reference())
    saved = {
        "optimizer": mx.load(str(tmp_path / "optimizer.safetensors")),
        "trainer": json.loads(json.dumps(state["trainer"])),
    }

    fresh, _, _, _ = load_model(tiny_q4_model_path, compute=compute)
    resumed = make_trainer(fresh, **options)
    resumed.load_state(
        saved,
        mx.load(str(tmp_path / "adapter.safetensors")),
        mx.load(str(tmp_path / "reference.safetensors")),
    )
    assert (resumed.step_count, resumed.version) == (2, 2)
    for b in batches[2:]:
        resumed.step(b)
    for name, value in straight.adapter().items():
        assert np.array_equal(np.array(value), np.array(resumed.adapter()[name])), name
    for name, value in straight.reference().items():
        assert np.array_equal(np.array(value), np.array(resumed.reference()[name])), name


# --- learning ---------------------------------------------------------------------------------------------------------


def sample_group(model, prompt: list[int], *, n: int, max_new: int, key: mx.array) -> tuple[list, list, mx.array]:
    """n completions of `prompt` at temperature 1 (no KV cache: the sequences are a few tokens long)."""
    tokens = mx.array([prompt] * n)
    logprobs = []
    for _ in range(max_new):
        logits = model(tokens)[:, -1, :].astype(mx.float32)
        key, sub = mx.random.split(key)
        nxt = mx.random.categorical(logits, key=sub)
        logprobs.append(mx.take_along_axis(logits - mx.logsumexp(logits, axis=-1, keepdims=True), nxt[:, None], -1))
        tokens = mx.concatenate([tokens, nxt[:, None]], axis=1)
    return np.array(tokens).tolist(), np.array(mx.concatenate(logprobs, axis=1)).tolist(), key


def test_grpo_raises_a_toy_reward(tiny_model_path):
    """Reward = fraction of completion tokens with id < 128 (about 2% at the start). 12 GRPO steps lift it.

    The tiny model's final RMSNorm scale is raised to 10 first: with the stock scale of 1 and N(0, 0.02) embeddings
    its logits span only ~0.2, and no adapter inside the blocks could make any token set likely.
    """
    model, _, _, _ = load_model(tiny_model_path)
    model.model.norm.weight = model.model.norm.weight * 10.0
    trainer = make_trainer(model, learning_rate=1e-2, lora={"num_layers": -1, "dropout": 0.05}, kl_beta=0.05)
    prompts, key, rewards = [[1, 100, 200, 300], [1, 400, 500, 600]], mx.random.key(0), []
    for _ in range(12):
        groups = []
        for prompt in prompts:
            tokens, logprobs, key = sample_group(trainer.model, prompt, n=8, max_new=8, key=key)
            groups.append(
                ScoredGroup(
                    tokens=tokens,
                    masks=[[-100] * len(prompt) + t[len(prompt) :] for t in tokens],
                    scores=[float(np.mean(np.array(t[len(prompt) :]) < 128)) for t in tokens],
                    inference_logprobs=[[1.0] * len(prompt) + lp for lp in logprobs],
                )
            )
        rewards.append(trainer.step(RolloutBatch(groups=groups, source="test")).metrics["reward_mean"])
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.5, rewards
