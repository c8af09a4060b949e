"""The claims of docs/security.md, one test each: what listens, what the token guards, that the token is written
nowhere, and that no request can make paraloop open a path or a URL."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from support.http_harness import running_server
from support import procs
from support import served_port
from support.runs import run_cmd
from paraloop.run.control import LearnerControl, control_routes
from paraloop.run.status import RunStatus

REPO = Path(__file__).resolve().parents[1]
TOKEN = "tok-8c1f9e0d4b7a"
DASHBOARD_PAGE = {"/dashboard", "/dashboard/static/{name}"}  # docs/security.md: the page holds no data
MARK = "paraloop-probe-3f9a"  # in every probe path: an open() of a probe is an open() of a path containing it


class Run:
    def __init__(self, proc: subprocess.Popen, run_dir: Path, log: Path, port: int) -> None:
        self.proc, self.run_dir, self.log, self.port = proc, run_dir, log, port

    def call(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        with socket.create_connection(("127.0.0.1", self.port), timeout=60) as sock:
            head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            for k, v in (headers or {}).items():
                head += f"{k}: {v}\r\n"
            if body is not None:
                head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            sock.sendall(head.encode() + b"\r\n" + (body or b""))
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        head, _, payload = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), payload

    def auth(self) -> dict:
        return {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def run(tiny_model_path, tmp_path_factory):
    base = tmp_path_factory.mktemp("secure")
    run_dir, log = base / "run", base / "run.log"
    env = {**os.environ, "PARALOOP_LOG": "info", "PYTHONUNBUFFERED": "1", "PARALOOP_SERVER__CONTROL_TOKEN": TOKEN}
    cmd = run_cmd(tiny_model_path, run_dir, "--steps", "100000", "--checkpoint-interval", "0")
    with log.open("w") as out:
        proc = procs.spawn(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        r = Run(proc, run_dir, log, served_port(proc, run_dir, log=log))
        assert r.call("POST", "/control/pause", headers=r.auth())[0] == 200
        yield r
    finally:
        procs.kill_group(proc, grace_s=0)


def listening(pid: int) -> dict[str, list[str]]:
    """The sockets `pid` listens on (TCP) or has bound (UDP), from /proc."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out: dict[str, list[str]] = {}
    for table in ("tcp", "tcp6", "udp", "udp6"):
        path = Path(f"/proc/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if inode in inodes and (table.startswith("udp") or state == "0A"):
                out.setdefault(table, []).append(local)
    return out


def test_a_run_listens_on_one_loopback_socket_only(run):
    sockets = listening(run.proc.pid)
    assert sockets == {"tcp": [f"0100007F:{run.port:04X}"]}, sockets  # 127.0.0.1:port, nothing else


def test_the_token_guards_every_route_but_health_and_forwarded_headers_do_not_bypass_it(run):
    status, body = run.call("GET", "/openapi.json", headers=run.auth())
    assert status == 200
    routes = [(path, method.upper()) for path, ops in json.loads(body)["paths"].items() for method in ops]
    assert len(routes) >= 13
    spoofed = {"X-Forwarded-For": "127.0.0.1", "X-Real-IP": "127.0.0.1", "Forwarded": "for=127.0.0.1"}
    for path, method in routes + [("/no/such/route", "GET")]:
        body = b"{}" if method == "POST" else None
        for headers in ({}, spoofed, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            status, payload = run.call(method, path, body, headers)
            if path == "/health":
                assert status == 200
            elif path in DASHBOARD_PAGE:  # HTML, script, style: no data (its API below needs the token)
                assert status in (200, 404) and TOKEN.split()[-1].encode() not in payload, (path, status)
            else:
                assert status == 401, (path, headers, status)
                assert json.loads(payload)["error"]["code"] == "invalid_api_key"


def test_a_snapshot_is_written_inside_the_run_directory(run):
    status, body = run.call("POST", "/control/snapshot", b"", run.auth())
    assert status == 200, body
    path = Path(json.loads(body)["path"]).resolve()
    assert path.parent == (run.run_dir / "checkpoints").resolve() and re.fullmatch(r"step_\d{6}", path.name)
    status, body = run.call("POST", "/control/snapshot", json.dumps({"path": "/tmp/elsewhere"}).encode(), run.auth())
    assert status == 400 and json.loads(body)["error"]["param"] == "path"


def test_the_token_is_written_nowhere_in_the_run_directory_nor_the_log(run):
    assert run.call("POST", "/control/snapshot", b"", run.auth())[0] == 200
    status, body = run.call("GET", "/control/status", headers=run.auth())
    assert status == 200 and TOKEN.encode() not in body
    assert run.call("POST", "/control/stop", b"", run.auth())[0] == 200
    assert run.proc.wait(timeout=120) == 0, run.log.read_text()[-3000:]
    files = [p for p in run.run_dir.rglob("*") if p.is_file()]
    assert any(p.name == "trainer_state.json" for p in files)
    leaked = [str(p) for p in files if TOKEN.encode() in p.read_bytes()]
    assert leaked == []
    assert TOKEN not in run.log.read_text()
    state = json.loads(next(p for p in files if p.name == "trainer_state.json").read_text())
    assert state["config"]["server"]["control_token"] == "<redacted>"


# --- no request names a path -------------------------------------------------------------------------------------

PROBES = [f"/tmp/{MARK}/adapter", f"../../{MARK}", f"file:///{MARK}", f"http://{MARK}.invalid/x.png", f"~/{MARK}"]
WATCHED = (
    "open",
    "os.listdir",
    "os.scandir",
    "os.stat",
    "shutil.copyfile",
    "socket.connect",
    "socket.getaddrinfo",
    "urllib.Request",
    "os.remove",
    "os.rename",
    "os.mkdir",
)
_seen: list[tuple[str, str]] = []
_watching = [False]


def _audit(event: str, args: tuple) -> None:
    if _watching[0] and event in WATCHED:
        text = repr(args)
        if MARK in text:
            _seen.append((event, text[:200]))


def probe_requests(probe: str) -> list[tuple[str, dict]]:
    chat = {"max_tokens": 1, "model": probe, "user": probe, "stop": [probe[:8]], "chat_template_kwargs": {"x": probe}}
    return [
        ("/v1/completions", {"prompt": probe, "model": probe, "user": probe, "max_tokens": 1}),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": probe, "name": "n"}]}),
        (
            "/v1/chat/completions",
            {**chat, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": probe}}]}]},
        ),
        (
            "/v1/chat/completions",
            {
                **chat,
                "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": probe}}]}],
            },
        ),
        (
            "/v1/chat/completions",
            {
                "max_tokens": 1,
                "messages": [
                    {"role": "user", "content": "hi"},
                    {
                        "role": "assistant",
                        "content": "",
                        "tool_calls": [
                            {"id": probe, "type": "function", "function": {"name": probe, "arguments": probe}}
                        ],
                    },
                    {"role": "tool", "content": probe, "tool_call_id": probe},
                ],
            },
        ),
        ("/generate", {"prompt": {"prompt": probe}, "model": probe, "max_tokens": 1}),
        ("/generate", {"prompt": probe, "lora_path": probe, "max_tokens": 1}),
        ("/v1/completions", {"prompt": "x", "adapter": probe, "max_tokens": 1}),
    ]


def test_path_and_url_strings_in_every_request_field_open_no_file_and_no_connection(tiny_model_path):
    sys.addaudithook(_audit)  # hooks cannot be removed: this one only records while _watching
    with running_server(tiny_model_path) as server:
        statuses = []
        _watching[0] = True
        try:
            for probe in PROBES:
                for path, body in probe_requests(probe):
                    statuses.append(server.post(path, body).status_code)
        finally:
            _watching[0] = False
    assert _seen == []
    # `model` names an adapter: a path is no adapter's name (404), and nothing is looked up on disk for it.
    assert set(statuses) <= {200, 400, 404} and {200, 400, 404} <= set(statuses)


def test_no_request_schema_has_a_path_field(tiny_model_path):
    """Only /v1/load_lora_adapter names a path, held inside server.lora_dirs (tests/test_http_adapters.py)."""
    with running_server(tiny_model_path) as server:
        doc = server.get("/openapi.json").json()
    names = set()
    for name, schema in doc["components"]["schemas"].items():
        if name not in ("LoadLoraBody", "UnloadLoraBody"):
            names |= set(schema.get("properties", {}))
    suspicious = [n for n in names if re.search(r"path|file|dir|url|uri|lora|adapter|checkpoint|image|audio", n)]
    assert suspicious == [], suspicious


def test_a_browser_page_of_another_origin_cannot_drive_a_server_without_a_token(tiny_model_path):
    """Without a token, any page the user visits could POST /control/stop or /v1/completions to 127.0.0.1 as a
    "simple" request (no preflight), or rebind its own DNS name to 127.0.0.1: the Origin header gives it away."""
    status = RunStatus(total_steps=1, mode="sync", run_dir="unused")
    control = LearnerControl(status)
    with running_server(
        tiny_model_path,
        extra_routes=control_routes(status, control),
        overrides={"server": {"allowed_origins": ["https://dash.example"]}},
    ) as server:
        evil = {"Origin": "https://evil.example", "Content-Type": "text/plain"}
        for path in ("/control/stop", "/control/pause", "/v1/completions"):
            reply = server.post(path, {"prompt": "x"} if path.startswith("/v1") else {}, headers=evil)
            assert reply.status_code == 403 and reply.json()["error"]["code"] == "forbidden_origin", path
        rebound = {"Origin": "http://evil.example:8000", "Host": "evil.example:8000"}
        assert server.post("/control/stop", {}, headers=rebound).status_code == 403
        assert status.stopping is False
        same = {"Origin": f"http://127.0.0.1:{server.port}"}  # a page this server itself serves
        assert server.post("/control/pause", {}, headers=same).status_code == 200
        assert server.post("/control/resume", {}, headers={"Origin": "https://dash.example"}).status_code == 200
        assert server.get("/health", headers=evil).status_code == 200
        assert server.post("/v1/completions", {"prompt": "x", "max_tokens": 1}).status_code == 200  # no Origin
