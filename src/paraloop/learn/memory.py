"""Memory-aware micro-batches: how many rows of which length one gradient pass may take within a memory target.

In: `rl_training` (max_memory_gb or max_memory_fraction of the machine, token_budget, activation_checkpointing,
checkpoint_min_length), the model's gradient bytes, each step's row lengths and trained positions,
and a probe that runs one gradient pass of (rows, width) synthetic tokens and returns the bytes it added at its
peak. Out: micro-batch plans (row indices, and the Mode of that micro-batch: checkpointed blocks, kept logits), or
`SequenceTooLong` - raised before anything big is allocated - when one row cannot fit even alone.

Cost model, per Mode, fitted to measurements: a gradient pass over b rows of w positions, p of them
scored (the trained positions, which alone go through the LM head), adds
    fixed + b * w * (per_token + per_token_position * w) + per_scored * p
bytes at its peak over the memory held before it (per_token: block activations, LoRA and dropout arrays;
per_token_position: attention scores, which grow with the row length; per_scored: the head's logits and their
gradient, ~0.27 MiB a position for SmolLM2's 49k vocabulary, more than its blocks checkpointed). It is measured, not
derived, so it holds for whatever the backend does (CPU, Metal, CUDA; quantized or not): one-row probes at growing
widths (64, 256, 1024, ...; each only when the previous fit predicts it fits; the first also with a single scored
position, which separates per_scored) the first time a length regime is seen, and every real micro-batch's own peak
afterwards, which can only raise the model (a ratchet). Planned peaks carry a 20% margin. RL rows score only their
completion: a batch's plans assume each row scores as many positions as its most-scored row (at most its length).

A plan is feasible when: memory held at the start of the step + one accumulated gradient + margin * cost(b, w, p)
stays within the target. MLX's peak (mx.get_peak_memory, also on the CPU backend) is what is measured and capped;
the process adds its Python runtime (a few hundred MB) outside it.

Speed first: micro-batches take as many rows as the target and token_budget allow, since one pass over many rows
runs the same matmuls with more work each (no per-pass overhead repeated). Each micro-batch runs in the fastest
Mode of a ladder in which one row of its width fits the target: plain blocks with the LM head's logits kept for the
backward; logits recomputed (one head matmul more per trained token); checkpointed blocks (one forward of the
trained blocks more), logits kept, then recomputed. So memory is traded for speed only as far as the target
demands, and a slower mode is probed only when some row needs it. A user who wants a smaller process sets
max_memory_gb; the metrics say what it cost (micro_batches, checkpointed_micro_batches, kept_logits_micro_batches,
peak_memory_gb).
"""

import ctypes
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from paraloop.config import RLTrainingConfig
from paraloop.learn.batch import plan_micro_batches

logger = logging.getLogger("paraloop.learn")

GiB = 2**30
MARGIN = 1.2
FIRST_PROBE = 64  # positions of the first calibration probe
PROBE_GROWTH = 4  # each further probe is this many times longer
EXTRAPOLATE = 4  # rows up to this many times the longest probe are planned from the fit; longer ones re-probe
MAX_PROBE = 4096

# (rows, width, mode, scored per row) -> bytes added at the peak
Probe = Callable[[int, int, "Mode", int], int]


class MemoryTargetError(ValueError):
    """The learner cannot work within the memory target; the message names the setting to change."""


class SequenceTooLong(MemoryTargetError):
    """A row that cannot be trained within the memory target even as a micro-batch of its own."""


def return_freed_memory() -> None:
    """Hand the pages MLX freed back to the system (Linux: glibc's malloc_trim).

    On the CPU backend MLX's buffers come from malloc, and glibc keeps what is freed in the heap of the thread that
    freed it: the engine's generation buffers stayed resident while the learner's activations took new memory in
    another thread's heap, so the process held both. Trimming around each learner step costs 3-12 ms in the
    benchmark's run, next to steps of seconds. Elsewhere (macOS, other C libraries) it does nothing."""
    if _libc is not None:
        _libc.malloc_trim(0)


def _glibc() -> Any:
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


_libc = _glibc()


def machine_memory() -> int | None:
    """Bytes of memory the default device can use: Metal's recommended working set (or its memory size), CUDA's
    device memory, or the machine's physical memory for the CPU backend. None when unknown."""
    info = mx.device_info()
    for key in ("max_recommended_working_set_size", "memory_size", "total_memory"):
        value = info.get(key)
        if isinstance(value, int) and value > 0:
            return value
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def system_available() -> int | None:
    """Bytes the system can still hand out without swapping (Linux's MemAvailable), for the CPU backend, whose
    memory is the machine's, shared with every other process. None elsewhere (Metal's working set is the bound)."""
    if sys.platform != "linux" or mx.default_device().type != mx.DeviceType.cpu:
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def memory_target(config: RLTrainingConfig) -> int | None:
    """The MLX memory target in bytes: max_memory_gb when set, else max_memory_fraction of the machine, else None."""
    if config.max_memory_gb is not None:
        return int(config.max_memory_gb * GiB)
    if config.max_memory_fraction is None:
        return None
    total = machine_memory()
    return None if total is None else int(config.max_memory_fraction * total)


@dataclass
class Cost:
    """Bytes a gradient pass over b rows x w positions, p of them scored, adds at its peak:
    fixed + b w (per_token + per_token_position w) + per_scored p."""

    fixed: float
    points: list[tuple[int, int, int, int]] = field(default_factory=list)  # (rows, width, scored, bytes) measured
    per_token: float = 0.0
    per_token_position: float = 0.0
    per_scored: float = 0.0
    floor: float = 1.0  # the fit scaled up until it promises no less than any probe
    correction: float = 1.0  # raised when a real micro-batch used more than predicted

    @property
    def probed_width(self) -> int:
        return max((w for _, w, _, _ in self.points), default=0)

    def variable(self, rows: int, width: int, scored: int) -> float:
        return rows * width * (self.per_token + self.per_token_position * width) + self.per_scored * scored

    def activations(self, rows: int, width: int, scored: int) -> float:
        """The predicted bytes above the fixed part (the gradient): activations, the head's logits, LoRA arrays;
        raised by what real micro-batches used (in async mode that includes what the engine allocated meanwhile,
        since MLX's peak is process-wide: a safe side to err on)."""
        return max(self.floor, self.correction) * self.variable(rows, width, scored)

    def __call__(self, rows: int, width: int, scored: int) -> float:
        return self.fixed + self.activations(rows, width, scored)

    def add(self, rows: int, width: int, scored: int, used: int) -> None:
        self.points.append((rows, width, scored, int(used)))
        self._fit()

    def _fit(self) -> None:
        """Least squares of (used - fixed) / tokens = per_token + per_token_position * width + per_scored * scored /
        tokens, every coefficient >= 0: the best fit over the subsets of the three terms whose solution has no
        negative coefficient and which the points determine. Ties go to the earlier subset, per_token first: a
        term the probes cannot tell apart from it is charged to every position, the conservative choice."""
        tokens = np.array([r * w for r, w, _, _ in self.points], np.float64)
        features = np.array([[1.0, w, p / (r * w)] for r, w, p, _ in self.points], np.float64)
        target = np.array([max(0.0, u - self.fixed) for *_, u in self.points], np.float64) / tokens
        best, best_error = np.array([target.max(), 0.0, 0.0]), math.inf
        tie = 1e-9 * float(np.sum(target**2))  # errors closer than this are equal (rounding)
        for terms in ([0], [2], [0, 1], [0, 2], [1, 2], [0, 1, 2], [1]):
            x = features[:, terms]
            if np.linalg.matrix_rank(x) < len(terms):
                continue
            solution = np.linalg.lstsq(x, target, rcond=None)[0]
            if (solution < -1e-9 * np.abs(solution).max()).any():  # below rounding: a term that is truly 0
                continue
            error = float(np.sum((x @ solution - target) ** 2))
            if error < best_error - tie:
                best, best_error = np.zeros(3), error
                best[terms] = np.maximum(solution, 0.0)
        self.per_token, self.per_token_position, self.per_scored = (float(v) for v in best)
        ratios = [(u - self.fixed) / v for r, w, p, u in self.points if (v := self.variable(r, w, p)) > 0]
        self.floor = max([1.0, *ratios])


@dataclass(frozen=True)
class Mode:
    """How one gradient pass trades compute for memory: checkpointed blocks (the backward recomputes each trained
    block), and kept logits (the LM head's backward reads the forward's chunk logits instead of recomputing them)."""

    checkpoint: bool = False
    keep_logits: bool = False

    def __str__(self) -> str:
        return (
            f"checkpointing {'on' if self.checkpoint else 'off'}, logits {'kept' if self.keep_logits else 'recomputed'}"
        )


@dataclass(frozen=True)
class Plan:
    rows: np.ndarray  # row indices of the batch
    checkpoint: bool  # run this micro-batch's trained blocks under activation checkpointing
    width: int
    scored: int = 0  # positions the LM head scores (the rows' trained positions)
    keep_logits: bool = False  # the LM head keeps its logits for the backward (no recomputation)

    @property
    def mode(self) -> Mode:
        return Mode(self.checkpoint, self.keep_logits)


@dataclass(frozen=True)
class Shape:
    """(rows, width) -> (rows, width, scored positions) for a batch whose rows score at most `most_scored` each."""

    most_scored: int

    def __call__(self, rows: int, width: int) -> tuple[int, int, int]:
        return rows, width, rows * min(width, self.most_scored)


class MemoryPlanner:
    """Plans micro-batches within rl_training's memory target; see the module docstring.

    keep_logits_available: the learner's LM head runs in chunks and can keep their logits (learn/logprobs.py)."""

    def __init__(
        self,
        config: RLTrainingConfig,
        *,
        gradient_bytes: int,
        checkpointing_available: bool,
        keep_logits_available: bool = False,
    ) -> None:
        self.config = config
        self.configured = memory_target(config)
        self.target = self.configured  # this step's: max_memory_fraction's never beyond what the system has free
        self.gradient_bytes = gradient_bytes
        self.checkpointing_available = checkpointing_available
        self.ladder = self._ladder(keep_logits_available)
        self.costs = {mode: Cost(fixed=float(gradient_bytes)) for mode in self.ladder}

    def _ladder(self, keep_logits: bool) -> list[Mode]:
        """The modes a micro-batch may run in, fastest (and hungriest) first: each one further down spends compute
        to save memory."""
        setting = self.config.activation_checkpointing
        if not self.checkpointing_available or setting == "never":
            blocks = [False]
        else:
            blocks = [True] if setting == "always" else [False, True]
        heads = [True, False] if keep_logits else [False]
        return [Mode(c, k) for c in blocks for k in heads]

    # --- planning -----------------------------------------------------------------------------------------------

    def checkpoint_for(self, rows: int, width: int) -> Mode:
        """The mode of a micro-batch of `rows` rows, the longest `width` long, without a memory target (auto:
        checkpointed from checkpoint_min_length tokens, the only guard left when nothing is measured; logits
        recomputed, since nothing bounds what keeping them would take)."""
        setting = self.config.activation_checkpointing
        if not self.checkpointing_available or setting == "never":
            return Mode(False)
        return Mode(setting == "always" or width >= self.config.checkpoint_min_length)

    def plan(
        self,
        lengths: np.ndarray,
        probe: Probe,
        *,
        scored: np.ndarray | None = None,
        held: int | None = None,
        optimizer_ready: bool = True,
    ) -> list[Plan]:
        """Micro-batches for rows of `lengths` (0: nothing to train, left out), longest rows first. `scored`: each
        row's trained positions (default: all of them). `held`: bytes already in use (default: MLX's active memory
        now); optimizer_ready False: AdamW's moments are still to be allocated (the first step)."""
        lengths = np.asarray(lengths)
        scored = lengths if scored is None else np.minimum(np.asarray(scored), lengths)
        longest = int(lengths.max(initial=0))
        if self.configured is None or longest == 0:
            plans = plan_micro_batches(lengths, token_budget=self.config.token_budget)
            return [self._plan(rows, lengths, scored, self.checkpoint_for) for rows in plans]
        held = mx.get_active_memory() if held is None else held
        self.target = self._target_now(held)
        self._check_update(held, optimizer_ready)
        # the accumulated gradient, and the new sum while it is formed, beside each pass's own
        available = self.target - held - 2 * self.gradient_bytes
        shape = Shape(int(scored.max()))
        mode = self._modes(lengths, shape, available, probe)
        plans = plan_micro_batches(
            lengths,
            token_budget=self.config.token_budget,
            fits=lambda rows, width: self._fits(shape(rows, width), mode(rows, width), available),
        )
        out = []
        for rows in plans:
            plan = self._plan(rows, lengths, scored, mode)
            alone = shape(1, plan.width)
            if not self._fits(alone, plan.mode, available):
                raise self._too_long(alone, plan.mode, available)
            out.append(plan)
        return out

    @staticmethod
    def _plan(rows: np.ndarray, lengths: np.ndarray, scored: np.ndarray, mode: Callable[[int, int], Mode]) -> Plan:
        width = int(lengths[rows].max())
        m = mode(len(rows), width)
        return Plan(
            rows=rows, checkpoint=m.checkpoint, width=width, scored=int(scored[rows].sum()), keep_logits=m.keep_logits
        )

    def _modes(self, lengths: np.ndarray, shape: Shape, available: float, probe: Probe) -> Callable[[int, int], Mode]:
        """Calibrate the cost models this batch needs; return (rows, width) -> mode: the fastest mode of the ladder
        in which one row of that width fits the target. So memory is traded for speed only as far as the target
        requires: rows that fit the fastest mode make micro-batches of it (more of them when the target is tight),
        never slower ones of more rows; each slower mode is measured only when some row needs it."""
        longest = int(lengths.max())
        calibrated = []
        for m in self.ladder:
            self._calibrate(m, longest, available, probe)
            calibrated.append(m)
            if self._fits(shape(1, longest), m, available):
                break

        def mode(rows: int, width: int) -> Mode:
            return next((m for m in calibrated if self._fits(shape(1, width), m, available)), calibrated[-1])

        return mode

    def _fits(self, shape: tuple[int, int, int], mode: Mode, available: float) -> bool:
        return MARGIN * self.costs[mode](*shape) <= available

    def _target_now(self, held: int) -> int:
        """max_memory_gb as set; max_memory_fraction of the machine, but on the CPU backend never more than what
        this process holds plus what the system has available now (other programs share the memory)."""
        if self.config.max_memory_gb is not None:
            return self.configured
        free = system_available()
        return self.configured if free is None else min(self.configured, held + free)

    def _check_update(self, held: int, optimizer_ready: bool) -> None:
        """The optimizer step holds the gradient, its clipped copy, new weights and two new AdamW moments beside the
        old ones (plus the moments themselves on the first step): tiny for LoRA, 5-7x the model in full training."""
        need = held + self.gradient_bytes * (5 if optimizer_ready else 7)
        if need > self.target:
            raise MemoryTargetError(
                f"the optimizer step needs about {need / GiB:.2f} GiB ({self.gradient_bytes / GiB:.2f} GiB of "
                f"trainable weights, {held / GiB:.2f} GiB held), more than the {self.target / GiB:.2f} GiB memory "
                f"target: raise rl_training.max_memory_gb (or max_memory_fraction), or train LoRA adapters "
                f"(rl_training.train_mode = 'lora')"
            )

    # --- measuring ----------------------------------------------------------------------------------------------

    def _calibrate(self, mode: Mode, longest: int, available: float, probe: Probe) -> None:
        """Probe one-row gradient passes of growing width, every position scored, until the fit covers `longest`;
        the first width also with one scored position. A probe the fit so far predicts would not fit is not run:
        the plan then extrapolates (at most EXTRAPOLATE times the longest probe) and raises SequenceTooLong before
        anything that long is allocated."""
        cost = self.costs[mode]
        goal = min(longest, MAX_PROBE)
        while cost.probed_width * EXTRAPOLATE < longest and cost.probed_width < goal:
            width = min(goal, FIRST_PROBE if not cost.points else cost.probed_width * PROBE_GROWTH)
            if cost.points and not self._fits((1, width, width), mode, available):
                return
            for scored in (width, 1) if not cost.points and width > 1 else (width,):
                cost.add(1, width, scored, probe(1, width, mode, scored))
                logger.debug(
                    "memory probe: 1 x %d tokens (%d scored), %s: %.1f MiB",
                    width,
                    scored,
                    mode,
                    cost.points[-1][3] / 2**20,
                )

    def observe(self, plan: Plan, used: int) -> None:
        """A real micro-batch's measured bytes over the memory before it; raise the model if it was low."""
        if self.target is None:
            return
        cost = self.costs[plan.mode]
        shape = (len(plan.rows), plan.width, plan.scored)
        predicted, variable = cost(*shape), cost.variable(*shape)
        if used > predicted and variable > 0:
            cost.correction = max(cost.correction, (used - cost.fixed) / variable)
            level = logging.INFO if used > MARGIN * predicted else logging.DEBUG  # beyond the margin: news
            logger.log(
                level,
                "memory model raised by %.0f%% after a %d x %d micro-batch used %.1f MiB",
                (used / predicted - 1) * 100,
                len(plan.rows),
                plan.width,
                used / 2**20,
            )

    def _too_long(self, shape: tuple[int, int, int], mode: Mode, available: float) -> SequenceTooLong:
        width = shape[1]
        need = MARGIN * self.costs[mode](*shape)
        held = self.target - available
        hint = (
            ""
            if mode.checkpoint or not self.checkpointing_available
            else ", set rl_training.activation_checkpointing = 'auto' or 'always'"
        )
        return SequenceTooLong(
            f"a sequence of {width} tokens needs about {need / GiB:.2f} GiB for its gradient pass, but only "
            f"{max(0.0, available) / GiB:.2f} GiB of the {self.target / GiB:.2f} GiB memory target are free "
            f"({held / GiB:.2f} GiB already held: weights, optimizer state, caches, gradients). Raise "
            f"rl_training.max_memory_gb (or max_memory_fraction){hint}, or cap the sequence length "
            f"(rl_training.max_tokens, the environment's max_token_len)"
        )


class PeakMeter:
    """MLX's peak memory over a learner step, across the per-micro-batch resets that measure each pass.

    mx.reset_peak_memory is process-wide: an engine generating in the same process (async mode) counts too.
    """

    def __init__(self) -> None:
        self._peak = 0

    def start(self) -> None:
        self._peak = 0
        mx.reset_peak_memory()

    def read(self) -> int:
        return max(self._peak, mx.get_peak_memory())

    @contextmanager
    def measure(self) -> Iterator[Callable[[], int]]:
        """`with meter.measure() as used:` ... `used()`: bytes the block added at its peak over what was held."""
        self._peak = self.read()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        result: list[int] = []
        try:
            yield lambda: result[0]
        finally:
            peak = mx.get_peak_memory()
            self._peak = max(self._peak, peak)
            result.append(max(0, peak - before))
