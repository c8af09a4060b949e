"""Where each step's metrics and rollout samples go: `[logging] report_to = ["jsonl", "tensorboard", "wandb"]`.

In: one row per learner step (the step's metrics plus the run's gauges, the same names everywhere) and that step's
rollout samples (run/samples.py). Out: RUN_DIR/metrics.jsonl + rollouts.jsonl (jsonl; held-out evaluations are rows
marked `"kind": "eval"`), TensorBoard event files in
RUN_DIR/tensorboard (scalars, samples as a text table), a W&B run (scalars, samples as a wandb.Table; WANDB_MODE
or logging.wandb_mode=offline keeps everything on the machine). The monitor calls `log` per step and `close` once.

TensorBoard and W&B are optional extras: asking for one that is not installed stops the run before it starts.
Once running, an error in one of them (a full disk, a lost network) is logged once and that logger is dropped:
the run and metrics.jsonl go on. metrics.jsonl is the run's own record: lines that cannot be written wait in
memory and are written once they can (status `metrics_error` meanwhile).
"""

import contextlib
import importlib.util
import json
import logging
import secrets
from pathlib import Path
from typing import Any, Protocol

from paraloop.config import Settings, public_dump

log = logging.getLogger("paraloop.reporters")

MAX_UNWRITTEN = 100_000  # lines per file kept in memory while it cannot be written
SAMPLE_COLUMNS = ("step", "group", "reward", "advantage", "prompt", "completion")


class Reporter(Protocol):
    name: str
    essential: bool  # an error ends the run (else the reporter is dropped with a warning)

    def log(self, row: dict[str, Any], samples: list[dict[str, Any]]) -> None: ...

    def close(self) -> None: ...


class MissingExtra(RuntimeError):
    """report_to names a logger whose package is not installed."""


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's numbers (booleans and None left out): what TensorBoard and W&B plot. A held-out evaluation's
    (`"kind": "eval"`) are named eval/TASK/KEY, apart from the training curves of the same name."""
    evaluation = row.get("kind") == "eval"
    prefix = f"eval/{row.get('task', '')}/" if evaluation else ""
    skip = ("step", "time", "version") if evaluation else ("step", "time")
    return {
        prefix + k: float(v)
        for k, v in row.items()
        if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def completion_text(sample: dict[str, Any]) -> str:
    return "".join(sample["tokens"]) + (" [...]" if sample.get("completion_truncated") else "")


class JsonlReporter:
    """RUN_DIR/metrics.jsonl and rollouts.jsonl, appended (a resumed run continues both). A line that cannot be
    written (disk full, a read-only directory) waits in memory, up to MAX_UNWRITTEN lines per file, and goes out with
    the next step's; meanwhile `error` says why. The run goes on: its checkpoints hold what it learned."""

    name, essential = "jsonl", True

    def __init__(self, run_dir: Path) -> None:
        self._waiting: dict[Path, list[str]] = {run_dir / "metrics.jsonl": [], run_dir / "rollouts.jsonl": []}
        self.error: str | None = None

    def log(self, row: dict[str, Any], samples: list[dict[str, Any]]) -> None:
        metrics, rollouts = self._waiting.values()
        metrics.append(json.dumps(row) + "\n")
        if samples:
            rollouts.append(json.dumps({"step": row["step"], "samples": samples}) + "\n")
        errors = [e for path, lines in self._waiting.items() if (e := _append(path, lines)) is not None]
        if errors and self.error is None:
            log.error("could not write %s: lines wait in memory and the run goes on", errors[0])
        elif not errors and self.error is not None:
            log.warning("metrics.jsonl and rollouts.jsonl written again")
        waiting = sum(map(len, self._waiting.values()))
        self.error = f"{errors[0]} ({waiting} line(s) waiting)" if errors else None

    def close(self) -> None:
        for path, lines in self._waiting.items():
            if lines and _append(path, lines) is not None:
                log.error("%d line(s) of %s could not be written before the end", len(lines), path)


def _append(path: Path, lines: list[str]) -> str | None:
    """Append `lines` to `path` and empty the list; on an OSError keep them (the newest MAX_UNWRITTEN) and say why.
    Opened per write: a file moved or a directory made writable again is picked up at the next step."""
    if not lines:
        return None
    try:
        with path.open("ab") as f:
            start = f.tell()
            try:
                f.write("".join(lines).encode())
                f.flush()
            except OSError:
                with contextlib.suppress(OSError):
                    f.truncate(start)  # no half line: they are all written again next time
                raise
    except OSError as e:
        del lines[:-MAX_UNWRITTEN]
        return f"{path}: {type(e).__name__}: {e}"
    lines.clear()
    return None


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


class TensorBoardReporter:
    name, essential = "tensorboard", False

    def __init__(self, log_dir: Path) -> None:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise MissingExtra(
                "logging.report_to has tensorboard but tensorboardX is not installed: "
                "pip install 'paraloop[tensorboard]'"
            ) from None
        self._writer = SummaryWriter(logdir=str(log_dir), flush_secs=10)

    def log(self, row: dict[str, Any], samples: list[dict[str, Any]]) -> None:
        step = int(row["step"])
        for key, value in scalars(row).items():
            self._writer.add_scalar(key, value, step)
        if samples:
            lines = ["| " + " | ".join(SAMPLE_COLUMNS) + " |", "|" + "---|" * len(SAMPLE_COLUMNS)]
            for s in samples:
                cells = [
                    str(s["step"]),
                    str(s["group"]),
                    f"{s['reward']:.4g}",
                    f"{s['advantage']:+.4g}",
                    _markdown_cell(s["prompt"]),
                    _markdown_cell(completion_text(s)),
                ]
                lines.append("| " + " | ".join(cells) + " |")
            self._writer.add_text("rollouts", "\n".join(lines), step)

    def close(self) -> None:
        self._writer.close()


class WandbReporter:
    name, essential = "wandb", False

    def __init__(self, settings: Settings, run_dir: Path) -> None:
        try:
            import wandb
        except ImportError:
            raise MissingExtra(
                "logging.report_to has wandb but the wandb package is not installed: pip install 'paraloop[wandb]'"
            ) from None
        cfg = settings.logging
        id_file = run_dir / "wandb-run-id"  # a resumed run continues the same W&B run
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        self._wandb = wandb
        self._run = wandb.init(
            project=cfg.wandb_project,
            entity=cfg.wandb_entity,
            name=cfg.wandb_run_name or run_dir.resolve().name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            mode=cfg.wandb_mode,
            config=public_dump(settings),
            settings=wandb.Settings(console="off", quiet=True),
        )
        id_file.write_text(run_id + "\n")

    def log(self, row: dict[str, Any], samples: list[dict[str, Any]]) -> None:
        data: dict[str, Any] = scalars(row)
        if samples:
            table = self._wandb.Table(columns=list(SAMPLE_COLUMNS))
            for s in samples:
                table.add_data(s["step"], s["group"], s["reward"], s["advantage"], s["prompt"], completion_text(s))
            data["rollouts"] = table
        self._run.log(data, step=int(row["step"]))

    def close(self) -> None:
        self._run.finish()


def open_reporters(settings: Settings, run_dir: Path) -> list[Reporter]:
    """The reporters report_to names, opened in its order. Raises MissingExtra before opening anything when a
    package is missing."""
    wanted = list(dict.fromkeys(settings.logging.report_to))
    for name, module in (("tensorboard", "tensorboardX"), ("wandb", "wandb")):
        if name in wanted and importlib.util.find_spec(module) is None:
            raise MissingExtra(
                f"logging.report_to has {name} but {module} is not installed: pip install 'paraloop[{name}]'"
            )
    reporters: list[Reporter] = []
    try:
        for name in wanted:
            if name == "jsonl":
                reporters.append(JsonlReporter(run_dir))
            elif name == "tensorboard":
                reporters.append(TensorBoardReporter(run_dir / "tensorboard"))
            elif name == "wandb":
                reporters.append(WandbReporter(settings, run_dir))
    except BaseException:
        close_all(reporters)
        raise
    return reporters


def log_all(reporters: list[Reporter], row: dict[str, Any], samples: list[dict[str, Any]]) -> None:
    """Send one step to every reporter; a non-essential one that fails is dropped (with one warning)."""
    for reporter in list(reporters):
        try:
            reporter.log(row, samples)
        except Exception as e:
            if reporter.essential:
                raise
            log.warning(
                "%s logging failed at step %s, dropping it for the rest of the run: %s: %s",
                reporter.name,
                row.get("step"),
                type(e).__name__,
                e,
            )
            reporters.remove(reporter)
            try:
                reporter.close()
            except Exception:  # noqa: BLE001 - already failing; the warning above said so
                pass


def close_all(reporters: list[Reporter]) -> None:
    """Close every reporter once (they leave the list, so a second call closes nothing)."""
    while reporters:
        reporter = reporters.pop(0)
        try:
            reporter.close()
        except Exception as e:  # noqa: BLE001 - one logger failing to flush must not hide the others
            log.warning("closing %s logging failed: %s: %s", reporter.name, type(e).__name__, e)
