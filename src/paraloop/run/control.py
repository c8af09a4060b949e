"""/control: the learner's control state machine and the REST routes that drive it, and the run's Prometheus gauges.

GET  /control/status    step, versions, paused, queue depths, last metrics, tokens/s, swap pauses
POST /control/pause     the learner stops taking batches (HTTP generation goes on)
POST /control/resume
POST /control/step      while paused: exactly one learner step; answers its metrics (?timeout=S, default 600:
                        504 when no rollout batch came in time, 409 when the run stops first)
POST /control/snapshot  checkpoint now; answers its path
POST /control/stop      finish the step in flight, write a final checkpoint, exit 0

`run_families(status)` is the run's part of Prometheus GET /metrics (server/metrics.py serves it).
`LearnerControl` is the state machine: the routes and the signal handler change it, the learner waits on it between
steps. The bearer token (server.control_token) is enforced by the app's gate middleware for every route but /health.
"""

import math
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
from aiohttp import web
from anyio.abc import ObjectSendStream
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from paraloop.messages import StepFinished
from paraloop.run.status import RunStatus
from paraloop.run.watchdog import WATCHED_PARTS
from paraloop.server.errors import APIError
from paraloop.server.responses import json_response

STEP_TIMEOUT_S = 600.0  # default wait of POST /control/step for its step (a rollout batch has to come first)
MAX_STEP_TIMEOUT_S = 86400.0


class ControlError(RuntimeError):
    """A /control request that does not fit the run's state (answered 409)."""


class StepTimeout(RuntimeError):
    """No step could be taken in time for POST /control/step (answered 504); nothing was changed."""


class LearnerControl:
    """Pause / resume / single-step / stop, shared by /control and the signal handler."""

    def __init__(self, status: RunStatus) -> None:
        self.status = status
        self._changed = anyio.Event()
        # POST /control/step requests: each waits for one step. `_pending` have not been granted yet; `_granted` is
        # the one the learner's next step answers (it stays granted until a step is done, e.g. across a batch that
        # was all stale).
        self._pending: deque[ObjectSendStream[StepFinished]] = deque()
        self._granted: ObjectSendStream[StepFinished] | None = None
        self._receive_scope: anyio.CancelScope | None = None
        self._decided = False  # the learner has taken its turn: a step is being decided, gathered or computed
        self._finished = False
        # A distributed run decides steps at ticks (run/ranks.py), where a tick already under way when a pause
        # comes may still decide a step: the coordinator then sets status.learner_held itself, after each tick.
        self.at_ticks = False
        self.snapshot: Callable[[], Any] | None = None  # set by the learner: async () -> CheckpointWritten

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def _settle(self) -> None:
        """status.learner_held: the pause has taken hold, no step is decided or computing and none will start
        before /control/resume or /control/step."""
        if not self.at_ticks:
            self.status.learner_held = self.status.paused and not self._decided

    def pause(self) -> None:
        self.status.paused = True
        self._settle()
        self._notify()

    def resume(self) -> None:
        self.status.paused = False
        self._settle()
        self._notify()

    def stop(self) -> None:
        """Finish the step in flight, write a final checkpoint, end the run. Single-step requests that no step will
        answer end now (409); one whose step is being computed gets that step."""
        self.status.stopping = True
        if self._receive_scope is not None and not self.status.learner_busy:
            self._receive_scope.cancel()
        while self._pending:
            self._pending.popleft().close()
        if self._granted is not None and not self._decided:
            self._granted.close()
            self._granted = None
        self._notify()

    @contextmanager
    def receiving(self) -> Iterator[anyio.CancelScope]:
        """The learner waits for its next batch inside this scope: a stop cancels the wait (never a step)."""
        with anyio.CancelScope() as scope:
            self._receive_scope = scope
            if self.status.stopping:
                scope.cancel()
            try:
                yield scope
            finally:
                self._receive_scope = None

    async def step_once(self, timeout: float = STEP_TIMEOUT_S) -> StepFinished:  # noqa: ASYNC109 - a request's own bound
        """While paused: run exactly one learner step and return its result.

        The step needs a rollout batch: when none comes within `timeout` seconds the request is withdrawn (no step
        is taken later on its behalf) and StepTimeout is raised. A step already being computed is waited for."""
        if not self.status.paused:
            raise ControlError("the run is not paused: POST /control/pause first")
        if self.status.stopping or self._finished:
            raise ControlError("the run is stopping")
        send, receive = anyio.create_memory_object_stream[StepFinished](1)
        self._pending.append(send)
        self._notify()
        async with receive:
            try:
                with anyio.move_on_after(timeout):
                    return await receive.receive()
                if send in self._pending or (self._granted is send and not self._decided):
                    self._withdraw(send)
                    raise StepTimeout(
                        f"no rollout batch arrived within {timeout:g} s: no step was taken "
                        "(see /control/status: source, queues)"
                    )
                return await receive.receive()  # the learner took this step: its result comes
            except anyio.EndOfStream:
                raise ControlError("the run is stopping: no step was taken") from None

    def _withdraw(self, send: ObjectSendStream[StepFinished]) -> None:
        if send in self._pending:
            self._pending.remove(send)
        if self._granted is send:
            self._granted = None
        send.close()

    # --- for the step boundary of a distributed run (run/ranks.py), which cannot block in wait_turn ---------------

    def may_step(self) -> bool:
        """Whether the learner may take a step now: not paused, or a single-step request waits (as wait_turn)."""
        return not self.status.stopping and (not self.status.paused or self._granted is not None or bool(self._pending))

    def take_turn(self) -> None:
        """The learner takes a step now: the next single-step request waiting is the one it answers, and from
        here on the step is not withdrawn (a timeout or a stop waits for its result)."""
        if self._granted is None and self._pending:
            self._granted = self._pending.popleft()
        self._decided = True
        self._settle()

    async def changed(self) -> None:
        """Return at the next pause, resume, step, stop or `wake`."""
        await self._changed.wait()

    def wake(self) -> None:
        self._notify()

    async def wait_turn(self) -> bool:
        """Return True when the learner may take its next step, False when the run is stopping."""
        while True:
            if self.status.stopping:
                return False
            if not self.status.paused or self._granted is not None or self._pending:
                self.take_turn()
                return True
            await self._changed.wait()

    def step_done(self, done: StepFinished) -> None:
        """A step finished: it answers the single-step request it was granted to, if any."""
        granted, self._granted = self._granted, None
        self._decided = False
        self._settle()
        if granted is not None:
            granted.send_nowait(done)
            granted.close()

    def no_step(self) -> None:
        """The turn trained nothing (every group of the batch was too stale): a granted single-step request waits
        for the next batch, and may time out again."""
        self._decided = False
        self._settle()

    def finished(self) -> None:
        """The learner has returned: a /control/step still waiting is answered 409, none is accepted after."""
        self._finished = True
        self._decided = False
        while self._pending:
            self._pending.popleft().close()
        if self._granted is not None:
            self._granted.close()
            self._granted = None


def step_timeout(raw: str | None) -> float:
    """The `timeout` query parameter of POST /control/step: seconds, 0 < t <= 86400 (400 naming it otherwise)."""
    if raw is None:
        return STEP_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_STEP_TIMEOUT_S:  # NaN fails too
        raise APIError(
            400,
            f"timeout: expected seconds in (0, {MAX_STEP_TIMEOUT_S:g}], got {raw[:40]!r}",
            param="timeout",
            code="invalid_value",
        )
    return value


def control_routes(status: RunStatus, control: LearnerControl) -> list[web.RouteDef]:
    async def get_status(request: web.Request) -> web.Response:
        return json_response(status.snapshot())

    async def pause(request: web.Request) -> web.Response:
        control.pause()
        return json_response({"paused": True, "step": status.step})

    async def resume(request: web.Request) -> web.Response:
        control.resume()
        return json_response({"paused": False, "step": status.step})

    async def step(request: web.Request) -> web.Response:
        timeout = step_timeout(request.query.get("timeout"))
        try:
            done = await control.step_once(timeout)
        except ControlError as e:
            raise APIError(409, str(e), code="conflict") from None
        except StepTimeout as e:
            raise APIError(504, str(e), param="timeout", code="step_timeout") from None
        return json_response(
            {"step": done.step, "adapter_version": done.version, "skipped": done.skipped, "metrics": done.metrics}
        )

    async def snapshot(request: web.Request) -> web.Response:
        if control.snapshot is None or status.stopping:
            raise APIError(409, "the learner is not running", code="conflict")
        written = await control.snapshot()
        if written is None:
            raise APIError(409, "the run is shutting down; the final checkpoint is being written", code="conflict")
        if written.error is not None:
            raise APIError(
                503,
                f"checkpoint step {written.step} could not be written ({written.error}); the checkpointer retries it",
                code="checkpoint_failed",
            )
        return json_response({"step": written.step, "path": written.path})

    async def stop(request: web.Request) -> web.Response:
        control.stop()
        return json_response({"stopping": True, "step": status.step})

    return [
        web.get("/control/status", get_status, allow_head=False),
        web.post("/control/pause", pause),
        web.post("/control/resume", resume),
        web.post("/control/step", step),
        web.post("/control/snapshot", snapshot),
        web.post("/control/stop", stop),
    ]


def run_families(status: RunStatus) -> Iterator[Metric]:
    """The run's state for Prometheus (read at scrape time; the app's collector calls it)."""
    snap = status.snapshot()
    gauges = {
        "step": ("paraloop_step", "learner steps done"),
        "total_steps": ("paraloop_total_steps", "learner steps the run will take"),
        "adapter_version": ("paraloop_adapter_version", "newest adapter version"),
    }
    for key, (name, help_) in gauges.items():
        yield GaugeMetricFamily(name, help_, value=snap[key])
    yield GaugeMetricFamily("paraloop_paused", "1 while /control/pause holds the learner", value=int(snap["paused"]))
    counters = {
        "skipped_steps": ("paraloop_skipped_steps", "steps skipped for a non-finite loss or gradient"),
        "dropped_stale": ("paraloop_dropped_stale", "rollout groups dropped as too stale"),
        "rejected_groups": ("paraloop_rejected_groups", "malformed rollout groups rejected"),
    }
    for key, (name, help_) in counters.items():
        yield CounterMetricFamily(name, help_, value=snap[key])
    queues = GaugeMetricFamily("paraloop_queue_depth", "messages waiting in an actor inbox", labels=["queue"])
    stalled = GaugeMetricFamily("paraloop_stalled", "1 while the watchdog sees this part stalled", labels=["part"])
    for part in WATCHED_PARTS:
        stalled.add_metric([part], int(part in snap["stalled"]))
    yield stalled
    yield GaugeMetricFamily(
        "paraloop_checkpoint_failures",
        "failed attempts of the checkpoint being retried (0: none failing)",
        value=(snap["checkpoint_error"] or {}).get("failures", 0),
    )
    for name, depth in snap["queues"].items():
        queues.add_metric([name], depth)
    yield queues
    last = GaugeMetricFamily("paraloop_metric", "the last learner step's metrics", labels=["name"])
    for key, value in snap["last_metrics"].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            last.add_metric([key], value)
    yield last
    evaluation = GaugeMetricFamily("paraloop_eval", "the last held-out evaluation", labels=["name"])
    for key, value in snap["eval"].get("last", {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            evaluation.add_metric([key], value)
    yield evaluation
    alerts = GaugeMetricFamily(
        "paraloop_alert", "1 while something needs attention (see /control/status alerts)", labels=["topic"]
    )
    for topic in snap["alerts"]:
        alerts.add_metric([topic], 1)
    yield alerts
    if snap["source"].get("source") == "sessions":  # agent sessions (run/agent_sessions.py): what waits, dropped
        sessions = GaugeMetricFamily("paraloop_agent_sessions", "agent sessions' numbers", labels=["name"])
        for key, value in snap["source"].items():
            if isinstance(value, int):
                sessions.add_metric([key], value)
        yield sessions
