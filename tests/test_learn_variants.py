"""The Trainer's loss options on the tiny model: Dr. GRPO's constant, GSPO/CISPO micro-batching, rollout correction
(TIS/MIS), overlong shaping and truncation masking, and the live train/inference mismatch check against rollouts
from the real engine."""

import paraloop  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import logging

import anyio
import mlx.core as mx
import mlx.nn as nn
import msgspec
import numpy as np
import pytest
from support import group
from support.trainers import make_config, make_trainer, random_batch, with_logprobs

from paraloop.config import EngineConfig, LoraConfig, RLTrainingConfig
from paraloop.engine import Engine
from paraloop.envs.mock import scored_group
from paraloop.learn.batch import collate
from paraloop.learn.mismatch import mismatch_alarm
from paraloop.learn.shaping import overlong_penalty, truncated_rows
from paraloop.learn.trainer import Trainer, norm_length
from paraloop.lora import adapter_config, attach_lora
from paraloop.messages import GenerateRequest, RolloutBatch, SamplingParams, ScoredGroup
from paraloop.model import load_model, twin


@pytest.fixture(scope="module")
def base(tiny_model_path):
    model, _, _, _ = load_model(tiny_model_path)
    return model


# --- Dr. GRPO -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", [None, 100])
def test_dr_grpo_divides_every_row_by_the_configured_constant(base, norm):
    """seq-mean-token-sum-norm: a trained token weighs 1 / (max_tokens * sequences), however long the batch's
    longest answer (here 13 trained tokens at most, in rows padded to the longest prompt + answer)."""
    trainer = make_trainer(base, loss_aggregation="seq-mean-token-sum-norm", max_tokens=40, loss_norm_length=norm)
    batch = random_batch(30)
    tb = collate(batch)
    assert tb.mask.sum(1).max() < tb.mask.shape[1] < 40  # the longest answer fills neither the width nor the cap
    micros, _ = trainer._prepare(batch)
    for mb in micros:
        w, mask = np.array(mb.weights), np.array(mb.mask)
        np.testing.assert_allclose(w[mask], 1 / ((norm or 40) * tb.rows), rtol=1e-6)
        assert np.all(w[~mask] == 0)


def test_dr_grpo_constant_is_the_mock_environments_generation_cap_and_is_logged(base, caplog):
    """Without loss_norm_length the constant is the cap rollouts were really generated with: mock.max_tokens for
    the mock environment (not rl_training.max_tokens), max_tokens for Atropos (its cap is unknown: the log says so)."""
    with caplog.at_level(logging.INFO, logger="paraloop.learn"):
        trainer = make_trainer(base, loss_aggregation="seq-mean-token-sum-norm", max_tokens=40, mock={"max_tokens": 24})
    assert trainer.norm_length == 24 and "divided by 24 (rl_training.mock.max_tokens" in caplog.text
    micros, _ = trainer._prepare(random_batch(30))
    rows = collate(random_batch(30)).rows
    for mb in micros:
        np.testing.assert_allclose(np.array(mb.weights)[np.array(mb.mask)], 1 / (24 * rows), rtol=1e-6)
    atropos = make_config(
        loss_aggregation="seq-mean-token-sum-norm",
        max_tokens=40,
        mock={"max_tokens": 24},
        atropos={"api_url": "http://localhost:8001"},
    )
    length, source = norm_length(atropos)
    assert length == 40 and "set rl_training.loss_norm_length" in source


# --- GSPO, CISPO, rollout correction: micro-batches sum to the full batch ------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"algorithm": "gspo", "clip_ratio": 3e-3, "clip_ratio_high": 4e-3, "loss_aggregation": "seq-mean-token-mean"},
        {"algorithm": "cispo", "cispo_clip_max": 1.05},
        {"importance_cap": 1.1, "importance_min": 0.95, "importance_level": "sequence", "importance_mode": "mask"},
        {"algorithm": "gspo", "importance_cap": 1.02, "importance_level": "token", "importance_mode": "truncate"},
    ],
    ids=["gspo", "cispo", "seq-mis", "gspo-token-tis"],
)
def test_micro_batched_gradient_equals_the_full_batch_for_every_variant(base, options):
    """Sequence-level ratios need a row's tokens in one micro-batch: they are (rows are never split)."""
    full_trainer = make_trainer(base, token_budget=65536, kl_beta=0.0, **options)
    micro_trainer = make_trainer(base, token_budget=64, kl_beta=0.0, **options)
    batch = random_batch(31, groups=3)
    full_trainer.step(batch)  # a second step has ratios away from 1: the clips and weights bite
    micro_trainer.step(batch)
    nxt = with_logprobs(random_batch(32, groups=3), full_trainer, field="inference_logprobs", shift=0.01)
    loss_full, full = full_trainer.gradients(nxt)
    loss_micro, micro = micro_trainer.gradients(nxt)
    assert len(micro_trainer._prepare(nxt)[0]) > 1, "the small budget really splits the batch"
    assert loss_micro == pytest.approx(loss_full, rel=1e-5, abs=1e-7)
    scale = max(float(np.abs(np.array(g)).max()) for g in full.values())
    assert scale > 0
    for name, g in full.items():
        np.testing.assert_allclose(np.array(micro[name]), np.array(g), atol=1e-5 * scale, err_msg=name)


def test_each_variant_trains(base):
    for algorithm in ("gspo", "cispo"):
        result = make_trainer(base, algorithm=algorithm).step(random_batch(33, inference=True))
        assert not result.skipped and np.isfinite(result.metrics["loss"]) and result.metrics["grad_norm"] > 0


def test_sequence_mask_drops_whole_sequences_and_logs_raw_ratios(base):
    """MIS at sequence level: a row whose product of ratios leaves [min, cap] gets weight 0 on every token; the
    ratios are logged raw, before masking."""
    trainer = make_trainer(
        base, importance_cap=1.5, importance_min=0.5, importance_level="sequence", importance_mode="mask"
    )
    near = with_logprobs(random_batch(34, groups=1), trainer, field="inference_logprobs", shift=-0.005)
    far = with_logprobs(random_batch(35, groups=1), trainer, field="inference_logprobs", shift=-0.3)
    batch = RolloutBatch(groups=near.groups + far.groups, source="test")
    tokens = collate(batch).mask.sum(axis=1)
    ratios = np.exp(np.concatenate([0.005 * tokens[:4], 0.3 * tokens[4:]]))  # exp(sum_t (old - rollout))
    assert (ratios[:4] < 1.5).all() and (ratios[4:] > 1.5).all()
    m = trainer.step(batch).metrics
    kept = tokens[:4] @ ratios[:4]  # rejected tokens leave the mask: the mean is over the kept ones
    assert m["importance_weight_mean"] == pytest.approx(kept / tokens[:4].sum(), rel=1e-4)
    assert m["importance_changed_fraction"] == pytest.approx(tokens[4:].sum() / tokens.sum())
    assert m["importance_ratio_max"] == pytest.approx(ratios.max(), rel=1e-4)
    assert m["importance_ratio_mean"] == pytest.approx(tokens @ ratios / tokens.sum(), rel=1e-4)


def test_token_truncation_caps_from_above_only(base):
    """TIS as verl's rollout_is: min(rho, cap); a ratio below 1 keeps its value (no lower clip)."""
    trainer = make_trainer(base, importance_cap=1.1)
    low = with_logprobs(random_batch(36, groups=1), trainer, field="inference_logprobs", shift=0.2)  # ratio e^-0.2
    high = with_logprobs(random_batch(37, groups=1), trainer, field="inference_logprobs", shift=-0.2)  # e^0.2
    m = trainer.step(RolloutBatch(groups=low.groups + high.groups, source="test")).metrics
    tokens = collate(RolloutBatch(groups=low.groups + high.groups, source="test")).mask.sum(1)
    expected = (tokens[:4].sum() * np.exp(-0.2) + tokens[4:].sum() * 1.1) / tokens.sum()
    assert m["importance_weight_mean"] == pytest.approx(expected, rel=1e-4)
    assert m["importance_ratio_min"] == pytest.approx(np.exp(-0.2), rel=1e-4)
    assert m["importance_changed_fraction"] == pytest.approx(tokens[4:].sum() / tokens.sum())


def test_truncation_with_a_lower_bound_is_a_config_error():
    with pytest.raises(ValueError, match="caps from above only"):
        RLTrainingConfig(importance_cap=1.1, importance_min=0.95)
    RLTrainingConfig(importance_cap=1.1, importance_min=0.95, importance_mode="mask")


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_mask_takes_rejected_tokens_out_of_every_denominator_and_of_kl_and_entropy(base, level):
    """verl's rollout_rs: a rejected token leaves the response mask. With a whole group rejected (its ratios far
    outside the bounds), the batch trains exactly as the kept group alone: the same loss and gradient, KL and
    entropy terms and every aggregation's denominators included (before, rejected tokens still counted)."""
    for aggregation in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        options = {
            "importance_cap": 1.5,
            "importance_mode": "mask",
            "importance_level": level,
            "kl_beta": 0.1,
            "entropy_weight": 0.01,
            "loss_aggregation": aggregation,
        }
        trainer = make_trainer(base, **options)
        trainer.step(random_batch(38, groups=2))  # the policy moves away from the reference: KL is not 0
        near = with_logprobs(random_batch(39, groups=1), trainer, field="inference_logprobs", shift=-0.01)
        far = with_logprobs(random_batch(40, groups=1), trainer, field="inference_logprobs", shift=-0.7)
        both = RolloutBatch(groups=near.groups + far.groups, source="test")
        loss_both, g_both = trainer.gradients(both)
        loss_near, g_near = trainer.gradients(near)
        # The same function on differently padded batches (float32 sums grouped differently): the micro-batch
        # test's tolerance, 1e-5 of the largest gradient entry.
        assert loss_both == pytest.approx(loss_near, rel=1e-5), aggregation
        scale = max(float(np.abs(np.array(g)).max()) for g in g_near.values())
        assert scale > 0
        for name, g in g_near.items():
            np.testing.assert_allclose(np.array(g_both[name]), np.array(g), atol=1e-5 * scale, err_msg=name)


def test_rows_without_engine_logprobs_are_not_down_weighted_by_rollout_correction(base):
    """A mixed batch (async stale_policy = "cap", or an environment that sends no log-probs) with importance_cap:
    rows without engine log-probs get importance weight 1 on every token. Their group's gradient equals the same
    batch's without any correction, while the other group (equal scores: no advantage) has its ratios capped."""
    corrected = make_trainer(base, importance_cap=1.01, kl_beta=0.0)
    plain = make_trainer(base, kl_beta=0.0)
    without = random_batch(41, groups=1)
    capped = with_logprobs(random_batch(42, groups=1), corrected, field="inference_logprobs", shift=-0.3)
    capped = RolloutBatch(groups=[msgspec.structs.replace(capped.groups[0], scores=[0.5] * 4)], source="test")
    mixed = RolloutBatch(groups=without.groups + capped.groups, source="test")
    micros, _ = corrected._prepare(mixed)
    for mb in micros:
        weight, mask, has = np.array(mb.importance_weight), np.array(mb.mask), mb.extras["has_inference"]
        assert np.all(weight[~has][mask[~has]] == 1.0) and np.allclose(weight[has][mask[has]], 1.01)
    assert sum(int(mb.extras["has_inference"].sum()) for mb in micros) == 4
    tokens = collate(mixed).mask.sum(1)
    loss_c, g_c = corrected.gradients(mixed)
    loss_p, g_p = plain.gradients(mixed)
    assert loss_c == pytest.approx(loss_p, rel=1e-5)
    scale = max(float(np.abs(np.array(g)).max()) for g in g_p.values())
    for name, g in g_p.items():
        np.testing.assert_allclose(np.array(g_c[name]), np.array(g), atol=1e-5 * scale, err_msg=name)
    m = corrected.step(mixed).metrics
    assert m["importance_changed_fraction"] == 1.0  # of the tokens with engine log-probs: all capped
    assert m["importance_weight_mean"] == pytest.approx((tokens[:4].sum() + 1.01 * tokens[4:].sum()) / tokens.sum())


def test_gspo_defaults_to_the_papers_aggregation_unless_set():
    assert RLTrainingConfig(algorithm="gspo").loss_aggregation == "seq-mean-token-mean"
    assert RLTrainingConfig(algorithm="gspo", loss_aggregation="token-mean").loss_aggregation == "token-mean"
    assert RLTrainingConfig().loss_aggregation == "token-mean"


# --- overlong shaping and truncated completions -------------------------------------------------------------------


def test_overlong_penalty_follows_dapo():
    lengths = np.array([0, 10, 12, 14, 16, 20])
    caps = np.full(6, 16)
    np.testing.assert_allclose(
        overlong_penalty(lengths, caps, buffer=4, factor=0.5), 0.5 * np.array([0, 0, 0, -0.5, -1.0, -1.0])
    )
    assert not overlong_penalty(lengths, caps, buffer=0, factor=1.0).any()


def group_with(lengths: list[int], reasons: list[str] | None, *, max_tokens: int | None = None) -> ScoredGroup:
    """Completions of these lengths after a 3-token prompt, with these finish reasons (None: not given)."""
    return group(
        [1.0] * len(lengths),
        prompt=[5, 6, 7],
        completions=[range(10, 10 + n) for n in lengths],
        overrides=[{"finish_reason": r} for r in reasons] if reasons else None,
        generation_params={"max_tokens": max_tokens} if max_tokens else None,
    )


def test_truncated_rows_trust_the_finish_reason_else_the_length():
    batch = RolloutBatch(
        groups=[
            group_with([4, 6], ["stop", "length"]),
            group_with([6, 3], None, max_tokens=6),
            group_with([8, 2], None),
        ],
        source="test",
    )
    lengths = collate(batch).mask.sum(1)
    caps = np.array([6, 6, 6, 6, 8, 8])  # the group's max_tokens, else the configured one (8)
    assert truncated_rows(batch, lengths, caps).tolist() == [False, True, True, False, True, False]


def test_mask_truncated_and_overlong_penalty_in_a_step(base):
    trainer = make_trainer(base, mask_truncated=True, overlong_buffer=4, overlong_penalty=1.0, max_tokens=8)
    batch = RolloutBatch(groups=[group_with([8, 6, 3, 8], ["length", "stop", "stop", "stop"])], source="test")
    m = trainer.step(batch).metrics
    assert m["truncated_fraction"] == 0.25
    assert m["trained_tokens"] == 6 + 3 + 8  # the truncated row is out of the loss
    assert m["overlong_penalty_mean"] == pytest.approx(np.mean([-1.0, -0.5, 0.0, -1.0]))
    assert m["reward_mean"] == 1.0  # metrics report the environment's scores


# --- train/inference mismatch ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine_run(tiny_model_path):
    """A LoRA'd tiny model, its engine twin, and seeded engine completions at temperature 0.7 (version 0)."""
    return run_engine(tiny_model_path)


@pytest.fixture(scope="module")
def filtered_run(tiny_model_path):
    """The same, sampled with top_p = 0.8 and top_k = 20: every token from a kept set the engine records."""
    return run_engine(tiny_model_path, top_p=0.8, top_k=20)


def run_engine(tiny_model_path, **filters):
    model, tokenizer, _, _ = load_model(tiny_model_path)
    cfg = adapter_config(LoraConfig(rank=4, num_layers=2, dropout=0.0), model)
    attach_lora(model, cfg, seed=0)
    engine_model = twin(model)
    engine_model.eval()
    prompts = [tokenizer.encode(text) for text in ("The river runs", "Count to three:")]
    requests = [
        GenerateRequest(
            request_id=f"r{i}",
            prompt_tokens=p,
            n=4,
            params=SamplingParams(temperature=0.7, max_tokens=8, seed=i, **filters),
        )
        for i, p in enumerate(prompts)
    ]

    async def main():
        engine = Engine(engine_model, tokenizer, config=EngineConfig(), batch_size=16, adapter=None)
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                await tg.start(engine.run)
                results = await engine.complete_many(requests)
                tg.cancel_scope.cancel()
        return results

    results = anyio.run(main, backend="asyncio")
    return model, cfg, requests, results


def learner(model, cfg, *, dropout: float = 0.0, **options) -> Trainer:
    """A trainer on a twin of the engine's model (own LoRA arrays), its LoRA dropout set to `dropout`."""
    twin_model = twin(model)
    for _, module in twin_model.named_modules():
        if hasattr(module, "lora_a"):
            module.dropout = nn.Dropout(p=dropout)
    lora = LoraConfig(rank=4, num_layers=2, dropout=dropout)
    config = RLTrainingConfig(**{"kl_beta": 0.0, "learning_rate": 1e-6, **options}, lora=lora)
    return Trainer(twin_model, config=config, adapter_config=cfg)


def rollouts(requests, results, *, temperature: float) -> RolloutBatch:
    groups = [
        scored_group(r.prompt_tokens, c, [float(j % 2) for j in range(len(c))], temperature=temperature)
        for r, c in zip(requests, results, strict=True)
    ]
    return RolloutBatch(groups=groups, source="mock")


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_mismatch_is_zero_for_the_engines_rollouts_and_large_at_a_wrong_temperature(engine_run, dropout):
    """The learner rescores the engine's tokens: at the temperature they were sampled at, |engine - learner| is
    float rounding; declared at another temperature, the two disagree (what a missing temperature does in peers).
    With LoRA dropout the check runs on an eval-mode forward; without, on the gradient forward itself."""
    model, cfg, requests, results = engine_run
    trainer = learner(model, cfg, dropout=dropout)
    assert trainer._dropout == (dropout > 0)
    right = trainer.step(rollouts(requests, results, temperature=0.7)).metrics
    assert right["mismatch_tokens"] == 64 and right["mismatch_abs_mean"] < 1e-4 and right["mismatch_abs_max"] < 1e-3
    assert right["rollout_ratio_outside"] == 0 and right["rollout_ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert right["staleness_mean"] == 0 and mismatch_alarm(right, 0.01) is None

    wrong = learner(model, cfg, dropout=dropout).step(rollouts(requests, results, temperature=1.0)).metrics
    assert wrong["mismatch_abs_mean"] > 0.03
    assert wrong["mismatch_abs_max"] > 0.1
    alarm = mismatch_alarm(wrong, 0.01)
    assert alarm is not None and "mismatch_threshold" in alarm


@pytest.mark.parametrize("chunked", [True, False])
def test_sampling_mask_replay_closes_the_gap_that_top_p_and_top_k_open(filtered_run, chunked):
    """Rollouts sampled with top_p / top_k carry their kept-set sizes: the learner scores each token over the same
    set and agrees with the engine to rounding. Without the record (an environment that drops it) it scores the
    full vocabulary and every ratio is off by the kept set's missing mass."""
    model, cfg, requests, results = filtered_run
    batch = rollouts(requests, results, temperature=0.7)
    assert all(g.sampling_kept is not None for g in batch.groups)
    kept = np.array(
        [
            k
            for g in batch.groups
            for row, mask in zip(g.sampling_kept, g.masks, strict=True)
            for k, m in zip(row, mask, strict=True)
            if m != -100
        ]
    )
    assert kept.size == 64 and (kept >= 1).all() and (kept <= 20).all()
    options = {} if chunked else {"logits_chunk_tokens": 0}
    replayed = learner(model, cfg, **options).step(batch).metrics
    assert replayed["mismatch_abs_mean"] < 1e-4 and replayed["mismatch_abs_max"] < 1e-3
    assert replayed["rollout_ratio_outside"] == 0
    stripped = RolloutBatch(
        groups=[msgspec.structs.replace(g, sampling_kept=None) for g in batch.groups], source="mock"
    )
    full = learner(model, cfg, **options).step(stripped).metrics
    assert full["mismatch_abs_mean"] > 0.1 and full["rollout_ratio_mean"] < 0.9


def test_mismatch_compares_only_rows_of_the_learners_version(engine_run):
    """After one step the learner holds version 1: version-0 rollouts differ by policy change, not numerics,
    so they count in the ratio distribution and staleness but not in |engine - learner|."""
    model, cfg, requests, results = engine_run
    trainer = learner(model, cfg, learning_rate=1e-2)
    batch = rollouts(requests, results, temperature=0.7)
    trainer.step(batch)
    m = trainer.step(batch).metrics
    assert "mismatch_abs_mean" not in m and m["staleness_mean"] == 1 and m["staleness_max"] == 1
    assert m["rollout_ratio_max"] > 1.0 > m["rollout_ratio_min"]


def test_rows_without_engine_logprobs_have_no_mismatch(base):
    m = make_trainer(base).step(random_batch(38)).metrics
    assert not any(k.startswith(("mismatch", "rollout_ratio", "staleness")) for k in m)


def test_the_mismatch_probe_does_not_change_the_update(engine_run):
    """Measuring on the gradient forward (no dropout) changes nothing the optimizer sees."""
    model, cfg, requests, results = engine_run
    batch = rollouts(requests, results, temperature=0.7)
    probed = learner(model, cfg)
    unprobed = learner(model, cfg)
    unprobed._mismatch_in_loss = lambda logp, mb: {}
    loss, grads = probed.gradients(batch)
    assert unprobed.gradients(batch)[0] == loss
    for name, g in unprobed.gradients(batch)[1].items():
        assert mx.array_equal(g, grads[name]), name
    assert "mismatch_abs_mean" in probed.step(batch).metrics
    assert "mismatch_abs_mean" not in unprobed.step(batch).metrics
