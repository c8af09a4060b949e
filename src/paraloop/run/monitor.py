"""The monitor actor: StepFinished and EvalFinished in; the run's status, the loggers (metrics.jsonl, TensorBoard,
W&B) and the progress line out.

Each step becomes one row: the learner's metrics plus what the rest of the run looked like when it finished
(generation tokens/s, swap pause, queue depths, memory), under the same names in every logger and the dashboard.
Each held-out evaluation becomes one row marked `"kind": "eval"`. On a terminal the progress line redraws in place;
elsewhere (CI, logs) it prints one line per step. A step whose train/inference mismatch exceeds the threshold is
logged as a warning and shown in the status' alerts until a step is back under it. A terminal that went away
or a metrics.jsonl that cannot be written (run/reporters.py keeps its lines) never ends the run. It returns at end
of stream, after closing the loggers.
"""

import logging
import sys
import time
from typing import Any, TextIO

import anyio
from anyio.abc import ObjectReceiveStream

from paraloop.atropos.evals import AtroposEvals
from paraloop.learn.mismatch import mismatch_alarm
from paraloop.messages import EvalFinished, StepFinished
from paraloop.run.reporters import JsonlReporter, Reporter, close_all, log_all
from paraloop.run.status import RunStatus, swap_pause_ms
from paraloop.server.metrics import process_memory

log = logging.getLogger("paraloop.monitor")

TABLE_COLUMNS = ("step", "reward_mean", "reward_std", "loss", "kl", "entropy", "clip_fraction", "step_time_s")
CLOSE_TIMEOUT_S = 60  # W&B may flush for a while; never longer than this


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
    if "mismatch" in status.alerts:
        parts.append(f"MISMATCH {m.get('mismatch_abs_mean', float('nan')):.3g} nats")
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


def run_gauges(status: RunStatus, done: StepFinished) -> dict[str, Any]:
    """What the rest of the run looked like when the step finished (added to the step's row)."""
    engine = status.engine_stats() if status.engine_stats else {}
    row: dict[str, Any] = {
        "version": done.version,
        "time": time.time(),
        "skipped": done.skipped,
        "swap_pause_ms": swap_pause_ms(engine)["last"],
        "serving_version": status.serving_version,
        "generation_tokens_per_s": engine.get("tokens_per_s", 0.0),
        "engine_requests": engine.get("queue_depth", 0.0),
    }
    for name, depth in status.queue_depths().items():
        row[f"queue_{name}"] = depth
    row.update(process_memory())
    return row


def eval_line(record: dict) -> str:
    keys = [k for k in record if k == "reward_mean" or k.startswith("pass@")]
    if not keys:  # an Atropos environment's own metrics
        keys = [k for k, v in record.items() if k not in ("step", "version", "task") and isinstance(v, float)][:4]
    numbers = " | ".join(f"{k} {record[k]:.3f}" for k in keys)
    took = f" | {record['time_s']:.1f} s" if "time_s" in record else ""
    return f"eval v{record['version']} ({record['task']}) | {numbers}{took}"


def eval_table(evals: list[dict]) -> str:
    """The built-in held-out evaluations of a run as a plain-text table (the first row: the starting adapter)."""
    evals = [e for e in evals if "prompts" in e]
    if not evals:
        return ""
    keys = ["step", "version", "reward_mean"] + [k for k in evals[0] if k.startswith("pass@")]
    header = " ".join(f"{c:>13}" for c in keys)
    rows = [
        f"held-out eval ({evals[0]['task']}, {int(evals[0]['prompts'])} prompts x {int(evals[0]['samples'])} samples)",
        header,
        "-" * len(header),
    ]
    for record in evals:
        rows.append(
            " ".join(
                f"{int(record[c]):>13d}" if c in ("step", "version") else f"{record.get(c, float('nan')):>13.4f}"
                for c in keys
            )
        )
    return "\n".join(rows)


async def run_monitor(
    inbox: ObjectReceiveStream[StepFinished | EvalFinished],
    *,
    status: RunStatus,
    reporters: list[Reporter],
    out: TextIO | None = None,
    mismatch_threshold: float = 0.0,
    atropos_evals: AtroposEvals | None = None,
) -> None:
    out = out or sys.stderr  # looked up per run, never bound at import (tests and callers swap sys.stderr)
    interactive = _isatty(out)

    def write_eval(done: EvalFinished) -> None:
        record = status.record_eval(done)
        log_all(reporters, {"kind": "eval", "time": time.time(), **record}, [])
        _say(out, ("\r\x1b[2K" if interactive else "") + eval_line(record) + "\n")

    try:
        async with inbox:
            async for done in inbox:
                if isinstance(done, EvalFinished):
                    write_eval(done)
                    continue
                alarm = mismatch_alarm(done.metrics, mismatch_threshold)
                if alarm is not None:
                    if "mismatch" not in status.alerts:
                        log.warning("step %d: %s", done.step, alarm)
                    status.alerts["mismatch"] = f"step {done.step}: {alarm}"
                elif "mismatch_abs_mean" in done.metrics:
                    status.alerts.pop("mismatch", None)
                row = status.record_step(done, run_gauges(status, done))
                log_all(reporters, row, status.samples_of(done.step))
                status.metrics_error = next((r.error for r in reporters if isinstance(r, JsonlReporter)), None)
                line = progress_line(status, done)
                _say(out, f"\r\x1b[2K{line}" if interactive else line + "\n")
                for env, metrics in atropos_evals.new() if atropos_evals is not None else []:
                    write_eval(
                        EvalFinished(step=done.step, version=done.version, task=f"atropos:{env}", metrics=metrics)
                    )
    finally:
        with anyio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
            await anyio.to_thread.run_sync(close_all, reporters, abandon_on_cancel=True)
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
