"""A real paraloop HTTP server for tests: the tiny model, the real Engine, aiohttp on 127.0.0.1 port 0.

The engine and the server run in a background event loop (an anyio blocking portal), so tests are plain
synchronous functions using ordinary clients (the official `openai` client, httpx, raw sockets). `assert_error` checks
an error reply has the OpenAI shape and names the field; `assert_still_serving` that the server answers after it.
"""

import http.client
import json
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from aiohttp import web
from anyio.from_thread import BlockingPortal, start_blocking_portal

from paraloop.config import Settings, load_config
from paraloop.engine import Engine
from paraloop.lora import AdapterSlots, adapter_config, attach_lora
from paraloop.model import load_model
from paraloop.server import make_app, serve_http


@dataclass
class Reply:
    status_code: int
    headers: dict[str, str]
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode()

    def json(self) -> Any:
        return json.loads(self.content)


@dataclass
class Server:
    url: str
    port: int
    engine: Engine
    model: Any  # the engine's model (LoRA attached when `lora=True`)
    app: web.Application
    settings: Settings
    portal: BlockingPortal

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> "Reply":
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
            resp = conn.getresponse()
            return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def post(
        self, path: str, body: Any = None, *, raw: bytes | None = None, headers: dict[str, str] | None = None
    ) -> "Reply":
        return self.request("POST", path, json.dumps(body).encode() if raw is None else raw, headers)

    def get(self, path: str, *, headers: dict[str, str] | None = None) -> "Reply":
        return self.request("GET", path, None, headers)

    def wait_idle(self, *, deadline_s: float = 30.0) -> dict[str, float]:
        """Engine stats once it holds no request (or the last stats at the deadline)."""
        end = time.monotonic() + deadline_s
        while True:
            stats = self.engine.stats()
            if (stats["active_rows"] == 0 and stats["queue_depth"] == 0) or time.monotonic() > end:
                return stats
            time.sleep(0.02)

    def wait_for(self, predicate: Callable[[dict[str, float]], bool], *, deadline_s: float = 30.0) -> dict[str, float]:
        end = time.monotonic() + deadline_s
        while not predicate(stats := self.engine.stats()) and time.monotonic() < end:
            time.sleep(0.02)
        return stats


async def _serve(engine: Engine, app: web.Application, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(engine.run)
        port = await tg.start(serve_http, app, "127.0.0.1", 0)
        task_status.started(port)


@contextmanager
def running_server(
    model_path: Path,
    *,
    overrides: dict[str, Any] | None = None,
    extra_routes: list[web.RouteDef] | None = None,
    lora: bool = False,
    turns: Any = None,
) -> Iterator[Server]:
    """Serve the model until the block ends. `overrides` are config keys, e.g. {"server": {"control_token": "t"}};
    `lora` attaches fresh LoRA layers (rl_training.lora) so adapters can be swapped in; `turns` records requests
    tagged with an agent session (run/agent_sessions.AgentSessions)."""
    settings = load_config(None, {"model": {"base_path": str(model_path)}, **(overrides or {})})
    model, tokenizer, _, _ = load_model(model_path)
    slots = None
    if lora:
        attach_lora(model, adapter_config(settings.rl_training.lora, model), seed=0)
        slots = AdapterSlots(model)
    engine = Engine.from_settings(model, tokenizer, settings, adapter=slots)
    app = make_app(engine, settings=settings, extra_routes=extra_routes, turns=turns)
    with start_blocking_portal("asyncio") as portal:
        future, port = portal.start_task(_serve, engine, app)
        try:
            yield Server(f"http://127.0.0.1:{port}", port, engine, model, app, settings, portal)
        finally:
            future.cancel()


def raw_request(port: int, path: str, body: dict[str, Any]) -> socket.socket:
    """Send a POST over a bare socket and return the socket unread (to hang up on the server mid-answer)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    return sock


def sse_events(response: Reply) -> list[Any]:
    """The `data:` payloads of an SSE body, JSON-decoded ("[DONE]" kept as the string)."""
    out = []
    for line in response.text.splitlines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


GOOD = ("/v1/completions", {"prompt": "Hello", "max_tokens": 1})


def assert_error(reply, status: int, param: str | None = None) -> dict:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    return error


def assert_still_serving(server) -> None:
    reply = server.post(*GOOD)
    assert reply.status_code == 200, reply.text
