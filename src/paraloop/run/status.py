"""The run's shared status: what /control/status, /metrics and the progress line read.

Only the event loop writes it (actors update it between awaits), so it needs no lock. Numbers another part owns
(the engine's swap pauses, the buffer's counts, the source's position) are read from that part when asked, never
copied here. The dashboard's rollouts are a bounded ring (the last `rollout_steps` steps, a few samples each); the
full record of every step is RUN_DIR/metrics.jsonl and rollouts.jsonl.
"""

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from paraloop.messages import AdapterSwapped, EvalFinished, RolloutBatch, StepFinished


@dataclass
class RunStatus:
    total_steps: int
    mode: str
    run_dir: str
    started_at: float = field(default_factory=time.time)
    step: int = 0
    version: int = 0  # latest adapter version produced by the learner
    serving_version: int = 0  # version the engine serves
    paused: bool = False
    stopping: bool = False
    learner_busy: bool = False
    learner_held: bool = False  # the pause has taken hold: no step is decided or computing (run/control.py)
    skipped_steps: int = 0
    dropped_stale: int = 0
    last_metrics: dict[str, float] = field(default_factory=dict)
    last_checkpoint: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)  # held-out evaluations, oldest first
    alerts: dict[str, str] = field(default_factory=dict)  # what needs a human's attention (mismatch, eval), by topic
    queues: dict[str, Any] = field(default_factory=dict)  # name -> a memory object stream (for its depth)
    engine_stats: Callable[[], dict[str, float]] | None = None
    source_status: Callable[[], dict[str, Any]] | None = None
    buffer_stats: Callable[[], dict[str, int]] | None = None
    http_port: int | None = None
    rollouts: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=20))  # {"step", "samples"}
    sampler: Callable[[RolloutBatch, int, int], list[dict[str, Any]]] | None = None  # (batch, step, version)
    prometheus: Any = None  # server.metrics.Metrics: observes step times and swap pauses
    ranks_status: Callable[[], dict[str, Any]] | None = None  # a distributed run: this rank and its peers
    # Liveness (run/watchdog.py): when each part began what it is doing now (time.monotonic), and what is stalled.
    learner_busy_since: float | None = None  # inside a learner step's compute
    slowest_step_s: float = 0.0  # the slowest learner step's compute so far
    swap_pending_since: float | None = None  # the publisher handed the engine an adapter it has not applied yet
    checkpoint_writing_since: float | None = None
    slowest_write_s: float = 0.0  # the slowest checkpoint write so far
    stalled: dict[str, dict[str, Any]] = field(default_factory=dict)  # part -> {"reason", "since", "for_s"}
    checkpoint_error: dict[str, Any] | None = None  # the failing write the checkpointer retries, if any
    metrics_error: str | None = None  # metrics.jsonl could not be written (the lines wait in memory)
    journal_stats: Callable[[], dict[str, Any]] | None = None

    def record_step(self, done: StepFinished, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Record a finished step; returns its history row (the step's metrics plus `extra`, as metrics.jsonl)."""
        self.step = done.step
        self.version = max(self.version, done.version)
        self.last_metrics = dict(done.metrics)
        if done.skipped:
            self.skipped_steps += 1
        row = {"step": done.step, **done.metrics, **(extra or {})}
        self.history.append(row)
        if self.prometheus is not None and "step_time_s" in done.metrics:
            self.prometheus.step_time.observe(done.metrics["step_time_s"])
        return row

    def record_eval(self, done: EvalFinished) -> dict[str, Any]:
        record = {"step": done.step, "version": done.version, "task": done.task, **done.metrics}
        self.evals.append(record)
        return record

    def record_swap(self, swapped: AdapterSwapped) -> None:
        self.serving_version = swapped.version
        if self.prometheus is not None:
            self.prometheus.swap_pause.observe(swapped.pause_s)

    def record_rollouts(self, batch: RolloutBatch, step: int, version: int) -> None:
        """Keep a few readable samples of the batch that step `step` trained (the oldest step falls out)."""
        if self.sampler is None:
            return
        samples = self.sampler(batch, step, version)
        if samples:
            self.rollouts.append({"step": step, "samples": samples})

    def samples_of(self, step: int) -> list[dict[str, Any]]:
        for entry in reversed(self.rollouts):
            if entry["step"] == step:
                return entry["samples"]
        return []

    @property
    def rejected_groups(self) -> int:
        """Rollout groups the source rejected as malformed. The source owns the count (the Atropos client counts
        them per environment; the mock environment makes none), so it is read from there, never copied."""
        source = self.source_status() if self.source_status else {}
        return int(source.get("groups_rejected", 0))

    def queue_depths(self) -> dict[str, int]:
        depths = {}
        for name, stream in self.queues.items():
            stats = stream.statistics()
            depths[name] = stats.current_buffer_used
        return depths

    def snapshot(self) -> dict[str, Any]:
        """The JSON body of GET /control/status."""
        engine = self.engine_stats() if self.engine_stats else {}
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "adapter_version": self.version,
            "serving_version": self.serving_version,
            "paused": self.paused,
            "stopping": self.stopping,
            "learner_busy": self.learner_busy,
            "learner_held": self.learner_held,
            "mode": self.mode,
            "uptime_s": round(time.time() - self.started_at, 3),
            "queues": self.queue_depths(),
            "last_metrics": self.last_metrics,
            "tokens_per_s": engine.get("tokens_per_s", 0.0),
            "engine": engine,
            "swap_pause_ms": swap_pause_ms(engine),
            "skipped_steps": self.skipped_steps,
            "dropped_stale": self.dropped_stale,
            "rejected_groups": self.rejected_groups,
            "last_checkpoint": self.last_checkpoint,
            "checkpoint_error": self.checkpoint_error,
            "metrics_error": self.metrics_error,
            "stalled": self.stalled,
            "journal": self.journal_stats() if self.journal_stats else None,
            "source": self.source_status() if self.source_status else {},
            "buffer": self.buffer_stats() if self.buffer_stats else {},
            "eval": {"first": self.evals[0], "last": self.evals[-1]} if self.evals else {},
            "alerts": dict(self.alerts),
            "run_dir": self.run_dir,
            **({"ranks": self.ranks_status()} if self.ranks_status else {}),
        }


def swap_pause_ms(engine: dict[str, float]) -> dict[str, float | int | None]:
    """The engine's swap pauses in milliseconds: the last one, the median of the recent ones, and how many swaps."""
    swaps = int(engine.get("swaps", 0))
    return {
        "last": engine["last_swap_pause_s"] * 1e3 if swaps else None,
        "median": engine["median_swap_pause_s"] * 1e3 if swaps else None,
        "count": swaps,
    }
