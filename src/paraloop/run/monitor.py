"""The monitor actor: StepFinished in; metrics.jsonl, the progress line and the run's status out.

One JSON line per learner step goes to RUN_DIR/metrics.jsonl (appended, so a resumed run continues the file).
On a terminal the progress line redraws in place; elsewhere (CI, logs) it prints one line per step.
"""

import json
import sys
import time
from pathlib import Path
from typing import TextIO

from anyio.abc import ObjectReceiveStream

from paraloop.messages import StepFinished
from paraloop.run.status import RunStatus, swap_pause_ms

TABLE_COLUMNS = ("step", "reward_mean", "reward_std", "loss", "kl", "entropy", "clip_fraction", "step_time_s")


def progress_line(status: RunStatus, done: StepFinished) -> str:
    m = done.metrics
    engine = status.engine_stats() if status.engine_stats else {}
    pause_ms = swap_pause_ms(engine)["last"]
    parts = [
        f"step {done.step}/{status.total_steps}",
        f"v{done.version}",
        f"reward {m.get('reward_mean', float('nan')):.3f}",
        f"loss {m.get('loss', float('nan')):+.4f}",
        f"kl {m.get('kl', 0.0):.4f}",
        f"gen {engine.get('tokens_per_s', 0.0):.0f} tok/s",
        f"train {m.get('tokens_per_s', 0.0):.0f} tok/s",
        f"swap {pause_ms:.2f} ms" if pause_ms is not None else "swap -",
    ]
    if done.skipped:
        parts.append("SKIPPED (non-finite)")
    if status.paused:
        parts.append("paused")
    return " | ".join(parts)


def summary_table(history: list[dict[str, float]]) -> str:
    """A plain-text table of the per-step metrics (printed at the end of a run)."""
    header = " ".join(f"{c:>13}" for c in TABLE_COLUMNS)
    rows = [header, "-" * len(header)]
    for row in history:
        cells = []
        for c in TABLE_COLUMNS:
            v = row.get(c)
            cells.append(f"{'-':>13}" if v is None else f"{int(v):>13d}" if c == "step" else f"{v:>13.4f}")
        rows.append(" ".join(cells))
    return "\n".join(rows)


async def run_monitor(
    inbox: ObjectReceiveStream[StepFinished], *, status: RunStatus, run_dir: Path, out: TextIO | None = None
) -> None:
    out = out or sys.stderr  # looked up now, not at import: whoever owns stderr then (a test's capture) may close it
    interactive = out.isatty()
    path = run_dir / "metrics.jsonl"
    async with inbox:
        with path.open("a") as jsonl:
            async for done in inbox:
                status.record_step(done)
                engine = status.engine_stats() if status.engine_stats else {}
                record = {
                    "step": done.step,
                    "version": done.version,
                    "time": time.time(),
                    "skipped": done.skipped,
                    **done.metrics,
                    "swap_pause_ms": swap_pause_ms(engine)["last"],
                    "serving_version": status.serving_version,
                }
                jsonl.write(json.dumps(record) + "\n")
                jsonl.flush()
                line = progress_line(status, done)
                out.write(f"\r\x1b[2K{line}" if interactive else line + "\n")
                out.flush()
    if interactive:
        out.write("\n")
