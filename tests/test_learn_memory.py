"""Memory-aware micro-batches (learn/memory.py): the planner against a known cost, then the Trainer on the tiny model.

The planner tests give it a probe whose cost is a known function of (rows, width, checkpointing), so what fits is
exactly computable; the Trainer tests measure real MLX memory.
"""

import logging

import paraloop  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import mlx.core as mx
import numpy as np
import pytest
from test_learn_trainer import make_config, make_trainer, random_batch

from paraloop.config import RLTrainingConfig
from paraloop.learn.batch import collate
from paraloop.learn.memory import (
    MARGIN,
    MIN_ACTIVATION_BUDGET,
    MemoryPlanner,
    MemoryTargetError,
    PeakMeter,
    SequenceTooLong,
    machine_memory,
    memory_target,
)
from paraloop.messages import RolloutBatch, ScoredGroup

MiB = 2**20
GRADIENT = 1 * MiB


class FakeProbe:
    """True cost: gradient + b*w*(a + q*w) + h*scored bytes, checkpointing cutting a and q by 4 (not h: the LM head's
    logits of the scored positions). Records each call as (rows, width, checkpoint, scored per row)."""

    def __init__(self, a: float = 20_000.0, q: float = 40.0, h: float = 0.0) -> None:
        self.a, self.q, self.h, self.calls = a, q, h, []

    def cost(self, rows: int, width: int, checkpoint: bool, scored: int | None = None) -> float:
        """scored: positions scored per row (default: all)."""
        cut = 4.0 if checkpoint else 1.0
        per_row = width if scored is None else scored
        return GRADIENT + rows * width * (self.a + self.q * width) / cut + self.h * rows * per_row

    def __call__(self, rows: int, width: int, checkpoint: bool, scored: int) -> int:
        self.calls.append((rows, width, checkpoint, scored))
        return int(self.cost(rows, width, checkpoint, scored))


def planner(gb: float | None, weights: int = 0, **overrides) -> MemoryPlanner:
    """A planner with a memory target of `gb` GiB and, unless activation_memory_ratio is given, no activation
    budget (the tests of the target alone)."""
    settings = {"activation_memory_ratio": None, **overrides}
    if gb is None:
        settings["max_memory_fraction"] = None
    config = RLTrainingConfig(max_memory_gb=gb, **settings)
    return MemoryPlanner(config, gradient_bytes=GRADIENT, weight_bytes=weights, checkpointing_available=True)


def check_plans(plans, lengths, probe: FakeProbe, *, target: float, held: float) -> None:
    trained = sorted(int(i) for i in np.flatnonzero(np.asarray(lengths) > 0))
    assert sorted(int(r) for p in plans for r in p.rows) == trained  # every trained row once, no empty row
    for p in plans:
        assert p.width == max(lengths[r] for r in p.rows)
        assert held + GRADIENT + probe.cost(len(p.rows), p.width, p.checkpoint) <= target


def test_micro_batches_stay_within_the_target():
    lengths = np.array([300, 40, 0, 512, 512, 100, 250, 480, 30, 77] * 3)
    probe, held = FakeProbe(), 50 * MiB
    memory = planner(0.25, activation_checkpointing="never")
    plans = memory.plan(lengths, probe, held=held)
    check_plans(plans, lengths, probe, target=memory.target, held=held)
    assert 1 < len(plans) < 20  # memory, not the 8192-token budget, splits this batch
    assert sum(len(p.rows) * p.width for p in plans) < 8192 * len(plans)
    # a larger target packs more rows per micro-batch
    assert len(planner(1.0, activation_checkpointing="never").plan(lengths, FakeProbe(), held=held)) < len(plans)


def test_calibration_probes_grow_and_are_reused():
    probe = FakeProbe()
    memory = planner(4.0, activation_checkpointing="never")
    memory.plan(np.array([1000, 900, 20]), probe, held=0)
    # the first width also with one scored position (the head's share); rows up to 4x the longest probe: the fit
    assert probe.calls == [(1, 64, False, 64), (1, 64, False, 1), (1, 256, False, 256)]
    memory.plan(np.array([1900, 700]), probe, held=0)
    assert probe.calls[3:] == [(1, 1024, False, 1024)]
    memory.plan(np.array([3000, 40]), probe, held=0)  # covered: no probe
    assert len(probe.calls) == 4
    memory.plan(np.array([5000]), probe, held=0)  # the longest probe is 4096 tokens
    assert probe.calls[4:] == [(1, 4096, False, 4096)]
    cost = memory.costs[False]
    for width in (64, 777, 2100, 8000):  # exact for a cost of this form, up to the fit's rounding
        assert cost(3, width, 3 * width) == pytest.approx(probe.cost(3, width, False), rel=1e-6)


def test_no_target_and_no_activation_budget_mean_token_budget_only_and_no_probes():
    probe = FakeProbe()
    memory = planner(None, token_budget=1000)
    plans = memory.plan(np.array([400, 400, 400, 100]), probe, held=0)
    assert [len(p.rows) for p in plans] == [2, 2] and probe.calls == []


def test_a_row_too_long_to_fit_alone_is_a_clear_error_before_any_probe_of_it():
    probe = FakeProbe()
    memory = planner(0.05, activation_checkpointing="never")
    with pytest.raises(SequenceTooLong) as e:
        memory.plan(np.array([3000, 50]), probe, held=0)
    message = str(e.value)
    assert "3000 tokens" in message and "rl_training.max_memory_gb" in message
    assert "activation_checkpointing" in message  # the setting that would help
    assert all(width < 3000 for _, width, _, _ in probe.calls)  # predicted from smaller probes, never run at 3000


def test_auto_checkpoints_a_row_that_would_not_fit_otherwise():
    probe = FakeProbe()
    target = 0.1  # GiB: 2000 tokens fit only with checkpointing (cost / 4)
    assert GRADIENT * 2 + MARGIN * (probe.cost(1, 2000, False) - GRADIENT) > target * 2**30
    assert GRADIENT * 2 + MARGIN * (probe.cost(1, 2000, True) - GRADIENT) < target * 2**30
    memory = planner(target, activation_checkpointing="auto", checkpoint_min_length=100_000)
    plans = memory.plan(np.array([2000, 100, 90]), probe, held=0)
    assert plans[0].checkpoint and plans[0].width == 2000
    assert not plans[-1].checkpoint  # short rows stay on the cheaper path
    with pytest.raises(SequenceTooLong):
        planner(target, activation_checkpointing="never").plan(np.array([2000]), FakeProbe(), held=0)


def test_checkpointing_follows_the_length_threshold():
    memory = planner(64.0, activation_checkpointing="auto", checkpoint_min_length=512, token_budget=1200)
    plans = memory.plan(np.array([600, 520, 100, 90]), FakeProbe(), held=0)
    assert [(p.width, p.checkpoint) for p in plans] == [(600, True), (100, False)]
    always = planner(64.0, activation_checkpointing="always").plan(np.array([10]), FakeProbe(), held=0)
    assert always[0].checkpoint


def test_auto_calibrates_the_plain_path_only_below_the_threshold():
    probe = FakeProbe()
    memory = planner(8.0, activation_checkpointing="auto", checkpoint_min_length=1024, token_budget=2000)
    plans = memory.plan(np.array([2000, 300, 200]), probe, held=0)
    assert [(p.width, len(p.rows), p.checkpoint) for p in plans] == [(2000, 1, True), (300, 2, False)]
    plain = [w for _, w, c, _ in probe.calls if not c]
    checkpointed = [w for _, w, c, _ in probe.calls if c]
    assert plain == [64, 64, 256] and checkpointed == [64, 64, 256, 1024]  # plain rows are shorter than 1024


def test_the_activation_budget_keeps_micro_batches_of_short_rows_small_by_checkpointing_them():
    probe, lengths = FakeProbe(), np.array([500] * 16)
    assert len(planner(64.0).plan(lengths, FakeProbe(), held=0)) == 1  # no budget: one 8000-token micro-batch
    memory = planner(64.0, weights=380 * MiB, activation_memory_ratio=0.1)  # 38 MiB of activations
    budget = memory.activation_budget
    assert budget == 38 * MiB
    assert probe.cost(1, 500, False) - GRADIENT <= budget < probe.cost(2, 500, False) - GRADIENT
    plans = memory.plan(lengths, probe, held=0)
    check_plans(plans, lengths, probe, target=memory.target, held=0)
    assert all(p.checkpoint for p in plans)  # two rows plain would exceed the budget, checkpointed they fit
    assert all(probe.cost(len(p.rows), 500, True) - GRADIENT <= budget for p in plans)  # no margin: a soft bound
    assert probe.cost(len(plans[0].rows) + 1, 500, True) - GRADIENT > budget  # and as many rows as it allows
    assert 1 < len(plans) < 16  # checkpointing packs several rows where plain would take one each
    never = planner(64.0, weights=380 * MiB, activation_memory_ratio=0.1, activation_checkpointing="never")
    assert [len(p.rows) for p in never.plan(lengths, FakeProbe(), held=0)] == [1] * 16


def test_a_single_row_above_the_activation_budget_still_trains_only_the_target_refuses_rows():
    memory = planner(64.0, weights=400 * MiB, activation_memory_ratio=0.1)
    probe = FakeProbe()
    assert probe.cost(1, 3000, True) - GRADIENT > memory.activation_budget
    plans = memory.plan(np.array([3000, 3000, 40]), probe, held=0)
    assert [(p.width, len(p.rows), p.checkpoint) for p in plans] == [(3000, 1, True), (3000, 1, True), (40, 1, False)]


def test_the_activation_budget_applies_without_a_memory_target_and_has_a_floor():
    probe = FakeProbe()
    memory = planner(None, weights=1 * MiB, activation_memory_ratio=0.1)
    assert memory.target is None and memory.activation_budget == MIN_ACTIVATION_BUDGET  # not 0.1 MiB
    plans = memory.plan(np.array([500] * 16), probe, held=0)
    assert probe.calls and all(probe.cost(len(p.rows), 500, p.checkpoint) - GRADIENT <= MIN_ACTIVATION_BUDGET
                               for p in plans)  # fmt: skip
    assert planner(None, activation_memory_ratio=None).activation_budget is None


def test_rows_that_score_few_positions_pack_more_per_micro_batch():
    # RL rows: a long prompt and a short completion; only the completion goes through the LM head
    probe, lengths = FakeProbe(a=2_000.0, q=0.0, h=60_000.0), np.array([500] * 16)
    memory = planner(64.0, weights=400 * MiB, activation_memory_ratio=0.1, activation_checkpointing="never")
    whole = memory.plan(lengths, probe, held=0)
    few = memory.plan(lengths, probe, scored=np.full(16, 20), held=0)
    assert len(few) < len(whole)
    assert memory.costs[False].per_scored == pytest.approx(60_000.0, rel=1e-6)  # separated by the probes
    for p in few:  # still within the budget at their true cost
        assert probe.cost(len(p.rows), 500, False, 20) - GRADIENT <= memory.activation_budget
        assert p.scored == 20 * len(p.rows)


def test_a_micro_batch_that_used_more_than_predicted_raises_the_model():
    probe = FakeProbe()
    memory = planner(0.15, activation_checkpointing="never")
    lengths = np.array([256] * 16)
    before = memory.plan(lengths, probe, held=0)
    biggest = max(before, key=lambda p: len(p.rows))
    memory.observe(biggest, int(2 * probe.cost(len(biggest.rows), 256, False)))
    after = memory.plan(lengths, probe, held=0)
    assert max(len(p.rows) for p in after) < len(biggest.rows)


def test_what_a_micro_batch_used_raises_the_model_for_the_target_but_not_for_the_activation_budget():
    # async mode: MLX's peak during a micro-batch also holds what the engine allocated meanwhile
    probe, lengths = FakeProbe(), np.array([500] * 16)
    memory = planner(64.0, weights=400 * MiB, activation_memory_ratio=0.1)
    before = memory.plan(lengths, probe, held=0)
    memory.observe(before[0], int(3 * probe.cost(len(before[0].rows), 500, True)))
    assert memory.costs[True].correction > 1
    assert [len(p.rows) for p in memory.plan(lengths, probe, held=0)] == [len(p.rows) for p in before]


def test_memory_target_settings():
    assert memory_target(RLTrainingConfig(max_memory_gb=3.5)) == int(3.5 * 2**30)
    assert memory_target(RLTrainingConfig(max_memory_gb=2.0, max_memory_fraction=0.1)) == 2 * 2**30
    assert memory_target(RLTrainingConfig(max_memory_fraction=0.5)) == int(0.5 * machine_memory())
    assert memory_target(RLTrainingConfig(max_memory_fraction=None)) is None
    assert machine_memory() > 2**30


def test_peak_meter_measures_what_a_block_added():
    meter = PeakMeter()
    meter.start()
    keep = mx.zeros((1024, 256))  # 1 MiB held before the measured block
    mx.eval(keep)
    with meter.measure() as used:
        temp = mx.ones((2048, 1024))  # 8 MiB at its peak
        mx.eval(temp)
        del temp
    assert 8 * MiB <= used() < 9 * MiB
    assert meter.read() >= 9 * MiB


# --- the Trainer ------------------------------------------------------------------------------------------------


def long_batch(rows: int, length: int, seed: int = 0) -> RolloutBatch:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 1000, size=(rows, length)).tolist()
    prompt = length // 4
    group = ScoredGroup(
        tokens=tokens, masks=[[-100] * prompt + t[prompt:] for t in tokens], scores=[float(i % 2) for i in range(rows)]
    )
    return RolloutBatch(groups=[group], source="test")


def test_trainer_splits_by_memory_reports_its_peak_and_matches_one_micro_batch(base):
    batch = long_batch(6, 192)
    options = {"kl_beta": 0.1, "entropy_weight": 0.01, "activation_checkpointing": "never"}
    loss_one, one = make_trainer(base, max_memory_fraction=None, **options).gradients(batch)
    held = mx.get_active_memory()
    small = make_trainer(base, max_memory_gb=(held + 20 * MiB) / 2**30, **options)
    loss_split, split = small.gradients(batch)
    assert loss_split == pytest.approx(loss_one, rel=1e-5, abs=1e-7)
    scale = max(float(np.abs(np.array(g)).max()) for g in one.values())
    for name, g in one.items():
        np.testing.assert_allclose(np.array(split[name]), np.array(g), atol=1e-5 * scale, err_msg=name)
    result = small.step(batch)
    assert result.metrics["micro_batches"] > 1
    assert 0 < result.metrics["peak_memory_gb"] <= result.metrics["memory_target_gb"]


def test_trainer_raises_before_training_a_row_that_cannot_fit(base, caplog):
    trainer = make_trainer(base, max_memory_gb=(mx.get_active_memory() + 4 * MiB) / 2**30)
    before = {k: np.array(v) for k, v in trainer.adapter().items()}
    with pytest.raises(SequenceTooLong, match=r"sequence of 1999 tokens.*rl_training.max_memory_gb"):
        trainer.step(long_batch(2, 2000))
    assert trainer.step_count == 0 and trainer.version == 0
    assert all(np.array_equal(before[k], np.array(v)) for k, v in trainer.adapter().items())


def test_block_checkpointing_gives_the_same_gradients_for_lora_and_full_training(base):
    batch = long_batch(3, 96, seed=1)
    for mode in ("lora", "full"):
        extra = {"train_mode": mode, "kl_beta": 0.0} if mode == "full" else {"kl_beta": 0.1}
        plain = make_trainer(base, activation_checkpointing="never", **extra).gradients(batch)
        ckpt = make_trainer(base, activation_checkpointing="always", **extra).gradients(batch)
        assert ckpt[0] == pytest.approx(plain[0], rel=1e-6)
        assert set(ckpt[1]) == set(plain[1])
        for name, g in plain[1].items():
            np.testing.assert_allclose(np.array(ckpt[1][name]), np.array(g), atol=1e-6 * max(1.0, np.abs(g).max()))


def test_block_checkpointing_lowers_the_peak_of_a_gradient_pass(base):
    trainer = make_trainer(base, lora={"num_layers": -1})
    plain, ckpt = (trainer._probe(4, 256, checkpoint, 256) for checkpoint in (False, True))
    assert ckpt < 0.75 * plain
    result = make_trainer(base, activation_checkpointing="always").step(long_batch(2, 64))
    assert result.metrics["checkpointed_micro_batches"] == 1


def test_a_probe_ignores_what_something_else_allocated_during_one_of_its_passes(base):
    trainer = make_trainer(base)
    quiet = trainer._probe_once(2, 64, False, 64)
    gradient_pass, other = trainer._value_and_grad, []

    def disturbed(mb):  # an engine thread allocating 64 MiB during the first pass (and keeping it)
        out = gradient_pass(mb)
        if not other:
            other.append(mx.ones((16 * MiB,)))
            mx.eval(other[0])
        return out

    trainer._value_and_grad = disturbed
    assert trainer._probe(2, 64, False, 64) < quiet + 8 * MiB
    assert other  # the disturbance happened


def test_only_the_learners_trained_blocks_are_switched(base):
    from paraloop.model import twin

    block_class = type(base.layers[0])
    trainer = make_trainer(base, activation_checkpointing="always")  # LoRA on the last 2 of 4 blocks
    engine = twin(base)
    assert trainer.blocks.blocks == trainer.model.layers[2:]
    assert all(type(b) is not block_class and isinstance(b, block_class) for b in trainer.model.layers[2:])
    assert all(type(b) is block_class for b in trainer.model.layers[:2] + engine.layers + base.layers)
    with trainer.blocks.enabled():
        assert all(b._paraloop_checkpoint for b in trainer.model.layers[2:])
        assert not any(getattr(b, "_paraloop_checkpoint", False) for b in engine.layers + base.layers)
    assert not any(b._paraloop_checkpoint for b in trainer.model.layers[2:])


@pytest.fixture(scope="module")
def base(tiny_model_path):
    from paraloop.model import load_model

    model, _, _, _ = load_model(tiny_model_path)
    return model


def test_memory_settings_are_in_step_metrics_of_a_default_trainer(base, caplog):
    with caplog.at_level(logging.INFO, logger="paraloop.learn"):
        result = make_trainer(base).step(random_batch(0))
    assert result.metrics["memory_target_gb"] == pytest.approx(memory_target(make_config()) / 2**30)
    assert result.metrics["micro_batches"] == 1 and result.metrics["peak_memory_gb"] > 0
    assert collate(random_batch(0)).rows == 8


def test_full_training_that_cannot_take_an_optimizer_step_is_a_clear_error():
    config = RLTrainingConfig(max_memory_gb=1.0, train_mode="full", kl_beta=0.0)
    memory = MemoryPlanner(config, gradient_bytes=200 * MiB, weight_bytes=200 * MiB, checkpointing_available=True)
    with pytest.raises(MemoryTargetError, match=r"optimizer step needs about 1\.3.*train_mode = 'lora'"):
        memory.plan(np.array([10]), FakeProbe(), held=0, optimizer_ready=False)  # 7 x 200 MiB
    assert memory.plan(np.array([10]), FakeProbe(), held=0, optimizer_ready=True)  # 5 x 200 MiB fits
