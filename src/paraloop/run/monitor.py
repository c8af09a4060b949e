"""The monitor actor: StepFinished in; metrics.jsonl, the progress line and the run's status out.

One JSON line per learner step goes to RUN_DIR/metrics.jsonl (appended, so a resumed run continues the file).
On a terminal the progress line redraws in place; elsewhere (CI, logs) it prints one line per step. A line that
cannot be written (disk full) waits in memory (up to MAX_UNWRITTEN lines) and goes out with the next step's; the
run goes on, and status.metrics_error says why.
"""

import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import TextIO

from anyio.abc import ObjectReceiveStream

from paraloop.messages import StepFinished
from paraloop.run.status import RunStatus, swap_pause_ms

log = logging.getLogger("paraloop.monitor")

MAX_UNWRITTEN = 100_000

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
    out = out or sys.stderr  # looked up now: tests and daemons replace sys.stderr
    interactive = _isatty(out)
    path = run_dir / "metrics.jsonl"
    unwritten: list[str] = []
    async with inbox:
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
            unwritten.append(json.dumps(record) + "\n")
            _write_lines(path, unwritten, status)
            line = progress_line(status, done)
            _say(out, f"\r\x1b[2K{line}" if interactive else line + "\n")
    if interactive:
        _say(out, "\n")


def _isatty(out: TextIO) -> bool:
    try:
        return out.isatty()
    except (OSError, ValueError):
        return False


def _say(out: TextIO, text: str) -> None:
    """The progress line; a terminal that went away (closed, a broken pipe) must not end a training run."""
    try:
        out.write(text)
        out.flush()
    except (OSError, ValueError):
        pass


def _write_lines(path: Path, lines: list[str], status: RunStatus) -> None:
    """Append `lines` to metrics.jsonl and empty the list; on an OSError keep them for the next step."""
    try:
        with path.open("ab") as jsonl:
            start = jsonl.tell()
            try:
                jsonl.write("".join(lines).encode())
                jsonl.flush()
            except OSError:
                with contextlib.suppress(OSError):
                    jsonl.truncate(start)  # no half line: they are all written again next time
                raise
    except OSError as e:
        if status.metrics_error is None:
            log.error("could not write %s (%s): metric lines wait in memory and the run goes on", path, e)
        status.metrics_error = f"{type(e).__name__}: {e} ({len(lines)} line(s) waiting)"
        del lines[:-MAX_UNWRITTEN]
        return
    if status.metrics_error is not None:
        log.warning("%s written again", path)
        status.metrics_error = None
    lines.clear()
