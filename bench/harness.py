"""Shared pieces of the benchmarks: result lines, machine facts, model paths, child processes, memory readings.

A benchmark module exposes `NAME`, `TITLE`, `BUDGET_S` and `run(ctx: Context) -> list[Line]`. A Line is one ratio
measured side by side in the same run (paraloop vs a baseline), with an optional target on the ratio (or, for an
absolute target such as the swap pause, on paraloop's own number). Children (servers, `paraloop run`, CPU-path
probes) are started in their own process group through `Context.spawn` and all of them are killed at the end.
"""

import contextlib
import datetime as dt
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MODEL_Q4 = ROOT / "models" / "smollm2"
MODEL_F32 = ROOT / "models" / "smollm2-f32"
OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"


@dataclass
class Line:
    """One row of the table: `ours` over `baseline` (same unit), and whether its target is met."""

    bench: str
    name: str
    ours: float
    baseline: float | None
    unit: str
    target: str | None = None  # e.g. ">= 1.0" on the ratio, or "<= 1 ms" on `ours` (absolute)
    note: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.baseline == 0:
            return None
        return self.ours / self.baseline

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        op, number, *unit = self.target.split()
        value = self.ours if unit else self.ratio  # a target with a unit is absolute
        if value is None:
            return None
        limit = float(number) * UNIT_SCALE.get(unit[0], 1.0) / UNIT_SCALE.get(self.unit, 1.0) if unit else float(number)
        return value >= limit if op == ">=" else value <= limit

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "met": self.met}


UNIT_SCALE = {"s": 1.0, "ms": 1e-3, "us": 1e-6}  # absolute targets compare in seconds


def fmt_number(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit in UNIT_SCALE:  # durations: show in the unit the line uses
        return f"{value:.3g} {unit}"
    if abs(value) >= 100:
        return f"{value:,.0f} {unit}".strip()
    return f"{value:.3g} {unit}".strip()


def table(lines: list[Line]) -> str:
    """A Markdown table of the lines (also readable as plain text)."""
    rows = [
        "| benchmark | measure | paraloop | baseline | ratio | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for line in lines:
        ratio = "-" if line.ratio is None else f"{line.ratio:.2f}x" if line.ratio >= 0.1 else f"{line.ratio:.2g}x"
        met = {True: "yes", False: "**no**", None: ""}[line.met]
        rows.append(
            f"| {line.bench} | {line.name} | {fmt_number(line.ours, line.unit)} | "
            f"{fmt_number(line.baseline, line.unit)} | {ratio} | {line.target or ''} | {met} |"
        )
    return "\n".join(rows)


# --- machine facts -----------------------------------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                return text.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def blas_kernel() -> str:
    """The OpenBLAS kernel this CPU runs (openblas_get_corename: Zen, Haswell, SkylakeX, Cooperlake, ...; set by
    OPENBLAS_CORETYPE when given), or '-' without OpenBLAS. Timings of the matmul-bound lines depend on it."""
    import paraloop  # noqa: F401  (the preload)
    from paraloop.blas import openblas_path

    path = openblas_path()
    if path is None:
        return "-"
    try:
        import ctypes

        lib = ctypes.CDLL(path)
        lib.openblas_get_corename.restype = ctypes.c_char_p
        return lib.openblas_get_corename().decode()
    except (OSError, AttributeError):
        return "?"


def blas_in_use() -> str:
    """Which BLAS MLX's matmuls call in this process (paraloop preloads OpenBLAS on Linux)."""
    import paraloop  # noqa: F401  (the preload)
    from paraloop.blas import openblas_path

    path = openblas_path()
    if path is None:
        return "MLX's bundled BLAS" if sys.platform == "linux" else "Accelerate" if sys.platform == "darwin" else "?"
    try:
        import ctypes

        lib = ctypes.CDLL(path)
        lib.openblas_get_config.restype = ctypes.c_char_p
        return f"OpenBLAS ({lib.openblas_get_config().decode()}) from {path}"
    except (OSError, AttributeError):
        return f"OpenBLAS from {path}"


def version_of(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "os": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": platform.python_version(),
        "mlx": version_of("mlx"),
        "mlx_lm": version_of("mlx-lm"),
        "paraloop": version_of("paraloop"),
        "blas": blas_in_use(),
        "blas_kernel": blas_kernel(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


# --- models ------------------------------------------------------------------------------------------------------


def ensure_models() -> tuple[Path, Path]:
    """The 4-bit SmolLM2 (built by `make bench`) and its float32 copy (built here when missing)."""
    if not (MODEL_Q4 / "config.json").is_file():
        run_checked([sys.executable, "-m", "paraloop", "model", "smollm2", str(MODEL_Q4)])
    if not (MODEL_F32 / "config.json").is_file():
        run_checked([sys.executable, "-m", "paraloop", "model", "smollm2", str(MODEL_F32), "--dequantize"])
    return MODEL_Q4, MODEL_F32


def run_checked(cmd: list[str], *, timeout_s: float = 1800.0, **kwargs: Any) -> subprocess.CompletedProcess:
    """Run to completion in its own process group, which is killed if we time out or are interrupted."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    finally:
        kill_group(proc, grace_s=5)
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


# --- child processes ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-chars:]
        return ""


def kill_group(proc: subprocess.Popen, *, grace_s: float = 10.0) -> None:
    """SIGTERM the child's process group, then SIGKILL what is left after `grace_s`."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers in the group, even when the leader has exited
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def peak_rss_bytes(pid: int) -> int | None:
    """The process's peak resident set (VmHWM) while it runs (Linux)."""
    with contextlib.suppress(OSError):
        for text in Path(f"/proc/{pid}/status").read_text().splitlines():
            if text.startswith("VmHWM:"):
                return int(text.split()[1]) * 1024
    return None


def self_peak_rss_bytes() -> int:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


class Context:
    """What every benchmark gets: the models, a quick flag, a place for logs, and spawn() for children."""

    def __init__(self, *, quick: bool, log_dir: Path) -> None:
        self.quick = quick
        self.log_dir = log_dir
        self.children: list[Child] = []
        self.shared: dict[str, Any] = {}  # results one benchmark leaves for another (e.g. idle engine tokens/s)
        self.model_q4, self.model_f32 = ensure_models()

    def spawn(self, name: str, cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path = ROOT) -> Child:
        log = self.log_dir / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    def stop(self, child: Child) -> None:
        kill_group(child.proc)
        if child in self.children:
            self.children.remove(child)

    def stop_all(self) -> None:
        for child in list(self.children):
            self.stop(child)


def python_cmd(*args: str) -> list[str]:
    return [sys.executable, *args]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def wait_until(predicate: Any, *, timeout_s: float, interval_s: float = 0.25, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)
