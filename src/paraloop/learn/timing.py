"""Where a learner step's time goes: wall time per phase, reported in the step's metrics as time_<phase>_s.

Phases: trim (handing freed memory back, learn/memory.py), plan (micro-batch planning and, when a new length
regime calls for them, its memory probes), old_policy (the old-policy and reference forwards; 0 when the engine's
log-probs serve), gradient (the micro-batches' forward and backward passes), optimizer (norm, clip, AdamW, the
reference EMA). time_other_s is the rest: collation, advantages, metrics. Each phase ends with the evaluation it
needs, so the times are the work's, not MLX's lazy bookkeeping.
"""

import time
from collections.abc import Iterator
from contextlib import contextmanager

PHASES = ("trim", "plan", "old_policy", "gradient", "optimizer")


class Phases:
    def __init__(self) -> None:
        self._seconds = dict.fromkeys(PHASES, 0.0)

    def start(self) -> None:
        self._seconds = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[phase] += time.perf_counter() - start

    def metrics(self, elapsed: float) -> dict[str, float]:
        out = {f"time_{phase}_s": seconds for phase, seconds in self._seconds.items()}
        out["time_other_s"] = max(0.0, elapsed - sum(self._seconds.values()))
        return out
