"""On-policy distillation's advantage (learn/distill.py) through the Trainer, against an independent float64 NumPy
version of the whole step: a toy model (embedding + LM head, trained in full), GRPO with the teacher term added to
the task advantage, several micro-batches. Loss and gradients within LOSS_TOL / GRAD_TOL (measured per
kernel beside them)."""

import paraloop  # noqa: F401  (OpenBLAS before mlx)

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from support.compute_paths import assert_within

from paraloop.config import DistillConfig, RLTrainingConfig
from paraloop.learn.batch import collate
from paraloop.learn.distill import distill_advantages, teacher_logprob_of
from paraloop.learn.trainer import Trainer
from paraloop.messages import RolloutBatch, ScoredGroup

V, D = 23, 6
TEMPERATURE = 0.7
# float32 Trainer vs the float64 reference. Worst measured (loss relative / gradients of their largest entry), by
# OpenBLAS kernel: Zen 9.3e-7 / 3.9e-7, Haswell 9.3e-7 / 3.9e-7, Sandybridge 1.1e-6 / 4.2e-7.
LOSS_TOL = 5e-6
GRAD_TOL = 5e-6


class Body(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(V, D)

    def __call__(self, ids: mx.array) -> mx.array:
        return self.embed_tokens(ids)


class Toy(nn.Module):
    """logits = E[ids] @ W.T: small enough for a hand-written float64 gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.model = Body()
        self.lm_head = nn.Linear(D, V, bias=False)

    def __call__(self, ids: mx.array) -> mx.array:
        return self.lm_head(self.model(ids))


def toy(seed: int) -> Toy:
    mx.random.seed(seed)
    model = Toy()
    mx.eval(model.parameters())
    return model


def batch(seed: int, *, teacher: bool = True, inference: bool = True) -> RolloutBatch:
    """Two groups of four; engine log-probs near the toy's (ratios near 1, some clipped), teacher log-probs spread."""
    rng = np.random.default_rng(seed)
    groups = []
    for _ in range(2):
        tokens, masks, inf, tea = [], [], [], []
        for _ in range(4):
            prompt, new = int(rng.integers(1, 4)), int(rng.integers(4, 14))
            seq = rng.integers(0, V, size=prompt + new).tolist()
            tokens.append(seq)
            masks.append([-100] * prompt + seq[prompt:])
            inf.append([1.0] * prompt + rng.uniform(-4.0, -2.0, size=new).tolist())
            tea.append([1.0] * prompt + rng.uniform(-6.0, -0.5, size=new).tolist())
        groups.append(
            ScoredGroup(
                tokens=tokens,
                masks=masks,
                scores=rng.random(4).tolist(),
                inference_logprobs=inf if inference else None,
                teacher_logprobs=tea if teacher else None,
            )
        )
    return RolloutBatch(groups=groups, source="test")


# --- the float64 reference -----------------------------------------------------------------------------------------


def np_reference(model: Toy, rb: RolloutBatch, *, weight: float, reward_weight: float, clip: float):
    """(loss, {"E": dE, "W": dW}) of one GRPO step with the teacher term, token-mean aggregation, in float64."""
    E = np.array(model.model.embed_tokens.weight, np.float64)
    W = np.array(model.lm_head.weight, np.float64)
    rows = [(g, i) for g in rb.groups for i in range(len(g.tokens))]
    scores = [np.asarray(g.scores, np.float64) for g in rb.groups]
    task = [(s - s.mean()) / (s.std() + 1e-4) for s in scores]  # GRPO, population std
    trained = sum(sum(m != -100 for m in g.masks[i][1:]) for g, i in rows)
    loss, dE, dW = 0.0, np.zeros_like(E), np.zeros_like(W)
    for gi, g in enumerate(rb.groups):
        for i, seq in enumerate(g.tokens):
            for t in range(1, len(seq)):
                if g.masks[i][t] == -100:
                    continue
                h = E[seq[t - 1]]
                z = W @ h / TEMPERATURE
                logp_all = z - z.max() - np.log(np.exp(z - z.max()).sum())
                logp = logp_all[seq[t]]
                behaviour = g.inference_logprobs[i][t]
                adv = reward_weight * task[gi][i]
                if g.teacher_logprobs is not None:
                    adv += weight * (g.teacher_logprobs[i][t] - behaviour)
                r = np.exp(logp - behaviour)
                unclipped, clipped = r * adv, np.clip(r, 1 - clip, 1 + clip) * adv
                loss += -min(unclipped, clipped) / trained
                dlogp = (-adv * r if unclipped <= clipped else 0.0) / trained
                dz = dlogp * (np.eye(V)[seq[t]] - np.exp(logp_all)) / TEMPERATURE
                dW += np.outer(dz, h)
                dE[seq[t - 1]] += W.T @ dz
    return loss, {"model.embed_tokens.weight": dE, "lm_head.weight": dW}


def trainer_for(model: Toy, *, weight: float, reward_weight: float, clip: float, chunk: int | None) -> Trainer:
    config = RLTrainingConfig(
        train_mode="full",
        kl_beta=0.0,
        clip_ratio=clip,
        token_budget=64,
        temperature=TEMPERATURE,
        logits_chunk_tokens=chunk,
        max_memory_fraction=None,
    )
    distill = DistillConfig(weight=weight, reward_weight=reward_weight)
    return Trainer(model, config=config, adapter_config=None, distill=distill)


def with_temperature(rb: RolloutBatch) -> RolloutBatch:
    return RolloutBatch(
        groups=[
            ScoredGroup(
                **{**{f: getattr(g, f) for f in g.__struct_fields__}, "generation_params": {"temperature": TEMPERATURE}}
            )
            for g in rb.groups
        ],
        source=rb.source,
    )


@pytest.mark.parametrize("chunk", [0, None], ids=["full-logits", "chunked"])
@pytest.mark.parametrize(("weight", "reward_weight"), [(1.0, 1.0), (0.5, 0.0), (0.0, 1.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_trainer_loss_and_gradients_match_float64(seed, weight, reward_weight, chunk):
    model = toy(seed)
    rb = with_temperature(batch(seed))
    expected, grads = np_reference(model, rb, weight=weight, reward_weight=reward_weight, clip=0.2)
    trainer = trainer_for(model, weight=weight, reward_weight=reward_weight, clip=0.2, chunk=chunk)
    loss, got = trainer.gradients(rb)
    assert_within("distill loss vs float64, relative", abs(loss - expected) / abs(expected), LOSS_TOL)
    for name, g in grads.items():
        gap = np.abs(np.array(got[name], np.float64) - g).max() / np.abs(g).max()
        assert_within("distill gradients vs float64, of the largest entry", gap, GRAD_TOL)
    micro = trainer._prepare(rb)[0]
    assert len(micro) > 1  # the budget splits the batch: the sum over micro-batches is the whole loss


def test_some_tokens_take_the_clipped_branch():
    """Guards the float64 test: at these inputs the PPO clip is reached, so both branches are compared."""
    model = toy(0)
    rb = with_temperature(batch(0))
    tb = collate(rb)
    logits = np.array(model(mx.array(tb.input_ids)), np.float64) / TEMPERATURE
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    chosen = np.take_along_axis(logp, tb.targets[..., None], -1)[..., 0]
    r = np.exp(chosen - tb.inference_logprobs)[tb.mask]
    assert ((r < 0.8) | (r > 1.2)).any() and ((r > 0.8) & (r < 1.2)).any()


def test_distill_kl_metric_is_the_mean_student_minus_teacher_logprob():
    rb = batch(3)
    tb = collate(rb)
    _, metrics = distill_advantages(tb, np.zeros(tb.mask.shape, np.float32), weight=1.0, reward_weight=1.0)
    diffs = [
        s - t
        for g in rb.groups
        for si, ti, m in zip(g.inference_logprobs, g.teacher_logprobs, g.masks, strict=True)
        for s, t, mm in zip(si[1:], ti[1:], m[1:], strict=True)
        if mm != -100
    ]
    assert metrics["distill_kl"] == pytest.approx(np.mean(diffs), rel=1e-5)
    assert metrics["distill_tokens"] == len(diffs)
    assert metrics["distill_rows_missing"] == 0


def test_rows_without_engine_logprobs_keep_the_task_term_and_are_counted():
    rb = batch(4, inference=False)
    tb = collate(rb)
    task = np.ones(tb.mask.shape, np.float32)
    adv, metrics = distill_advantages(tb, task, weight=1.0, reward_weight=2.0)
    assert np.array_equal(adv, 2 * task)
    assert metrics == {"distill_rows_missing": 8.0}


def test_a_batch_without_teacher_logprobs_trains_as_before():
    model = toy(5)
    rb = with_temperature(batch(5, teacher=False))
    plain = Trainer(
        toy(5), config=trainer_for(model, weight=0, reward_weight=1, clip=0.2, chunk=0).config, adapter_config=None
    )
    distilled = trainer_for(toy(5), weight=3.0, reward_weight=1.0, clip=0.2, chunk=0)
    assert plain.gradients(rb)[0] == distilled.gradients(rb)[0]
    assert "distill_kl" not in distilled.step(rb).metrics


def test_step_metrics_carry_the_teacher_student_kl():
    trainer = trainer_for(toy(6), weight=1.0, reward_weight=0.0, clip=0.2, chunk=0)
    metrics = trainer.step(with_temperature(batch(6))).metrics
    assert metrics["distill_kl"] > 0 and metrics["distill_tokens"] > 0


def test_an_extreme_teacher_logprob_is_bounded_not_inf():
    rb = batch(7)
    group = rb.groups[0]
    tea = [list(row) for row in group.teacher_logprobs]
    tea[0][-1] = -1e30
    rb = RolloutBatch(
        groups=[
            ScoredGroup(**{**{f: getattr(group, f) for f in group.__struct_fields__}, "teacher_logprobs": tea}),
            rb.groups[1],
        ],
        source="test",
    )
    tb = collate(rb)
    adv, _ = distill_advantages(tb, np.zeros(tb.mask.shape, np.float32), weight=1.0, reward_weight=0.0)
    assert np.isfinite(adv).all() and adv.min() >= -20.0


def test_teacher_logprob_of_a_token_from_a_top_k_position():
    assert teacher_logprob_of(5, [3, 5, 9], [-0.1, -1.5, -3.0]) == -1.5
    assert teacher_logprob_of(7, [3, 5, 9], [-0.1, -1.5, -3.0]) == -3.0  # unlisted: the top-k's smallest
    assert teacher_logprob_of(7, [], []) is None
