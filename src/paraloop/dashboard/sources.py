"""What the dashboard shows, from wherever it lives: a live run, a serving process, or finished runs' files.

Every source answers the same five questions (the JSON of /dashboard/api/*): `info()` (mode, runs, their
configuration), `metrics(run, since, rev)` (step rows after `since`), `evals(run)` (the held-out evaluations),
`status()` (the live state, or None) and `rollouts(run, since)` (the last steps' samples). A live run reads
RunStatus (the history, evaluations and rollout ring it already keeps); files are read incrementally and bounded,
since a run may still be writing them.
"""

import json
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paraloop.config import REDACTED
from paraloop.server.metrics import process_memory

log = logging.getLogger("paraloop.dashboard")

MAX_ROWS = 5000  # rows per /metrics answer: a long history arrives in a few bounded answers
MAX_EVALS = 2000  # held-out evaluations per /evals answer: the newest (one per task and eval_interval steps)
MAX_LINE_BYTES = 1 << 20  # a metrics line longer than this is not paraloop's: skipped
MAX_READ_BYTES = 64 << 20  # read per poll from a growing metrics.jsonl
MAX_FILE_BYTES = 1 << 30  # metrics.jsonl beyond this is not read further (the dashboard says so)
ROLLOUT_TAIL_BYTES = 8 << 20  # rollouts.jsonl: only its tail is read


class SourceError(ValueError):
    """A request the source cannot answer (an unknown run): answered 400 naming the parameter."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def rows_after(history: list[dict[str, Any]], since: int) -> tuple[list[dict[str, Any]], bool]:
    """Rows with step > since (history is in step order), at most MAX_ROWS; and whether more remain."""
    lo, hi = 0, len(history)
    while lo < hi:  # bisect on the step
        mid = (lo + hi) // 2
        if history[mid]["step"] <= since:
            lo = mid + 1
        else:
            hi = mid
    rows = history[lo : lo + MAX_ROWS]
    return rows, lo + MAX_ROWS < len(history)


def eval_answer(run: int, evals: list[dict[str, Any]]) -> dict[str, Any]:
    """The newest MAX_EVALS evaluations, oldest first: each {"step", "task", "version", metric: value, ...}."""
    rows = [{k: v for k, v in e.items() if k not in ("kind", "time")} for e in evals[-MAX_EVALS:]]
    return {"run": run, "evals": rows, "more": len(evals) > MAX_EVALS}


def check_single_run(run: int) -> None:
    """A live run's or a serving process's dashboard has one run: 0."""
    if run != 0:
        raise SourceError("run", f"no run {run}: this process has one run (0)")


def run_state(snapshot: dict[str, Any]) -> str:
    if snapshot.get("stopping"):
        return "stopping"
    if snapshot.get("paused"):  # "pausing" while a step decided before the pause finishes
        return "paused" if snapshot.get("learner_held") else "pausing"
    if snapshot.get("step", 0) >= snapshot.get("total_steps", 1):
        return "finishing"
    return "training"


class LiveRun:
    """`paraloop run`'s own status: curves from its in-memory history, samples from its rollout ring. A resumed run
    also shows the steps before the resume point, read once from its files."""

    mode = "run"

    def __init__(
        self, status: Any, config: dict[str, Any], *, name: str, resumed_at: int | None = None, rollout_steps: int = 20
    ) -> None:
        self._status = status
        self._config = config
        self._name = name
        self._past: list[dict[str, Any]] = []
        self._past_evals: list[dict[str, Any]] = []
        self._past_rollouts: list[dict[str, Any]] = []
        if resumed_at is not None:
            run_dir = Path(status.run_dir)
            earlier = MetricsFile(run_dir / "metrics.jsonl")
            earlier.refresh()
            self._past = [r for r in earlier.history if r["step"] <= resumed_at]
            self._past_evals = [e for e in earlier.evals if e["step"] <= resumed_at]
            self._past_rollouts = [
                e for e in read_rollout_tail(run_dir / "rollouts.jsonl", rollout_steps) if e["step"] <= resumed_at
            ]

    def info(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "controls": True,
            "runs": [{"id": 0, "name": self._name, "run_dir": self._status.run_dir, "config": self._config}],
        }

    def metrics(self, run: int, since: int, rev: int | None) -> dict[str, Any]:
        check_single_run(run)
        rows, more = rows_after(self._past, since)
        if not more and len(rows) < MAX_ROWS:
            now, more = rows_after(self._status.history, since)
            rows, more = rows + now[: MAX_ROWS - len(rows)], more or len(rows) + len(now) > MAX_ROWS
        return {"run": run, "rev": 0, "reset": False, "rows": rows, "more": more, "note": None}

    def evals(self, run: int) -> dict[str, Any]:
        check_single_run(run)
        return eval_answer(run, [*self._past_evals, *self._status.evals])

    def status(self) -> dict[str, Any]:
        snap = self._status.snapshot()
        return {**snap, "state": run_state(snap), "memory": process_memory(), "time": time.time()}

    def rollouts(self, run: int, since: int) -> dict[str, Any]:
        check_single_run(run)
        entries = [*self._past_rollouts, *self._status.rollouts][-(self._status.rollouts.maxlen or 20) :]
        return {"run": run, "steps": [e for e in entries if e["step"] > since]}


class ServeView:
    """`paraloop serve`: no training, so no steps; the engine's live numbers (the page plots them over time)."""

    mode = "serve"

    def __init__(self, engine: Any, config: dict[str, Any], *, name: str) -> None:
        self._engine = engine
        self._config = config
        self._name = name
        self._started = time.time()

    def info(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "controls": False,
            "runs": [{"id": 0, "name": self._name, "run_dir": None, "config": self._config}],
        }

    def metrics(self, run: int, since: int, rev: int | None) -> dict[str, Any]:
        check_single_run(run)
        return {"run": run, "rev": 0, "reset": False, "rows": [], "more": False, "note": None}

    def evals(self, run: int) -> dict[str, Any]:
        check_single_run(run)
        return eval_answer(run, [])

    def status(self) -> dict[str, Any]:
        engine = self._engine.stats()
        return {
            "state": "serving",
            "engine": engine,
            "tokens_per_s": engine.get("tokens_per_s", 0.0),
            "serving_version": int(engine.get("version", 0)),
            "memory": process_memory(),
            "uptime_s": round(time.time() - self._started, 3),
            "time": time.time(),
        }

    def rollouts(self, run: int, since: int) -> dict[str, Any]:
        return {"run": run, "steps": []}


@dataclass
class MetricsFile:
    """RUN_DIR/metrics.jsonl read incrementally: new complete lines only, each bounded; a step written again (a
    resumed run) replaces the earlier row and bumps `rev`, so clients reload. Held-out evaluations (rows marked
    `"kind": "eval"`) are kept apart, one per step and task, the newest winning."""

    path: Path
    offset: int = 0
    rev: int = 0
    by_step: dict[int, dict[str, Any]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    by_eval: dict[tuple[int, str], dict[str, Any]] = field(default_factory=dict)
    evals: list[dict[str, Any]] = field(default_factory=list)
    note: str | None = None
    _identity: tuple[int, int] | None = None

    def refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self.note = f"{self.path} does not exist (yet)"
            return
        identity = (st.st_dev, st.st_ino)
        if identity != self._identity or st.st_size < self.offset:  # replaced or truncated: read anew
            self._identity, self.offset, self.by_step, self.by_eval, self.rev = identity, 0, {}, {}, self.rev + 1
            self.note = None
        if st.st_size == self.offset:
            return
        if self.offset >= MAX_FILE_BYTES:
            self.note = f"{self.path.name}: only its first {MAX_FILE_BYTES >> 20} MiB are shown"
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read(min(MAX_READ_BYTES, st.st_size - self.offset))
        end = chunk.rfind(b"\n") + 1  # a line still being written waits for its newline
        replaced = False
        for n, line in enumerate(chunk[:end].splitlines()):
            if not line.strip():
                continue
            if len(line) > MAX_LINE_BYTES:
                self.note = f"{self.path.name}: skipped a line of {len(line)} bytes"
                continue
            try:
                row = json.loads(line)
                step = int(row["step"])
                kind = row.get("kind", "train")
                task = str(row.get("task", "")) if kind == "eval" else None
            except (ValueError, KeyError, TypeError, AttributeError):
                self.note = f"{self.path.name}: skipped a line that is not a metrics row (near byte {self.offset})"
                log.debug("bad line %d in %s", n, self.path)
                continue
            if kind == "train":
                replaced |= step in self.by_step
                self.by_step[step] = row
            elif task is not None:
                self.by_eval[step, task] = {**row, "step": step}
        self.offset += end
        if end == 0 and len(chunk) >= MAX_LINE_BYTES:  # one endless line: skip past it
            self.offset += len(chunk)
        if replaced:
            self.rev += 1
        self.history = [self.by_step[s] for s in sorted(self.by_step)]
        self.evals = [self.by_eval[k] for k in sorted(self.by_eval)]


def read_rollout_tail(path: Path, keep: int) -> list[dict[str, Any]]:
    """The last `keep` step entries of rollouts.jsonl (only its tail is read)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return []
    with open(path, "rb") as f:
        f.seek(max(0, size - ROLLOUT_TAIL_BYTES))
        data = f.read(ROLLOUT_TAIL_BYTES)
    lines = data.split(b"\n")
    if size > ROLLOUT_TAIL_BYTES:
        lines = lines[1:]  # the first is cut
    entries: deque[dict[str, Any]] = deque(maxlen=keep)
    for line in lines:
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            if (
                isinstance(entry, dict)
                and isinstance(entry.get("step"), int)
                and isinstance(entry.get("samples"), list)
            ):
                entries.append(entry)
        except ValueError:
            continue
    return list(entries)


def run_names(dirs: list[Path]) -> list[str]:
    """Short distinct names: the directory name, with its parent where two would clash."""
    names = [d.resolve().name or str(d) for d in dirs]
    if len(set(names)) < len(names):
        names = [f"{d.resolve().parent.name}/{d.resolve().name}" for d in dirs]
    if len(set(names)) < len(names):
        names = [str(d) for d in dirs]
    return names


def read_config(run_dir: Path) -> dict[str, Any] | None:
    """The configuration the run was started with, from its newest checkpoint's trainer_state.json (secrets
    blanked), or None."""
    checkpoints = run_dir / "checkpoints"
    candidates = sorted(checkpoints.glob("step_*/trainer_state.json")) if checkpoints.is_dir() else []
    for path in reversed(candidates):
        try:
            if path.stat().st_size > MAX_LINE_BYTES:
                continue
            config = json.loads(path.read_text()).get("config")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(config, dict):
            server = config.get("server")
            if isinstance(server, dict) and server.get("control_token"):
                server["control_token"] = REDACTED  # an older run's checkpoint may hold it
            return config
    return None


class RunFiles:
    """`paraloop dashboard RUN_DIR ...`: finished (or running) runs from their files, to compare."""

    mode = "files"

    def __init__(self, run_dirs: list[Path], *, rollout_steps: int = 20) -> None:
        self._dirs = run_dirs
        self._names = run_names(run_dirs)
        self._files = [MetricsFile(d / "metrics.jsonl") for d in run_dirs]
        self._rollout_steps = rollout_steps

    def info(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "controls": False,
            "runs": [
                {"id": i, "name": name, "run_dir": str(d), "config": read_config(d)}
                for i, (d, name) in enumerate(zip(self._dirs, self._names, strict=True))
            ],
        }

    def _file(self, run: int) -> MetricsFile:
        if not 0 <= run < len(self._files):
            raise SourceError("run", f"no run {run}: runs are 0..{len(self._files) - 1}")
        return self._files[run]

    def metrics(self, run: int, since: int, rev: int | None) -> dict[str, Any]:
        f = self._file(run)
        f.refresh()
        reset = rev is not None and rev != f.rev
        rows, more = rows_after(f.history, -1 if reset else since)
        return {"run": run, "rev": f.rev, "reset": reset, "rows": rows, "more": more, "note": f.note}

    def evals(self, run: int) -> dict[str, Any]:
        f = self._file(run)
        f.refresh()
        return eval_answer(run, f.evals)

    def status(self) -> None:
        return None

    def rollouts(self, run: int, since: int) -> dict[str, Any]:
        self._file(run)
        entries = read_rollout_tail(self._dirs[run] / "rollouts.jsonl", self._rollout_steps)
        return {"run": run, "steps": [e for e in entries if e["step"] > since]}
