"""/control: the learner's control state machine and the REST routes that drive it, plus Prometheus /metrics.

GET  /control/status    step, versions, paused, queue depths, last metrics, tokens/s, swap pauses
POST /control/pause     the learner stops taking batches (HTTP generation goes on)
POST /control/resume
POST /control/step      while paused: exactly one learner step; answers its metrics
POST /control/snapshot  checkpoint now; answers its path
POST /control/stop      finish the step in flight, write a final checkpoint, exit 0
GET  /metrics           Prometheus text format

`LearnerControl` is the state machine: the routes and the signal handler change it, the learner waits on it between
steps. The bearer token (server.control_token) is enforced by the app's gate middleware for every route but /health.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import msgspec
from aiohttp import web
from anyio.abc import ObjectSendStream

from paraloop.messages import StepFinished
from paraloop.run.status import RunStatus
from paraloop.server.errors import APIError


class ControlError(RuntimeError):
    """A /control request that does not fit the run's state (answered 409)."""


class LearnerControl:
    """Pause / resume / single-step / stop, shared by /control and the signal handler."""

    def __init__(self, status: RunStatus) -> None:
        self.status = status
        self._changed = anyio.Event()
        self._permits = 0
        self._step_waiters: list[ObjectSendStream[StepFinished]] = []
        self._receive_scope: anyio.CancelScope | None = None
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
        """Finish the step in flight, write a final checkpoint, end the run."""
        self.status.stopping = True
        if self._receive_scope is not None and not self.status.learner_busy:
            self._receive_scope.cancel()
        self._notify()

    @contextmanager
    def receiving(self) -> Iterator[anyio.CancelScope]:
        """The learner waits for its next batch inside this scope: a stop cancels the wait (never a step)."""
        with anyio.CancelScope() as scope:
            self._receive_scope = scope
            try:
                yield scope
            finally:
                self._receive_scope = None

    async def step_once(self) -> StepFinished:
        """While paused: run exactly one learner step and return its result."""
        if not self.status.paused:
            raise ControlError("the run is not paused: POST /control/pause first")
        if self.status.stopping:
            raise ControlError("the run is stopping")
        send, receive = anyio.create_memory_object_stream[StepFinished](1)
        self._step_waiters.append(send)
        self._permits += 1
        self._notify()
        async with receive:
            return await receive.receive()

    async def wait_turn(self) -> bool:
        """Return True when the learner may take its next step, False when the run is stopping."""
        while True:
            if self.status.stopping:
                return False
            if not self.status.paused:
                return True
            if self._permits:
                self._permits -= 1
                return True
            await self._changed.wait()

    def step_done(self, done: StepFinished) -> None:
        waiters, self._step_waiters = self._step_waiters, []
        for send in waiters:
            send.send_nowait(done)
            send.close()


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=msgspec.json.encode(payload), content_type="application/json")


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
        try:
            done = await control.step_once()
        except ControlError as e:
            raise APIError(409, str(e), code="conflict") from None
        return _json({"step": done.step, "adapter_version": done.version, "skipped": done.skipped,
                      "metrics": done.metrics})

    async def snapshot(request: web.Request) -> web.Response:
        if control.snapshot is None or status.stopping:
            raise APIError(409, "the learner is not running", code="conflict")
        written = await control.snapshot()
        if written is None:
            raise APIError(409, "the run is shutting down; the final checkpoint is being written", code="conflict")
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
    for name, depth in snap["queues"].items():
        gauge("queue_depth", depth, "messages waiting in an actor inbox", f'{{queue="{name}"}}')
    for key, value in snap["last_metrics"].items():
        if isinstance(value, (int, float)):
            gauge("metric", value, "last learner step metrics", f'{{name="{key}"}}')
    for key, value in snap["engine"].items():
        if isinstance(value, (int, float)):
            gauge("engine", value, "engine statistics", f'{{name="{key}"}}')
    return "\n".join(lines) + "\n"
