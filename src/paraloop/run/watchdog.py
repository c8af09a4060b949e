"""The watchdog: notices a part of the run that has work but makes no progress, and says so.

In: the run's status, read once per tick: the engine's counters and what it holds (rows decoding, requests waiting,
an adapter swap handed to it), when the learner's step began, when the checkpointer began a write. Out:
`status.stalled` (which /health answers 503 with and /control/status shows), one error line per stall with every
thread's stack and every asyncio task's, and a line when the part makes progress again.

What counts as stalled (thresholds in [watchdog]):
- engine: it has work and no decode step, finished request or applied swap for `engine_stall_s`. Idle is not
  stalled: the clock starts again whenever the engine has nothing to do.
- learner: one step's compute has run for `learner_stall_s` and `learner_stall_factor` times the slowest step so
  far (a step on a large model takes minutes, and slows down as rollouts grow). Waiting for a batch, for /control,
  or for a slow environment is never a stall.
- checkpointer: one write has run as long (the same rule against the slowest write so far).

With `stall_timeout` the watchdog ends the run once a part has made no progress for that long: `on_timeout(parts)`
(the runtime's: a final checkpoint when the learner can still take one), then RunStalled, which cancels the task
group (exit code 3). A stalled learner or checkpointer is a thread inside a call that will never return and can
never be joined: then `hard_exit` ends the process instead, after logging (the newest checkpoint on disk stands).
Returns only by cancellation or RunStalled.
"""

import asyncio
import io
import logging
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from paraloop.config import WatchdogConfig
from paraloop.run.status import RunStatus

log = logging.getLogger("paraloop.watchdog")

MAX_TICK_S = 1.0
WATCHED_PARTS = ("engine", "learner", "checkpointer")
STUCK_THREADS = ("learner", "checkpointer")  # parts that are a thread inside a shielded call


class RunStalled(RuntimeError):
    """A part made no progress for stall_timeout seconds; the run ends with exit code 3."""

    def __init__(self, parts: dict[str, str]) -> None:
        super().__init__("; ".join(f"{part} stalled: {why}" for part, why in parts.items()))
        self.parts = parts


def thread_stacks() -> str:
    """Every thread's stack and every asyncio task's (when called on the event loop), as one text."""
    frames = sys._current_frames()
    out = io.StringIO()
    for thread in threading.enumerate():
        out.write(f"--- thread {thread.name} ({'daemon, ' if thread.daemon else ''}ident {thread.ident})\n")
        frame = frames.get(thread.ident or -1)
        out.write("".join(traceback.format_stack(frame)) if frame is not None else "    (no frame)\n")
    try:
        tasks = asyncio.all_tasks()
    except RuntimeError:  # not on an event loop
        tasks = set()
    for task in sorted(tasks, key=lambda t: t.get_name()):
        out.write(f"--- asyncio task {task.get_name()}\n")
        out.write("".join(traceback.format_list(_await_chain(task.get_coro()))))
    return out.getvalue()


def _await_chain(coro: Any) -> list[traceback.FrameSummary]:
    """Where a suspended coroutine waits, outermost first: its frame, then the frame of what it awaits, and so
    on (Task.get_stack gives only the outermost one)."""
    summaries = []
    for _ in range(64):  # a bound on the chain, not expected to bind
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None) or getattr(coro, "ag_frame", None)
        if frame is None:
            break
        summaries.append(traceback.FrameSummary(frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name))
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None) or getattr(coro, "ag_await", None)
    return summaries


class Watchdog:
    """See the module docstring. `check()` is one tick (tests call it with their own clock)."""

    def __init__(
        self,
        status: RunStatus,
        config: WatchdogConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        dump: Callable[[], str] = thread_stacks,
    ) -> None:
        self.status = status
        self.config = config
        self.clock = clock
        self.dump = dump
        self._engine_signature: tuple[float, ...] | None = None
        self._engine_progress = clock()
        self._since: dict[str, float] = {}  # part -> its last progress (clock), while stalled

    @property
    def interval(self) -> float:
        """A quarter of the shortest threshold, at most a second: a stall is seen within a tick of its threshold."""
        limits = [t for t in (self.config.engine_stall_s, self.config.learner_stall_s) if t is not None]
        return max(0.01, min([MAX_TICK_S, *(t / 4 for t in limits)]))

    def check(self) -> dict[str, str]:
        """Look once; update status.stalled; return {part: why} of the parts stalled now."""
        now = self.clock()
        found: dict[str, tuple[float, str]] = {}  # part -> (last progress, why)
        engine = self._engine(now)
        if engine is not None:
            found["engine"] = engine
        limit = self.config.learner_stall_s
        if limit is not None:
            for part, since, slowest, what in (
                ("learner", self.status.learner_busy_since, self.status.slowest_step_s, "one learner step"),
                (
                    "checkpointer",
                    self.status.checkpoint_writing_since,
                    self.status.slowest_write_s,
                    "one checkpoint write",
                ),
            ):
                if since is not None and now - since > max(limit, self.config.learner_stall_factor * slowest):
                    found[part] = (
                        since,
                        f"{what} has run for {now - since:.0f} s (the slowest before took {slowest:.1f} s)",
                    )
        self._report(now, found)
        return {part: why for part, (_, why) in found.items()}

    def _engine(self, now: float) -> tuple[float, str] | None:
        limit = self.config.engine_stall_s
        stats = self.status.engine_stats() if self.status.engine_stats else {}
        signature = tuple(float(stats.get(k, 0.0)) for k in ("generated_tokens", "requests_served", "swaps"))
        work = []
        if stats.get("active_rows"):
            work.append(f"{int(stats['active_rows'])} rows decoding")
        if stats.get("waiting_requests"):
            work.append(f"{int(stats['waiting_requests'])} requests waiting")
        if self.status.swap_pending_since is not None:
            work.append(f"an adapter swap waiting for {now - self.status.swap_pending_since:.0f} s")
        if signature != self._engine_signature or not work:
            self._engine_signature, self._engine_progress = signature, now
            return None
        if limit is None or now - self._engine_progress <= limit:
            return None
        quiet = now - self._engine_progress
        return self._engine_progress, f"no decode step for {quiet:.0f} s while it has work: {', '.join(work)}"

    def _report(self, now: float, found: dict[str, tuple[float, str]]) -> None:
        wall = time.time() - now  # clock -> wall time
        new = [part for part in found if part not in self._since]
        for part in list(self._since):
            if part not in found:
                log.warning("%s is making progress again after %.0f s", part, now - self._since.pop(part))
        self._since.update({part: since for part, (since, _) in found.items()})
        self.status.stalled = {
            part: {"reason": why, "since": round(wall + since, 3), "for_s": round(now - since, 3)}
            for part, (since, why) in found.items()
        }
        if new:
            reasons = "; ".join(f"{part}: {found[part][1]}" for part in new)
            log.error("stalled: %s. Every thread's stack follows:\n%s", reasons, self.dump())

    def timed_out(self) -> dict[str, str]:
        """The stalled parts that have made no progress for stall_timeout or longer."""
        timeout = self.config.stall_timeout
        stalled = self.status.stalled
        if timeout is None:
            return {}
        return {part: info["reason"] for part, info in stalled.items() if info["for_s"] >= timeout}

    async def run(
        self,
        *,
        on_timeout: Callable[[dict[str, str]], Awaitable[Any]] | None = None,
        hard_exit: Callable[[int, str], Any] | None = None,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        task_status.started()
        while True:
            self.check()
            parts = self.timed_out()
            if parts:
                error = RunStalled(parts)
                log.error(
                    "no progress for stall_timeout (%.0f s): %s; ending the run", self.config.stall_timeout, error
                )
                stuck = [p for p in parts if p in STUCK_THREADS]
                if stuck and hard_exit is not None:
                    # That thread will never return from its call: the task group could not finish, nor the
                    # interpreter join it. No final checkpoint is possible mid-step; the newest on disk stands.
                    hard_exit(3, f"error: {error} (the {' and '.join(stuck)} thread cannot be stopped: exiting now)")
                if on_timeout is not None:
                    await on_timeout(parts)
                raise error
            await anyio.sleep(self.interval)
