"""The synchronous GRPO learner: one RolloutBatch in, one optimizer step (x update_epochs) out.

In: the learner's model twin (LoRA attached, or attached here from adapter_config), rl_training settings and
RolloutBatches. Out: StepResult metrics, the evaluated adapter arrays (`adapter()`), the reference adapter, and a
resumable `state()`. Used from ONE thread (the learner actor's MLX thread); nothing here is async or does I/O.

Per step: collate + validate -> advantages (with the teacher term of on-policy distillation for rows a teacher
scored, learn/distill.py) -> micro-batch plan (memory target and token_budget, learn/memory.py)
-> old-policy and reference log-probs, no grad and without dropout (the reference is the SAME model with the
reference adapter arrays swapped in, never a second copy) -> for each epoch: accumulate gradients over micro-batches
in train mode (LoRA dropout on), clip, AdamW -> reference EMA. A non-finite loss or gradient restores the adapter
and optimizer state and counts a skipped step.

Micro-batches are as large as the memory target and token_budget allow (learn/memory.py); log-probs go through the
LM head in chunks (learn/logprobs.py), whose logits are kept for the backward while the target allows, and blocks
are checkpointed (learn/checkpointing.py) only for rows that would not fit it otherwise. Each step's metrics say how
the batch was split and where its time went (time_*_s, learn/timing.py).
"""

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from paraloop.config import DistillConfig, RLTrainingConfig
from paraloop.distributed import Single
from paraloop.learn.advantages import token_advantages
from paraloop.learn.algorithms import get_algorithm
from paraloop.learn.batch import TokenBatch, collate
from paraloop.learn.checkpointing import BlockCheckpointing
from paraloop.learn.distill import distill_advantages
from paraloop.learn.logprobs import forward_logprobs
from paraloop.learn.loss import (
    LossSettings,
    aggregation_weights,
    importance_stats,
    importance_weights,
    policy_loss,
    rejected_tokens,
    rollout_mismatch,
)
from paraloop.learn.memory import GiB, MemoryPlanner, Mode, PeakMeter, Plan, return_freed_memory
from paraloop.learn.mismatch import (
    combine,
    importance_metrics,
    mismatch_metrics,
    row_versions,
    staleness_metrics,
)
from paraloop.learn.optim import (
    add_trees,
    clip_by_norm,
    global_norm,
    learning_rate_at,
    make_optimizer,
    select_trainable,
)
from paraloop.learn.shaping import shape_rows
from paraloop.learn.timing import Phases
from paraloop.logits_head import logits_head
from paraloop.lora import AdapterSlots, adapter_arrays, attach_lora, has_lora
from paraloop.messages import RolloutBatch

logger = logging.getLogger("paraloop.learn")

SUM_STATS = ("pg_loss", "kl", "entropy", "clipped", "ratio_sum", "tokens", "importance_weight_sum")
MISMATCH_STATS = (
    "mismatch_abs_sum",
    "mismatch_abs_max",
    "mismatch_tokens",
    "rollout_ratio_sum",
    "rollout_ratio_min",
    "rollout_ratio_max",
    "rollout_ratio_outside",
    "rollout_tokens",
)


@dataclass(frozen=True)
class StepResult:
    metrics: dict[str, float]
    skipped: bool
    step: int  # learner steps done, this one included
    version: int  # adapter version after the step (unchanged when skipped)


@dataclass
class MicroBatch:
    """One micro-batch's inputs as mx arrays of shape (b, w), w = its longest row."""

    input_ids: mx.array
    targets: mx.array
    temperature: mx.array
    mask: mx.array
    weights: mx.array
    advantages: mx.array
    old_logp: mx.array | None = None  # None: on-policy, the current log-probs detached
    current_rows: mx.array | None = None  # (b, 1): rows whose old policy is the current one, among old_logp's
    ref_logp: mx.array | None = None
    importance_weight: mx.array | None = None
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    mismatch: dict[str, float] | None = None  # rollout_mismatch statistics, once measured
    importance: dict[str, float] | None = None  # raw importance-ratio statistics (rollout correction)
    positions: np.ndarray | None = None  # flat (row * w + t) indices of trained positions, the only ones scored
    checkpoint: bool = False  # run the trained blocks under activation checkpointing
    keep_logits: bool = False  # the LM head's backward reads the forward's logits (memory for speed)
    plan: Plan | None = None


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The mx.random seed of a learner step: a function of (seed, step) only, so a resumed run draws the same
    dropout masks (and of the rank, so ranks draw different masks for their rows). mx.random state is
    thread-local, so this never disturbs the engine's sampling."""
    entropy = [seed, step] if rank == 0 else [seed, step, rank]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def norm_length(config: RLTrainingConfig) -> tuple[int, str]:
    """Dr. GRPO's constant (seq-mean-token-sum-norm) and where it came from: loss_norm_length, else the real
    generation cap where paraloop knows it (the mock environment's), else max_tokens."""
    if config.loss_norm_length is not None:
        return config.loss_norm_length, "rl_training.loss_norm_length"
    if config.rollout_source == "mock":
        key = "rl_training.mock.max_tokens" if config.mock.max_tokens else "rl_training.max_tokens"
        return config.mock.max_tokens or config.max_tokens, f"{key}, the mock environment's generation cap"
    return config.max_tokens, (
        "rl_training.max_tokens; the Atropos environment's or agent's own cap is unknown to paraloop: set "
        "rl_training.loss_norm_length to it"
    )


def has_dropout(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Dropout) and m._p_1 < 1 for _, m in model.named_modules())


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        *,
        config: RLTrainingConfig,
        adapter_config: dict | None,
        version: int = 0,
        distill: DistillConfig | None = None,
    ) -> None:
        self.model, self.config, self.adapter_config = model, config, adapter_config
        self.distill = distill or DistillConfig()  # applies to rows that carry teacher log-probs
        self.algorithm = get_algorithm(config.algorithm)
        self.settings = LossSettings(
            clip_ratio=config.clip_ratio,
            clip_ratio_high=config.clip_ratio_high,
            kl_beta=config.kl_beta,
            kl_estimator=config.kl_estimator,
            entropy_weight=config.entropy_weight,
            cispo_clip_max=config.cispo_clip_max,
        )
        lora = config.train_mode == "lora"
        if lora and not has_lora(model):
            if adapter_config is None:
                raise ValueError("train_mode = 'lora': the model has no LoRA layers and no adapter_config was given")
            attach_lora(model, adapter_config, seed=config.seed)
        if not lora and config.kl_beta > 0:
            raise ValueError(
                "kl_beta > 0 needs a reference adapter, and train_mode = 'full' has none (paraloop never keeps a "
                "second copy of the model): set rl_training.kl_beta = 0"
            )
        select_trainable(model, config.train_mode)
        model.eval()
        self._slots = AdapterSlots(model) if lora else None
        self._reference = dict(adapter_arrays(model)) if lora and config.kl_beta > 0 else None
        # stale_policy = "cap" keeps stale async rollouts with capped weights: 2.0 unless importance_cap says otherwise
        self.importance_cap = config.importance_cap or (2.0 if config.staleness.caps else None)
        self.importance_correction = self.importance_cap is not None or config.importance_min is not None
        self.norm_length, source = norm_length(config)
        if config.loss_aggregation == "seq-mean-token-sum-norm":
            logger.info(
                "loss aggregation seq-mean-token-sum-norm (Dr. GRPO): each sequence's token sum is divided by %d (%s)",
                self.norm_length,
                source,
            )
        if config.algorithm == "gspo" and config.loss_aggregation != "seq-mean-token-mean":
            logger.warning(
                "algorithm = 'gspo' with loss_aggregation = %r: each sequence's GSPO term is weighted by its "
                "length (TRL's/verl's sequence-level form), not the GSPO paper's seq-mean-token-mean",
                config.loss_aggregation,
            )
        # With LoRA dropout the gradient forward is not the policy's own log-probs: measure the mismatch on an
        # eval-mode forward instead (without dropout the first epoch's forward is exactly that, for free).
        self._dropout = has_dropout(model)
        self.optimizer = make_optimizer(config)
        self._value_and_grad = nn.value_and_grad(model, self._loss)
        self.head = logits_head(model) if config.logits_chunk_tokens != 0 else None  # None: full logits
        self.blocks = BlockCheckpointing(model)
        self.memory = MemoryPlanner(
            config,
            gradient_bytes=sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters())),
            checkpointing_available=self.blocks.available,
            keep_logits_available=self.head is not None,
        )
        self.peak = PeakMeter()
        self.phases = Phases()
        self._split: tuple[int, ...] | None = None  # the last step's split (micro-batches, ...), for the log
        target = self.memory.target
        logger.info(
            "learner memory: target %s (micro-batches as large as it and token_budget %d allow), LM head %s, "
            "activation checkpointing %s",
            "none" if target is None else f"{target / GiB:.1f} GiB",
            config.token_budget,
            "in chunks" if self.head is not None else "full logits",
            config.activation_checkpointing if self.blocks.available else "unavailable",
        )
        self.step_count, self.version, self.skipped_steps = 0, version, 0
        # Data parallelism (distributed.Ranks): every rank prepares the whole batch (advantages, weights), trains
        # its share of the rows and has gradients and statistics summed, so every rank makes the same update.
        self.reducer: Any = Single()

    # --- public API ------------------------------------------------------------------------------------------------

    def adapter(self) -> dict[str, mx.array]:
        """The trained arrays by name (LoRA arrays, or every weight in full mode): evaluated, never mutated later."""
        if self._slots is not None:
            return adapter_arrays(self.model)
        return dict(tree_flatten(self.model.trainable_parameters()))

    def reference(self) -> dict[str, mx.array] | None:
        return None if self._reference is None else dict(self._reference)

    def state(self) -> dict[str, Any]:
        """Everything besides the adapter/reference arrays needed to continue exactly: {"optimizer": flat name ->
        mx.array (safetensors-ready), "trainer": JSON-able counters and settings}."""
        return {
            "optimizer": dict(tree_flatten(self.optimizer.state)),
            "trainer": {
                "step_count": self.step_count,
                "version": self.version,
                "skipped_steps": self.skipped_steps,
                "seed": self.config.seed,  # dropout masks are drawn from step_seed(seed, step_count)
                "algorithm": self.config.algorithm,
                "train_mode": self.config.train_mode,
                "next_learning_rate": learning_rate_at(self.step_count, self.config),
            },
        }

    def load_state(self, state: dict[str, Any], adapter: dict[str, mx.array], reference: dict | None) -> None:
        """Restore what `state()`, `adapter()` and `reference()` returned (e.g. read back from a checkpoint)."""
        trainer = state["trainer"]
        if trainer.get("train_mode", self.config.train_mode) != self.config.train_mode:
            raise ValueError(
                f"state was saved with train_mode = {trainer['train_mode']!r}, not {self.config.train_mode!r}"
            )
        if self._slots is not None:
            arrays = {k: mx.array(v) for k, v in adapter.items()}
            self._slots.check(arrays)
            self._slots.swap(arrays)
        else:
            self.model.update(tree_unflatten([(k, mx.array(v)) for k, v in adapter.items()]))
        if self._reference is not None:
            if reference is None:
                logger.warning("resumed without a reference adapter: using the initial adapter as reference")
            else:
                self._slots.check(reference)
                self._reference = {k: mx.array(v) for k, v in reference.items()}
        self.optimizer.state = tree_unflatten([(k, mx.array(v)) for k, v in state["optimizer"].items()])
        self.step_count = int(trainer["step_count"])
        self.version = int(trainer["version"])
        self.skipped_steps = int(trainer["skipped_steps"])
        mx.eval(self.model.parameters(), self.optimizer.state, self._reference)

    def step(self, batch: RolloutBatch) -> StepResult:
        """One learner step: every epoch over every micro-batch, everything evaluated on return."""
        start = time.perf_counter()
        self.phases.start()
        with self.phases("trim"):
            return_freed_memory()  # what generation freed, before the step's activations are allocated ...
        try:
            result = self._step(batch)
        finally:
            with self.phases("trim"):
                return_freed_memory()  # ... and what they freed, before the engine generates again
        self._finish(result.metrics, start)
        self._log_split(result.metrics)
        return result

    def _step(self, batch: RolloutBatch) -> StepResult:
        self.peak.start()
        cfg = self.config
        lr = learning_rate_at(self.step_count, cfg)
        micros, base = self._prepare(batch)
        base["lr"] = lr
        if not base["trained_tokens"]:  # of the whole batch: a rank's share may be empty while others train
            return self._skip(base, "the batch has no trained tokens")

        params_before = self.model.trainable_parameters()
        optimizer_before = tree_map(lambda x: x, self.optimizer.state)
        epochs = []
        for _ in range(cfg.update_epochs):
            with self.phases("gradient"):
                loss, stats, grads = self._accumulate(micros)
            with self.phases("optimizer"):
                norm = global_norm(grads)
                mx.eval(norm)
            epochs.append({"loss": loss.item(), "grad_norm": norm.item(), **stats})
            if not (np.isfinite(epochs[-1]["loss"]) and np.isfinite(epochs[-1]["grad_norm"])):
                self.model.update(params_before)
                self.optimizer.state = optimizer_before
                bad = "loss" if not np.isfinite(epochs[-1]["loss"]) else "gradient"
                metrics = {**base, **self._epoch_metrics(epochs), **self._rollout_metrics(micros)}
                return self._skip(metrics, f"non-finite {bad}")
            with self.phases("optimizer"):
                self.optimizer.learning_rate = lr
                self.optimizer.update(self.model, clip_by_norm(grads, norm, cfg.max_grad_norm))
                mx.eval(self.model.trainable_parameters(), self.optimizer.state)
        with self.phases("optimizer"):
            self._update_reference()
        self.step_count += 1
        self.version += 1
        metrics = {**base, **self._epoch_metrics(epochs), **self._rollout_metrics(micros)}
        return StepResult(metrics, False, self.step_count, self.version)

    def check_length(self, length: int) -> None:
        """Raise SequenceTooLong now if a sequence of `length` tokens could not train within the memory target
        (measuring what the memory model needs for it), instead of at the step that brings one."""
        self.memory.plan(np.array([max(1, length - 1)]), self._probe)

    def gradients(self, batch: RolloutBatch) -> tuple[float, dict[str, mx.array]]:
        """(loss, flat gradients) of the first epoch of `step(batch)`, without updating anything (diagnostics)."""
        micros, base = self._prepare(batch)
        if not base["trained_tokens"]:
            raise ValueError("the batch has no trained tokens")
        loss, _, grads = self._accumulate(micros)
        return loss.item(), dict(tree_flatten(grads))

    # --- internals -------------------------------------------------------------------------------------------------

    def _loss(self, mb: MicroBatch) -> tuple[mx.array, dict[str, mx.array]]:
        logp, entropy = self._logprobs(mb, entropy_grad=self.config.entropy_weight != 0, keep_logits=mb.keep_logits)
        loss, stats = policy_loss(
            logp,
            entropy,
            mask=mb.mask,
            weights=mb.weights,
            advantages=mb.advantages,
            old_logp=self._old_logp(logp, mb),
            ref_logp=mb.ref_logp,
            importance_weight=mb.importance_weight,
            token_loss=self.algorithm.token_loss,
            settings=self.settings,
        )
        return loss, {**stats, **self._mismatch_in_loss(logp, mb)}

    @staticmethod
    def _old_logp(logp: mx.array, mb: MicroBatch) -> mx.array:
        """The old policy's log-probs: given (the engine's, or an old-policy forward's), or - for rows sampled by
        the current adapter, on the one epoch of a step without dropout - the gradient forward's own, detached:
        the same model on the same tokens, so the same values a separate forward would compute."""
        current = mx.stop_gradient(logp)
        if mb.old_logp is None:
            return current
        return mb.old_logp if mb.current_rows is None else mx.where(mb.current_rows, current, mb.old_logp)

    def _prepare(self, batch: RolloutBatch) -> tuple[list[MicroBatch], dict[str, float]]:
        """Collate, advantages, micro-batches with their old-policy and reference log-probs; seeds dropout."""
        cfg = self.config
        tb = collate(batch)
        raw_scores = tb.scores
        tb, shaping = self._shape(batch, tb)
        seq_adv = self.algorithm.advantages(tb.scores, tb.group, scale=cfg.scale_rewards, eps=cfg.advantage_eps)
        adv = token_advantages(tb, seq_adv)
        distilled: dict[str, float] = {}
        if tb.has_teacher is not None:  # on-policy distillation: the teacher term joins the advantage
            adv, distilled = distill_advantages(
                tb, adv, weight=self.distill.weight, reward_weight=self.distill.reward_weight
            )
        weights = aggregation_weights(tb.mask, cfg.loss_aggregation, norm_length=self.norm_length)
        moments = len(tree_flatten(self.optimizer.state)) > 2  # more than step and learning_rate: AdamW has run
        trained = np.where(tb.mask.any(axis=1), tb.lengths, 0)
        mine = self.reducer.share(trained)  # every row on one process; this rank's by tokens on several
        with self.phases("plan"):  # the memory probes included, when a new length regime calls for them
            plans = self.memory.plan(
                np.where(mine, trained, 0), self._probe, scored=tb.mask.sum(axis=1), optimizer_ready=moments
            )
        mx.random.seed(step_seed(cfg.seed, self.step_count, self.reducer.rank))
        micros = [self._micro_batch(tb, plan, adv, weights) for plan in plans]
        versions = self._mark_fresh(batch, tb, [plan.rows for plan in plans], micros)
        with self.phases("old_policy"):
            self._old_and_reference(tb, micros)
        if self.importance_correction and cfg.importance_mode == "mask":
            self._drop_rejected(tb, [plan.rows for plan in plans], micros)
        metrics = self._batch_metrics(replace(tb, scores=raw_scores), adv)
        metrics["micro_batches"] = float(len(micros))
        metrics["checkpointed_micro_batches"] = float(sum(mb.checkpoint for mb in micros))
        metrics["kept_logits_micro_batches"] = float(sum(mb.keep_logits for mb in micros))
        return micros, {**metrics, **shaping, **distilled, **staleness_metrics(versions, self.version)}

    def _log_split(self, metrics: dict[str, float]) -> None:
        """Say when the memory target changes how a step is split (the speed a tight target costs), with the
        step's peak, once per change of the split."""
        split = tuple(
            int(metrics.get(k, 0)) for k in ("micro_batches", "checkpointed_micro_batches", "kept_logits_micro_batches")
        )
        if split != self._split and split[0] and (split[0] > 1 or split[1] or split[2] < split[0]):
            logger.info(
                "learner step in %d micro-batch(es), %d checkpointed, %d with kept logits: MLX peak %.2f GiB "
                "(memory target %s, token_budget %d)",
                *split,
                metrics.get("peak_memory_gb", 0.0),
                "none" if self.memory.target is None else f"{self.memory.target / GiB:.2f} GiB",
                self.config.token_budget,
            )
        self._split = split

    def _accumulate(self, micros: list[MicroBatch]) -> tuple[mx.array, dict[str, float], dict]:
        """Sum losses and gradients over micro-batches (the weights make the sum the full-batch value), and over
        ranks through the reducer (a rank without rows adds zeros)."""
        grads, loss = None, mx.array(0.0)
        sums = dict.fromkeys(SUM_STATS, 0.0)
        lo, hi = np.inf, -np.inf
        self.model.train()  # LoRA dropout on for the gradient forward only
        try:
            for mb in micros:
                with self.peak.measure() as used:
                    with self.blocks.enabled(mb.checkpoint):
                        (mb_loss, stats), mb_grads = self._value_and_grad(mb)
                    grads, loss = add_trees(grads, mb_grads), loss + mb_loss
                    mx.eval(grads, loss, stats)
                if mb.plan is not None:
                    self.memory.observe(mb.plan, used())
                for k in SUM_STATS:
                    sums[k] += stats[k].item()
                lo, hi = min(lo, stats["ratio_min"].item()), max(hi, stats["ratio_max"].item())
                if "mismatch_tokens" in stats:  # measured on this (first) epoch's forward: keep it
                    mb.mismatch = {k: stats[k].item() for k in MISMATCH_STATS}
        finally:
            self.model.eval()
        if grads is None:
            grads = tree_map(mx.zeros_like, self.model.trainable_parameters())
        grads, sums, mins, maxs = self.reducer.reduce(
            grads, {"loss": loss.item(), **sums}, {"ratio_min": lo}, {"ratio_max": hi}
        )
        return mx.array(sums.pop("loss")), {**sums, **mins, **maxs}, grads

    def _micro_batch(self, tb: TokenBatch, plan: Plan, adv: np.ndarray, weights: np.ndarray) -> MicroBatch:
        rows = plan.rows
        w = int(tb.lengths[rows].max())
        return MicroBatch(
            input_ids=mx.array(tb.input_ids[rows, :w]),
            targets=mx.array(tb.targets[rows, :w]),
            temperature=mx.array(tb.temperature[rows]),
            mask=mx.array(tb.mask[rows, :w]),
            weights=mx.array(weights[rows, :w]),
            advantages=mx.array(adv[rows, :w]),
            extras={
                "inference": tb.inference_logprobs[rows, :w],
                "has_inference": tb.has_inference[rows],
                "ref": tb.ref_logprobs[rows, :w],
                "has_ref": tb.has_ref[rows],
                **({"kept": tb.kept[rows, :w]} if tb.kept is not None and tb.kept[rows].any() else {}),
            },
            positions=np.flatnonzero(tb.mask[rows, :w]),
            checkpoint=plan.checkpoint,
            keep_logits=plan.keep_logits,
            plan=plan,
        )

    def _logprobs(
        self, mb: MicroBatch, *, with_entropy: bool = True, entropy_grad: bool = True, keep_logits: bool = False
    ):
        """The micro-batch's log-probs (and entropies); over each token's kept set where the engine recorded one
        (sampling-mask replay, learn/logprobs.py), for the policy, old-policy and reference forwards alike."""
        kept = mb.extras.get("kept")
        return forward_logprobs(
            self.model,
            mb.input_ids,
            mb.targets,
            mb.temperature,
            with_entropy=with_entropy,
            head=self.head,
            chunk_tokens=self.config.logits_chunk_tokens,
            positions=mb.positions,
            entropy_grad=entropy_grad,
            keep_logits=keep_logits,
            kept=None if kept is None else mx.array(kept),
        )

    def _probe(self, rows: int, width: int, mode: Mode, scored: int) -> int:
        """Bytes one gradient pass over (rows, width) synthetic tokens, the last `scored` of each row trained, adds
        at its peak (the memory planner's calibration): the smaller of two passes, since MLX's peak is process-wide
        and an engine generating in the same process (async mode) may allocate during one of them. Train mode like
        the real pass; the step's dropout seed is drawn after planning."""
        return min(self._probe_once(rows, width, mode, scored) for _ in range(2))

    def _probe_once(self, rows: int, width: int, mode: Mode, scored: int) -> int:
        shape = (rows, width)
        mask = np.zeros(shape, bool)
        mask[:, width - scored :] = True
        mb = MicroBatch(
            input_ids=mx.zeros(shape, mx.int32),
            targets=mx.zeros(shape, mx.int32),
            temperature=mx.ones((rows,)),
            mask=mx.array(mask),
            weights=mx.array(mask / mask.sum(), mx.float32),
            advantages=mx.ones(shape),
            ref_logp=mx.zeros(shape) if self.config.kl_beta > 0 else None,
            positions=np.flatnonzero(mask),
            checkpoint=mode.checkpoint,
            keep_logits=mode.keep_logits,
        )
        mx.eval(mb.input_ids, mb.targets, mb.temperature, mb.mask, mb.weights, mb.advantages, mb.ref_logp)
        self.model.train()
        try:
            with self.peak.measure() as used:
                with self.blocks.enabled(mode.checkpoint):
                    out = self._value_and_grad(mb)
                mx.eval(out)
                del out
        finally:
            self.model.eval()
        return used()

    def _old_and_reference(self, tb: TokenBatch, micros: list[MicroBatch]) -> None:
        """Old-policy and reference log-probs, once per batch, no grad, eval mode (no dropout).

        Old policy: the inference log-probs when given; else the current adapter's. That needs a forward of its own
        only when the gradient forward's log-probs are not them: with LoRA dropout, or over several update_epochs
        (the second epoch's model has moved); on one epoch without dropout the loss reads its own forward, detached
        (`_old_logp`). With rollout correction (importance_cap / importance_min), the forward is the old policy and
        the inference log-probs are the behaviour policy: weights from loss.importance_weights. The same forward,
        when it runs, measures the train/inference mismatch. Reference: given ref_logprobs win; else the reference
        adapter.
        """
        cfg = self.config
        correct = self.importance_correction
        any_inf, all_inf = bool(tb.has_inference.any()), bool(tb.has_inference.all())
        own_forward = cfg.update_epochs == 1 and not self._dropout  # the gradient forward is the old policy's
        need_old = (
            (not all_inf and self.algorithm.uses_old_policy and not own_forward)
            or (correct and any_inf)
            or (self._dropout and any_inf)  # the mismatch check needs the eval-mode log-probs
        )
        need_ref = cfg.kl_beta > 0 and not bool(tb.has_ref.all())
        self.model.eval()
        for mb in micros:
            has_inf = mx.array(mb.extras["has_inference"])[:, None]
            inference = mx.array(mb.extras["inference"])
            if need_old:
                old, _ = self._logprobs(mb, with_entropy=False)
                if any_inf:
                    mb.mismatch = self._mismatch(old, mb)
                if not correct:
                    mb.old_logp = mx.where(has_inf, inference, old)
                else:
                    mb.old_logp = old
                    self._correct(mb, old, inference, has_inf & mb.mask)
            elif any_inf:
                mb.old_logp = inference
                if not all_inf:  # the other rows' old policy is the current one (own_forward)
                    mb.current_rows = ~has_inf
            if cfg.kl_beta > 0:
                mb.ref_logp = mx.array(mb.extras["ref"])
            mx.eval(mb.old_logp, mb.importance_weight, mb.ref_logp)
        if need_ref:
            policy = adapter_arrays(self.model)
            self._slots.swap(self._reference)
            try:
                for mb in micros:
                    ref, _ = self._logprobs(mb, with_entropy=False)
                    mb.ref_logp = mx.where(mx.array(mb.extras["has_ref"])[:, None], mb.ref_logp, ref)
                    mx.eval(mb.ref_logp)
            finally:
                self._slots.swap(policy)

    # --- shaping, rollout correction and the mismatch check ------------------------------------------------------

    def _shape(self, batch: RolloutBatch, tb: TokenBatch) -> tuple[TokenBatch, dict[str, float]]:
        """Overlong penalty on the scores and truncated rows out of the mask (each only when configured)."""
        cfg = self.config
        scores, mask, metrics = shape_rows(
            batch,
            tb,
            default_max_tokens=cfg.max_tokens,
            buffer=cfg.overlong_buffer,
            factor=cfg.overlong_penalty,
            mask_truncated=cfg.mask_truncated,
        )
        return replace(tb, scores=scores, mask=mask), metrics

    def _mark_fresh(
        self, batch: RolloutBatch, tb: TokenBatch, plan: list[np.ndarray], micros: list[MicroBatch]
    ) -> np.ndarray:
        """Each micro-batch learns which of its rows the current adapter version sampled; returns row versions."""
        versions = row_versions(batch)
        fresh = tb.has_inference & (versions == self.version)
        for rows, mb in zip(plan, micros, strict=True):
            mb.extras["fresh"] = fresh[rows]
        return versions

    @staticmethod
    def _rollout_mismatch(learner_logp: mx.array, mb: MicroBatch) -> dict[str, mx.array]:
        """loss.rollout_mismatch on the micro-batch's trained tokens: of rows with engine log-probs, and of those
        the current adapter version sampled."""
        trained = mb.mask.astype(mx.bool_)
        return rollout_mismatch(
            learner_logp,
            mx.array(mb.extras["inference"]),
            rollout_mask=trained & mx.array(mb.extras["has_inference"])[:, None],
            fresh_mask=trained & mx.array(mb.extras["fresh"])[:, None],
        )

    def _mismatch(self, learner_logp: mx.array, mb: MicroBatch) -> dict[str, float]:
        stats = self._rollout_mismatch(learner_logp, mb)
        mx.eval(stats)
        return {k: v.item() for k, v in stats.items()}

    def _mismatch_in_loss(self, logp: mx.array, mb: MicroBatch) -> dict[str, mx.array]:
        """Without dropout the gradient forward IS the eval-mode forward: measure the mismatch on its first epoch."""
        has_inference = mb.extras.get("has_inference")  # a memory probe's micro-batch has none
        if mb.mismatch is not None or self._dropout or has_inference is None or not has_inference.any():
            return {}
        return self._rollout_mismatch(logp, mb)

    def _correct(self, mb: MicroBatch, old: mx.array, inference: mx.array, rollout_mask: mx.array) -> None:
        """Rollout correction: importance weights pi_old / pi_rollout, with the raw ratios' statistics."""
        cfg = self.config
        weight, ratio = importance_weights(
            old,
            inference,
            rollout_mask,
            level=cfg.importance_level,
            mode=cfg.importance_mode,
            low=cfg.importance_min,
            high=self.importance_cap,
        )
        stats = importance_stats(weight, ratio, rollout_mask)
        mx.eval(weight, stats)
        mb.importance_weight = weight
        mb.importance = {k: v.item() for k, v in stats.items()}

    def _drop_rejected(self, tb: TokenBatch, plan: list[np.ndarray], micros: list[MicroBatch]) -> None:
        """Mask-mode rollout correction removes rejected tokens from the response mask, as verl's rollout_rs does:
        aggregation weights are recomputed over the kept tokens (every denominator, whole batch, every rank's
        rejections counted), so rejected tokens carry no policy-gradient, KL or entropy term."""
        kept = tb.mask.copy()
        rejected = np.zeros(tb.rows, np.int64)
        for rows, mb in zip(plan, micros, strict=True):
            if mb.importance_weight is None:
                continue
            out = np.array(rejected_tokens(mb.importance_weight, mb.mask))
            kept[rows, : out.shape[1]] &= ~out
            rejected[rows] += out.sum(axis=1)
        rejected = self.reducer.table(rejected, "rejected").sum(axis=0)  # rows are on one rank each
        weights = aggregation_weights(
            kept, self.config.loss_aggregation, norm_length=self.norm_length, row_tokens=tb.mask.sum(1) - rejected
        )
        for rows, mb in zip(plan, micros, strict=True):
            w = int(mb.mask.shape[1])
            mb.mask, mb.weights = mx.array(kept[rows, :w]), mx.array(weights[rows, :w])

    @staticmethod
    def _rollout_metrics(micros: list[MicroBatch]) -> dict[str, float]:
        """The step's mismatch and rollout-correction metrics, from every micro-batch's statistics."""
        return {
            **mismatch_metrics(combine([mb.mismatch for mb in micros if mb.mismatch])),
            **importance_metrics(combine([mb.importance for mb in micros if mb.importance])),
        }

    def _update_reference(self) -> None:
        """ref = ema ref + (1 - ema) policy, factor-wise on LoRA A and B (not the EMA of the delta B A): the
        reference stays a rank-r adapter for the same slots. docs/training.md gives the measured difference."""
        ema = self.config.ref_ema
        if self._reference is None or ema >= 1.0:
            return
        policy = adapter_arrays(self.model)
        self._reference = {k: ema * v + (1.0 - ema) * policy[k] for k, v in self._reference.items()}
        mx.eval(self._reference)

    def _batch_metrics(self, tb: TokenBatch, adv: np.ndarray) -> dict[str, float]:
        trained = adv[tb.mask]
        return {
            "reward_mean": float(tb.scores.mean()),
            "reward_std": float(tb.scores.std()),
            "adv_mean": float(trained.mean()) if trained.size else 0.0,
            "adv_std": float(trained.std()) if trained.size else 0.0,
            "tokens": float(tb.lengths.sum()),
            "trained_tokens": float(tb.trained_tokens),
            "sequences": float(tb.rows),
        }

    @staticmethod
    def _epoch_metrics(epochs: list[dict[str, float]]) -> dict[str, float]:
        def mean(key: str) -> float:
            return float(np.mean([e[key] for e in epochs]))

        tokens = max(1.0, epochs[-1]["tokens"])
        return {
            "loss": mean("loss"),
            "pg_loss": mean("pg_loss"),
            "kl": mean("kl"),
            "entropy": mean("entropy"),
            "grad_norm": mean("grad_norm"),
            "clip_fraction": mean("clipped") / tokens,
            "ratio_mean": mean("ratio_sum") / tokens,
            "ratio_min": min(e["ratio_min"] for e in epochs),
            "ratio_max": max(e["ratio_max"] for e in epochs),
            "importance_weight_mean": mean("importance_weight_sum") / tokens,
            "epochs": float(len(epochs)),
        }

    def _finish(self, metrics: dict[str, float], start: float) -> None:
        elapsed = time.perf_counter() - start
        metrics.update(step_time_s=elapsed, tokens_per_s=metrics["tokens"] / elapsed, skipped_steps=self.skipped_steps)
        metrics.update(self.phases.metrics(elapsed))
        metrics["peak_memory_gb"] = self.peak.read() / GiB  # MLX's peak in the step, everything held included
        if self.memory.target is not None:
            metrics["memory_target_gb"] = self.memory.target / GiB

    def _skip(self, metrics: dict[str, float], why: str) -> StepResult:
        self.skipped_steps += 1
        self.step_count += 1
        logger.warning(
            "learner step %d skipped (%s): adapter and optimizer unchanged, %d step(s) skipped so far",
            self.step_count,
            why,
            self.skipped_steps,
        )
        return StepResult(metrics, True, self.step_count, self.version)
