"""The /control REST API and the Prometheus /metrics page of `paraloop run`.

GET  /control/status    step, versions, paused, queue depths, last metrics, tokens/s, swap pauses
POST /control/pause     the learner stops taking batches (HTTP generation goes on)
POST /control/resume
POST /control/step      while paused: exactly one learner step; answers its metrics
POST /control/snapshot  checkpoint now; answers its path
POST /control/stop      finish the step in flight, write a final checkpoint, exit 0
GET  /metrics           Prometheus text format

The bearer token (server.control_token) is enforced by the app's gate middleware for every route but /health.
"""

from typing import Any

import msgspec
from aiohttp import web

from paraloop.actors.learner import ControlError, LearnerControl
from paraloop.server.errors import APIError
from paraloop.state import RunState


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=msgspec.json.encode(payload), content_type="application/json")


def control_routes(state: RunState, control: LearnerControl) -> list[web.RouteDef]:
    async def status(request: web.Request) -> web.Response:
        return _json(state.snapshot())

    async def pause(request: web.Request) -> web.Response:
        control.pause()
        return _json({"paused": True, "step": state.step})

    async def resume(request: web.Request) -> web.Response:
        control.resume()
        return _json({"paused": False, "step": state.step})

    async def step(request: web.Request) -> web.Response:
        try:
            done = await control.step_once()
        except ControlError as e:
            raise APIError(409, str(e), code="conflict") from None
        return _json({"step": done.step, "adapter_version": done.version, "skipped": done.skipped,
                      "metrics": done.metrics})

    async def snapshot(request: web.Request) -> web.Response:
        if control.snapshot is None or state.stopping:
            raise APIError(409, "the learner is not running", code="conflict")
        written = await control.snapshot()
        if written is None:
            raise APIError(409, "the run is shutting down; the final checkpoint is being written", code="conflict")
        return _json({"step": written.step, "path": written.path})

    async def stop(request: web.Request) -> web.Response:
        control.stop()
        return _json({"stopping": True, "step": state.step})

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=prometheus_text(state), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    return [
        web.get("/control/status", status, allow_head=False),
        web.post("/control/pause", pause),
        web.post("/control/resume", resume),
        web.post("/control/step", step),
        web.post("/control/snapshot", snapshot),
        web.post("/control/stop", stop),
        web.get("/metrics", metrics, allow_head=False),
    ]


def prometheus_text(state: RunState) -> str:
    """Gauges in the Prometheus exposition format (version 0.0.4)."""
    snap = state.snapshot()
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
