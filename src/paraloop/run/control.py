"""/control: the learner's control state machine and the REST routes that drive it, plus Prometheus /metrics.

GET  /control/status    step, versions, paused, queue depths, last metrics, tokens/s, swap pauses
POST /control/pause     the learner stops taking batches (HTTP generation goes on)
POST /control/resume
POST /control/step      while paused: exactly one learner step; answers its metrics (?timeout=S, default 600:
                        504 when no rollout batch came in time, 409 when the run stops first)
POST /control/snapshot  checkpoint now; answers its path
POST /control/stop      finish the step in flight, write a final checkpoint, exit 0
GET  /metrics           Prometheus text format

`LearnerControl` is the state machine: the routes and the signal handler change it, the learner waits on it between
steps. The bearer token (server.control_token) is enforced by the app's gate middleware for every route but /health.
"""

import math
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import msgspec
from aiohttp import web
from anyio.abc import ObjectSendStream

from paraloop.messages import StepFinished
from paraloop.run.status import RunStatus
from paraloop.run.watchdog import WATCHED_PARTS
from paraloop.server.errors import APIError

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
        self._finished = False
        self.snapshot: Callable[[], Any] | None = None  # set by the learner: async () -> CheckpointWritten

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def pause(self) -> None:
        self.status.paused = True
        self._notify()

    def resume(self) -> None:
        self.status.paused = False
        self._notify()

    def stop(self) -> None:
        """Finish the step in flight, write a final checkpoint, end the run. Single-step requests that no step will
        answer end now (409); one whose step is being computed gets that step."""
        self.status.stopping = True
        if self._receive_scope is not None and not self.status.learner_busy:
            self._receive_scope.cancel()
        while self._pending:
            self._pending.popleft().close()
        if self._granted is not None and not self.status.learner_busy:
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
                if send in self._pending or (self._granted is send and not self.status.learner_busy):
                    self._withdraw(send)
                    raise StepTimeout(f"no rollout batch arrived within {timeout:g} s: no step was taken "
                                      "(see /control/status: source, queues)")
                return await receive.receive()  # the learner is computing this step: its result comes
            except anyio.EndOfStream:
                raise ControlError("the run is stopping: no step was taken") from None

    def _withdraw(self, send: ObjectSendStream[StepFinished]) -> None:
        if send in self._pending:
            self._pending.remove(send)
        if self._granted is send:
            self._granted = None
        send.close()

    async def wait_turn(self) -> bool:
        """Return True when the learner may take its next step, False when the run is stopping."""
        while True:
            if self.status.stopping:
                return False
            if self._granted is None and self._pending:
                self._granted = self._pending.popleft()  # the next step answers this request
            if not self.status.paused or self._granted is not None:
                return True
            await self._changed.wait()

    def step_done(self, done: StepFinished) -> None:
        """A step finished: it answers the single-step request it was granted to, if any."""
        granted, self._granted = self._granted, None
        if granted is not None:
            granted.send_nowait(done)
            granted.close()

    def finished(self) -> None:
        """The learner has returned: a /control/step still waiting is answered 409, none is accepted after."""
        self._finished = True
        while self._pending:
            self._pending.popleft().close()
        if self._granted is not None:
            self._granted.close()
            self._granted = None


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=msgspec.json.encode(payload), content_type="application/json")


def step_timeout(raw: str | None) -> float:
    """The `timeout` query parameter of POST /control/step: seconds, 0 < t <= 86400 (400 naming it otherwise)."""
    if raw is None:
        return STEP_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_STEP_TIMEOUT_S:  # NaN fails too
        raise APIError(400, f"timeout: expected seconds in (0, {MAX_STEP_TIMEOUT_S:g}], got {raw[:40]!r}",
                       param="timeout", code="invalid_value")
    return value


def control_routes(status: RunStatus, control: LearnerControl) -> list[web.RouteDef]:
    async def get_status(request: web.Request) -> web.Response:
        return _json(status.snapshot())

    async def pause(request: web.Request) -> web.Response:
        control.pause()
        return _json({"paused": True, "step": status.step})

    async def resume(request: web.Request) -> web.Response:
        control.resume()
        return _json({"paused": False, "step": status.step})

    async def step(request: web.Request) -> web.Response:
        timeout = step_timeout(request.query.get("timeout"))
        try:
            done = await control.step_once(timeout)
        except ControlError as e:
            raise APIError(409, str(e), code="conflict") from None
        except StepTimeout as e:
            raise APIError(504, str(e), param="timeout", code="step_timeout") from None
        return _json({"step": done.step, "adapter_version": done.version, "skipped": done.skipped,
                      "metrics": done.metrics})

    async def snapshot(request: web.Request) -> web.Response:
        if control.snapshot is None or status.stopping:
            raise APIError(409, "the learner is not running", code="conflict")
        written = await control.snapshot()
        if written is None:
            raise APIError(409, "the run is shutting down; the final checkpoint is being written", code="conflict")
        if written.error is not None:
            raise APIError(503, f"checkpoint step {written.step} could not be written ({written.error}); the "
                           "checkpointer retries it", code="checkpoint_failed")
        return _json({"step": written.step, "path": written.path})

    async def stop(request: web.Request) -> web.Response:
        control.stop()
        return _json({"stopping": True, "step": status.step})

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=prometheus_text(status), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    return [
        web.get("/control/status", get_status, allow_head=False),
        web.post("/control/pause", pause),
        web.post("/control/resume", resume),
        web.post("/control/step", step),
        web.post("/control/snapshot", snapshot),
        web.post("/control/stop", stop),
        web.get("/metrics", metrics, allow_head=False),
    ]


def prometheus_text(status: RunStatus) -> str:
    """Gauges in the Prometheus exposition format (version 0.0.4)."""
    snap = status.snapshot()
    lines: list[str] = []
    described: set[str] = set()

    def gauge(name: str, value: Any, help_: str, labels: str = "") -> None:
        if value is None:
            return
        if name not in described:
            described.add(name)
            lines.append(f"# HELP paraloop_{name} {help_}")
            lines.append(f"# TYPE paraloop_{name} gauge")
        lines.append(f"paraloop_{name}{labels} {float(value)}")

    gauge("step", snap["step"], "learner steps done")
    gauge("adapter_version", snap["adapter_version"], "newest adapter version")
    gauge("serving_version", snap["serving_version"], "adapter version the engine serves")
    gauge("paused", int(snap["paused"]), "1 while /control/pause holds the learner")
    gauge("skipped_steps", snap["skipped_steps"], "steps skipped for a non-finite loss or gradient")
    gauge("dropped_stale", snap["dropped_stale"], "rollout groups dropped as too stale")
    gauge("rejected_groups", snap["rejected_groups"], "malformed rollout groups rejected")
    gauge("tokens_per_s", snap["tokens_per_s"], "engine decode tokens per second")
    gauge("swap_pause_ms", snap["swap_pause_ms"]["last"], "decode pause of the last adapter swap")
    for part in WATCHED_PARTS:
        gauge("stalled", int(part in snap["stalled"]), "1 while the watchdog sees this part stalled",
              f'{{part="{part}"}}')
    gauge("checkpoint_failures", (snap["checkpoint_error"] or {}).get("failures", 0),
          "failed attempts of the checkpoint being retried (0: none failing)")
    for name, depth in snap["queues"].items():
        gauge("queue_depth", depth, "messages waiting in an actor inbox", f'{{queue="{name}"}}')
    for key, value in snap["last_metrics"].items():
        if isinstance(value, (int, float)):
            gauge("metric", value, "last learner step metrics", f'{{name="{key}"}}')
    for key, value in snap["engine"].items():
        if isinstance(value, (int, float)):
            gauge("engine", value, "engine statistics", f'{{name="{key}"}}')
    return "\n".join(lines) + "\n"
