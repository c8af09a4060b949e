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
from support.trainers import make_config, make_trainer, random_batch

from paraloop.config import RLTrainingConfig
from paraloop.learn.batch import collate
from paraloop.learn import memory as memory_module
from paraloop.learn.memory import (
    MARGIN,
    MemoryPlanner,
    MemoryTargetError,
    Mode,
    PeakMeter,
    SequenceTooLong,
    machine_memory,
    memory_target,
)
from paraloop.messages import RolloutBatch, ScoredGroup

MiB = 2**20
GRADIENT = 1 * MiB


class FakeProbe:
    """True cost: gradient + b*w*(a + q*w) + h*scored (+ k*scored with kept logits) bytes, checkpointing cutting a and
    q by 4 (not h: the LM head's logits of the scored positions). Records each call as (rows, width, mode, scored
    per row)."""

    def __init__(self, a: float = 20_000.0, q: float = 40.0, h: float = 0.0, k: float = 0.0) -> None:
        self.a, self.q, self.h, self.k, self.calls = a, q, h, k, []

    def cost(self, rows: int, width: int, mode: Mode | bool, scored: int | None = None) -> float:
        """scored: positions scored per row (default: all); a bool mode: checkpointing, logits recomputed."""
        mode = Mode(mode) if isinstance(mode, bool) else mode
        cut = 4.0 if mode.checkpoint else 1.0
        per_row = width if scored is None else scored
        head = self.h + (self.k if mode.keep_logits else 0.0)
        return GRADIENT + rows * width * (self.a + self.q * width) / cut + head * rows * per_row

    def __call__(self, rows: int, width: int, mode: Mode, scored: int) -> int:
        self.calls.append((rows, width, mode, scored))
        return int(self.cost(rows, width, mode, scored))


def planner(gb: float | None, *, keep_logits: bool = False, **overrides) -> MemoryPlanner:
    """A planner with a memory target of `gb` GiB (None: no target); keep_logits: the head can keep its logits."""
    settings = dict(overrides)
    if gb is None:
        settings.setdefault("max_memory_fraction", None)
    config = RLTrainingConfig(max_memory_gb=gb, **settings)
    return MemoryPlanner(
        config, gradient_bytes=GRADIENT, checkpointing_available=True, keep_logits_available=keep_logits
    )


def check_plans(plans, lengths, probe: FakeProbe, *, target: float, held: float) -> None:
    trained = sorted(int(i) for i in np.flatnonzero(np.asarray(lengths) > 0))
    assert sorted(int(r) for p in plans for r in p.rows) == trained  # every trained row once, no empty row
    for p in plans:
        assert p.width == max(lengths[r] for r in p.rows)
        assert held + GRADIENT + probe.cost(len(p.rows), p.width, p.mode) <= target


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
    assert probe.calls == [(1, 64, Mode(), 64), (1, 64, Mode(), 1), (1, 256, Mode(), 256)]
    memory.plan(np.array([1900, 700]), probe, held=0)
    assert probe.calls[3:] == [(1, 1024, Mode(), 1024)]
    memory.plan(np.array([3000, 40]), probe, held=0)  # covered: no probe
    assert len(probe.calls) == 4
    memory.plan(np.array([5000]), probe, held=0)  # the longest probe is 4096 tokens
    assert probe.calls[4:] == [(1, 4096, Mode(), 4096)]
    cost = memory.costs[Mode()]
    for width in (64, 777, 2100, 8000):  # exact for a cost of this form, up to the fit's rounding
        assert cost(3, width, 3 * width) == pytest.approx(probe.cost(3, width, False), rel=1e-6)


def test_no_target_means_token_budget_only_and_no_probes():
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


def test_without_a_target_checkpointing_follows_the_length_threshold():
    memory = planner(None, activation_checkpointing="auto", checkpoint_min_length=512, token_budget=1200)
    plans = memory.plan(np.array([600, 520, 100, 90]), FakeProbe(), held=0)
    assert [(p.width, p.checkpoint, p.keep_logits) for p in plans] == [(600, True, False), (100, False, False)]
    always = planner(None, activation_checkpointing="always").plan(np.array([10]), FakeProbe(), held=0)
    assert always[0].checkpoint


def test_with_a_target_the_target_alone_decides_and_spends_memory_on_speed():
    # rows far beyond checkpoint_min_length, all fitting plain: one plain micro-batch up to token_budget, and the
    # checkpointed path never even measured
    probe = FakeProbe()
    memory = planner(8.0, activation_checkpointing="auto", checkpoint_min_length=256, token_budget=2000)
    plans = memory.plan(np.array([2000, 300, 200]), probe, held=0)
    assert [(p.width, len(p.rows), p.checkpoint) for p in plans] == [(2000, 1, False), (300, 2, False)]
    assert [w for _, w, m, _ in probe.calls] == [64, 64, 256, 1024]  # 64: all and one position scored
    assert not any(m.checkpoint for _, _, m, _ in probe.calls)
    lengths = np.array([500] * 16)
    assert [len(p.rows) for p in planner(64.0).plan(lengths, FakeProbe(), held=0)] == [16]  # 8000 <= token_budget


def test_a_tight_target_makes_more_plain_micro_batches_before_it_checkpoints():
    probe, lengths = FakeProbe(), np.array([500] * 16)
    one_row = probe.cost(1, 500, False) - GRADIENT  # 20 MiB
    target = (2 * GRADIENT + MARGIN * 3.5 * one_row) / 2**30  # room for 3 plain rows, not 4
    memory = planner(target)
    plans = memory.plan(lengths, probe, held=0)
    check_plans(plans, lengths, probe, target=memory.target, held=0)
    assert [len(p.rows) for p in plans] == [3, 3, 3, 3, 3, 1] and not any(p.checkpoint for p in plans)
    assert not any(m.checkpoint for _, _, m, _ in probe.calls)  # no row needed it: not measured


def test_the_head_keeps_its_logits_while_the_target_allows_then_recomputes_then_checkpoints():
    # k: the kept logits' bytes per scored position (SmolLM2: 49k x 4 B = 0.19 MiB)
    probe, lengths = FakeProbe(a=2_000.0, q=0.0, k=200_000.0), np.array([500, 500])
    roomy = planner(64.0, keep_logits=True)
    plans = roomy.plan(lengths, probe, held=0)
    assert [(p.keep_logits, p.checkpoint, len(p.rows)) for p in plans] == [(True, False, 2)]

    def cost(mode: Mode) -> float:
        return MARGIN * (FakeProbe.cost(probe, 1, 500, mode) - GRADIENT) + 2 * GRADIENT

    # one row fits with its logits recomputed, not kept: plain passes, logits recomputed
    target = (cost(Mode(False, False)) + cost(Mode(False, True))) / 2 / 2**30
    probe.calls.clear()
    plans = planner(target, keep_logits=True).plan(lengths, probe, held=0)
    assert {p.mode for p in plans} == {Mode(False, False)} and sum(len(p.rows) for p in plans) == 2
    assert {m for _, _, m, _ in probe.calls} == {Mode(False, True), Mode(False, False)}  # checkpointing not needed
    # one row fits only checkpointed (blocks cut by 4): then checkpointed, logits recomputed
    probe = FakeProbe(a=200_000.0, q=0.0, k=200_000.0)
    target = (2 * GRADIENT + MARGIN * (probe.cost(1, 500, Mode(True, False)) - GRADIENT) * 1.05) / 2**30
    plans = planner(target, keep_logits=True).plan(lengths, probe, held=0)
    assert {p.mode for p in plans} == {Mode(True, False)}


def test_rows_that_score_few_positions_pack_more_per_micro_batch():
    # RL rows: a long prompt and a short completion; only the completion goes through the LM head
    probe, lengths = FakeProbe(a=2_000.0, q=0.0, h=60_000.0), np.array([500] * 16)
    memory = planner(0.1, activation_checkpointing="never")
    whole = memory.plan(lengths, probe, held=0)
    few = memory.plan(lengths, probe, scored=np.full(16, 20), held=0)
    assert len(few) < len(whole)
    assert memory.costs[Mode(False)].per_scored == pytest.approx(60_000.0, rel=1e-6)  # separated by the probes
    for p in few:  # still within the target at their true cost
        assert 2 * GRADIENT + probe.cost(len(p.rows), 500, False, 20) <= memory.target
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


def test_memory_target_settings():
    assert memory_target(RLTrainingConfig(max_memory_gb=3.5)) == int(3.5 * 2**30)
    assert memory_target(RLTrainingConfig(max_memory_gb=2.0, max_memory_fraction=0.1)) == 2 * 2**30
    assert memory_target(RLTrainingConfig(max_memory_fraction=0.5)) == int(0.5 * machine_memory())
    assert memory_target(RLTrainingConfig(max_memory_fraction=None)) is None
    assert machine_memory() > 2**30


def test_a_fraction_of_the_machine_never_exceeds_what_the_system_has_free(monkeypatch):
    monkeypatch.setattr(memory_module, "system_available", lambda: 100 * MiB)
    fraction = planner(None, max_memory_fraction=0.8)
    fraction.plan(np.array([10]), FakeProbe(), held=50 * MiB)
    assert fraction.target == 150 * MiB  # held + free, below 0.8 of the machine
    explicit = planner(4.0)  # max_memory_gb is the user's word: kept as set
    explicit.plan(np.array([10]), FakeProbe(), held=50 * MiB)
    assert explicit.target == 4 * 2**30


def test_activation_memory_ratio_is_deprecated_and_ignored(caplog):
    with caplog.at_level(logging.WARNING, logger="paraloop"):
        config = RLTrainingConfig(activation_memory_ratio=0.1)
    assert "activation_memory_ratio" not in config.model_dump()
    assert "no longer used" in caplog.text and "max_memory_gb" in caplog.text


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


def test_trainer_splits_by_memory_reports_its_peak_and_matches_one_micro_batch(base, caplog):
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
    with caplog.at_level(logging.INFO, logger="paraloop.learn"):
        result = small.step(batch)
    assert result.metrics["micro_batches"] > 1
    assert 0 < result.metrics["peak_memory_gb"] <= result.metrics["memory_target_gb"]
    split = f"learner step in {result.metrics['micro_batches']:.0f} micro-batch(es)"
    assert split in caplog.text and f"MLX peak {result.metrics['peak_memory_gb']:.2f} GiB" in caplog.text


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
    plain, ckpt = (trainer._probe(4, 256, Mode(checkpoint), 256) for checkpoint in (False, True))
    assert ckpt < 0.75 * plain
    result = make_trainer(base, activation_checkpointing="always").step(long_batch(2, 64))
    assert result.metrics["checkpointed_micro_batches"] == 1


def test_a_probe_ignores_what_something_else_allocated_during_one_of_its_passes(base):
    trainer = make_trainer(base)
    quiet = trainer._probe_once(2, 64, Mode(), 64)
    gradient_pass, other = trainer._value_and_grad, []

    def disturbed(mb):  # an engine thread allocating 64 MiB during the first pass (and keeping it)
        out = gradient_pass(mb)
        if not other:
            other.append(mx.ones((16 * MiB,)))
            mx.eval(other[0])
        return out

    trainer._value_and_grad = disturbed
    assert trainer._probe(2, 64, Mode(), 64) < quiet + 8 * MiB
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
    assert 0 < result.metrics["memory_target_gb"] <= memory_target(make_config()) / 2**30
    assert result.metrics["micro_batches"] == 1 and result.metrics["peak_memory_gb"] > 0
    assert result.metrics["checkpointed_micro_batches"] == 0 and result.metrics["kept_logits_micro_batches"] == 1
    phases = [k for k in result.metrics if k.startswith("time_")]
    assert sum(result.metrics[k] for k in phases) == pytest.approx(result.metrics["step_time_s"], rel=1e-6)
    assert collate(random_batch(0)).rows == 8


def test_full_training_that_cannot_take_an_optimizer_step_is_a_clear_error():
    config = RLTrainingConfig(max_memory_gb=1.0, train_mode="full", kl_beta=0.0)
    memory = MemoryPlanner(config, gradient_bytes=200 * MiB, checkpointing_available=True)
    with pytest.raises(MemoryTargetError, match=r"optimizer step needs about 1\.3.*train_mode = 'lora'"):
        memory.plan(np.array([10]), FakeProbe(), held=0, optimizer_ready=False)  # 7 x 200 MiB
    assert memory.plan(np.array([10]), FakeProbe(), held=0, optimizer_ready=True)  # 5 x 200 MiB fits
