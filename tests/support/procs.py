"""Child processes for tests: each starts its own process group and dies with everything it started.

A test that starts a process owns it: when the test ends, fails or times out (pytest-timeout raises in the test's
thread, so `finally` blocks run), the child's whole process group gets SIGTERM, then SIGKILL after a grace. Output
is read by a thread into a queue, so no read loop ever spins on a pipe at EOF or blocks a deadline.
"""

import contextlib
import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

GRACE_S = 5.0


def spawn(cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen:
    """Popen in a new session: the child's pid is its process group id, so `kill_group` reaches its children."""
    return subprocess.Popen(list(cmd), start_new_session=True, **kwargs)


def kill_group(proc: subprocess.Popen, *, grace_s: float = GRACE_S) -> None:
    """SIGTERM the child's process group, SIGKILL whatever is left after `grace_s` (stragglers too, when the
    leader has already exited), then reap the leader."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def kill_groups(pids: Sequence[int]) -> None:
    """SIGKILL the process groups led by `pids` (children a launcher started in sessions of their own)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def gone_soon(pid: int, *, within: float = 15.0) -> bool:
    """Whether `pid` is gone (or a zombie) within `within` seconds."""
    deadline = time.monotonic() + within
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


@contextlib.contextmanager
def running(cmd: Sequence[str], *, grace_s: float = GRACE_S, **kwargs: Any) -> Iterator[subprocess.Popen]:
    """A child for the duration of the block; its process group is killed on the way out, however it is left."""
    proc = spawn(cmd, **kwargs)
    try:
        yield proc
    finally:
        kill_group(proc, grace_s=grace_s)


def run(cmd: Sequence[str], *, timeout: float, **kwargs: Any) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True) whose whole process group dies on a timeout or an error.
    A timeout fails the test (AssertionError with the end of stderr)."""
    with running(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs) as proc:
        out, err = communicate(proc, timeout=timeout)
        return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)


def communicate(proc: subprocess.Popen, *, timeout: float) -> tuple[Any, Any]:
    """proc.communicate(timeout); on a timeout its process group is killed and the test fails (AssertionError with
    the end of stderr)."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        _, err = proc.communicate()
        cmd = proc.args if isinstance(proc.args, str) else " ".join(map(str, proc.args))
        raise AssertionError(f"{cmd} did not finish in {timeout} s:\n{(err or '')[-3000:]}") from None


class Lines:
    """The lines of a text pipe, read by a daemon thread; `expect` waits for a line with a deadline and fails
    (never spins) when the pipe reaches EOF first."""

    def __init__(self, pipe: Any) -> None:
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._pump, args=(pipe,), daemon=True)
        self._thread.start()

    def _pump(self, pipe: Any) -> None:
        with contextlib.suppress(ValueError, OSError):  # the pipe closed under us: the test is over
            for line in pipe:
                with self._lock:
                    self.seen.append(line)
                self._queue.put(line)
        self._queue.put(None)

    def text(self) -> str:
        with self._lock:
            return "".join(self.seen)

    def all(self, *, timeout: float = 30.0) -> str:
        """Everything, once the pipe reached EOF (the process and its children closed it) or `timeout` passed."""
        self._thread.join(timeout)
        return self.text()

    def expect(self, pattern: str, *, timeout: float) -> re.Match:
        """The first match of `pattern` in a line not yet consumed; AssertionError at EOF or past the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self._queue.get(timeout=max(left, 0.0))
            except queue.Empty:
                raise AssertionError(
                    f"no line matching {pattern!r} within {timeout} s:\n{self.text()[-3000:]}"
                ) from None
            if line is None:
                self._queue.put(None)  # later calls see EOF too
                raise AssertionError(
                    f"the process closed its output before a line matching {pattern!r}:\n{self.text()[-3000:]}"
                )
            if m := re.search(pattern, line):
                return m
