"""Fuzzing every route of a real `paraloop run` (tiny model, mock environment) from its own /openapi.json.

Thousands of generated requests (tests/support/fuzz_requests.py): bodies the document describes and bodies broken every
way, wrong methods, content types and paths, streaming requests, malformed HTTP. Each must be answered within a
deadline and never with a 5xx; errors are OpenAI-shaped; afterwards the run still serves, trains one step on request
and stops cleanly, and its peak RSS stayed within a bound of where it started. The counts and the peak RSS are
written to FUZZ_REPORT (JSON) and printed.
"""

import http.client
import json
import os
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings

from support.fuzz_requests import FuzzRequest, requests
from support import procs
from support import served_port
from support.runs import run_cmd

REPO = Path(__file__).resolve().parents[1]
FUZZ_REPORT = Path(os.environ.get("PARALOOP_FUZZ_REPORT", REPO / ".cache" / "fuzz-report.json"))
EXAMPLES = int(os.environ.get("PARALOOP_FUZZ_EXAMPLES", "2000"))
ANSWER_DEADLINE_S = 20.0  # per request; the slowest valid one generates 3 x 4 tokens
RSS_GROWTH_LIMIT_MB = 400  # peak over the RSS after warm-up; bodies are bounded by server.max_body_bytes (2 MiB)
OVERRIDES = [
    "--steps",
    "100000",
    "--checkpoint-interval",
    "0",
    "--set",
    "engine.max_n=4",
    "--set",
    "engine.max_tokens_limit=8",
    "--set",
    "engine.default_max_tokens=4",
    "--set",
    "server.max_body_bytes=2097152",
    "--set",
    "server.body_timeout_s=1.0",
]


def start_run(model: Path, run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PARALOOP_LOG": "warning", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
    cmd = run_cmd(model, run_dir, *OVERRIDES)
    log = (run_dir.parent / "run.log").open("w")
    return procs.spawn(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def rss_mb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {key} for {pid}")


def send(port: int, req: FuzzRequest) -> tuple[int, bytes, float]:
    start = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=ANSWER_DEADLINE_S)
    try:
        headers = dict(req.headers) if req.body is not None else {}
        conn.request(req.method, req.path, body=req.body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read(), time.monotonic() - start
    finally:
        conn.close()


def check_answer(req: FuzzRequest, status: int, body: bytes, took: float) -> None:
    assert took < ANSWER_DEADLINE_S, (req, took)
    assert status < 500, (req, status, body[:500])
    if req.kind == "well_formed":
        assert status == 200, (req, status, body[:500])
    if status >= 400:
        error = json.loads(body)["error"]  # the OpenAI shape, whatever went wrong
        assert set(error) == {"message", "type", "param", "code"}, body[:500]
    elif b"data: " in body[:6]:  # SSE: no in-band error either
        assert b'data: {"error"' not in body, (req, body[:500])


MALFORMED_HTTP = [
    b"GARBAGE\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n{}",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\n{}\r\n0\r\n\r\n",
    b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nContent-Length: 12\r\n\r\n{}",
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
]
BODY_TIMEOUT_S = 1.0


def malformed_http(port: int) -> list[int]:
    """Broken HTTP framing: answered 400 by aiohttp's parser (plain text: no route ever saw it), never a 5xx."""
    statuses = []
    for raw in MALFORMED_HTTP:
        with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_DEADLINE_S) as sock:
            sock.sendall(raw)
            line = sock.makefile("rb").readline()
        assert line, raw[:80]
        status = int(line.split()[1])
        assert 400 <= status < 500, (raw[:80], line)
        statuses.append(status)
    return statuses


def slow_body(port: int) -> int:
    """A client that sends half a body and then nothing: a 408 once server.body_timeout_s has passed."""
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_DEADLINE_S) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"prompt":'
        )
        start = time.monotonic()
        status = int(sock.makefile("rb").readline().split()[1])
        assert BODY_TIMEOUT_S <= time.monotonic() - start < ANSWER_DEADLINE_S
    assert status == 408
    return status


def dropped_streams(port: int) -> int:
    """Clients that hang up mid-stream; the server must free their rows and go on."""
    for path, body in [
        ("/v1/completions", {"prompt": "x", "n": 4, "max_tokens": 8, "stream": True}),
        ("/generate", {"prompt": "x", "n": 4, "max_tokens": 8, "stream": True}),
    ]:
        data = json.dumps(body).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_DEADLINE_S) as sock:
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n\r\n".encode()
                + data
            )
            assert sock.recv(64).startswith(b"HTTP/1.1 200")
    return 2


@pytest.mark.slow
def test_fuzzing_every_route_never_gets_a_5xx_a_hang_or_unbounded_memory(tiny_model_path, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = start_run(tiny_model_path, run_dir)
    try:
        port = served_port(proc, run_dir, log=run_dir.parent / "run.log")
        doc_status, doc, _ = send(port, FuzzRequest("setup", "GET", "/openapi.json"))
        assert doc_status == 200
        doc = json.loads(doc)
        assert send(port, FuzzRequest("setup", "POST", "/control/pause", b""))[0] == 200  # keep the CPU for fuzzing
        for _ in range(3):  # warm up: the first generations allocate the engine's buffers
            assert send(port, FuzzRequest("setup", "POST", "/v1/completions", b'{"prompt": "x", "n": 4}'))[0] == 200
        rss_start = rss_mb(proc.pid, "VmRSS")

        statuses: Counter[int] = Counter()
        kinds: Counter[str] = Counter()
        slowest = [0.0]
        started = time.monotonic()

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(requests(doc))
        def fuzz(req: FuzzRequest) -> None:
            try:
                status, body, took = send(port, req)
            except OSError as e:
                log = (run_dir.parent / "run.log").read_text()[-3000:]
                raise AssertionError(f"no answer ({e!r}); the run's exit code: {proc.poll()}; log: {log}") from e
            statuses[status] += 1
            kinds[req.kind] += 1
            slowest[0] = max(slowest[0], took)
            check_answer(req, status, body, took)

        fuzz()
        raw_statuses = malformed_http(port) + [slow_body(port)]
        dropped = dropped_streams(port)
        elapsed = time.monotonic() - started

        # Still serving, still training on request, still stopping cleanly.
        assert send(port, FuzzRequest("after", "GET", "/health"))[0] == 200
        status, body, _ = send(port, FuzzRequest("after", "POST", "/v1/completions", b'{"prompt": "x", "n": 2}'))
        assert status == 200 and len(json.loads(body)["choices"]) == 2
        deadline = time.monotonic() + 30
        while json.loads(send(port, FuzzRequest("after", "GET", "/control/status"))[1])["engine"]["active_rows"]:
            assert time.monotonic() < deadline, "dropped streams' rows were never freed"
            time.sleep(0.05)
        status, body, _ = send(port, FuzzRequest("after", "POST", "/control/step", b""))
        assert status == 200 and json.loads(body)["step"] >= 1, body
        peak = rss_mb(proc.pid, "VmHWM")
        report = {
            "requests": sum(statuses.values()) + len(raw_statuses) + dropped,
            "hypothesis_examples": sum(statuses.values()),
            "status_counts": {str(k): v for k, v in sorted(statuses.items())},
            "malformed_http_statuses": raw_statuses,
            "dropped_streams": dropped,
            "kinds": dict(sorted(kinds.items())),
            "seconds": round(elapsed, 1),
            "slowest_answer_s": round(slowest[0], 3),
            "rss_after_warmup_mb": round(rss_start, 1),
            "peak_rss_mb": round(peak, 1),
        }
        FUZZ_REPORT.parent.mkdir(parents=True, exist_ok=True)
        FUZZ_REPORT.write_text(json.dumps(report, indent=1) + "\n")
        print("fuzz report:", json.dumps(report))
        assert peak - rss_start < RSS_GROWTH_LIMIT_MB, report

        assert send(port, FuzzRequest("after", "POST", "/control/stop", b""))[0] == 200
        assert proc.wait(timeout=120) == 0, (run_dir.parent / "run.log").read_text()[-3000:]
        log = (run_dir.parent / "run.log").read_text()
        for sign in ("Traceback", "Warning", "ERROR"):  # a bug answered 400 by luck, or arithmetic gone NaN
            assert sign not in log, log[-3000:]
    finally:
        procs.kill_group(proc, grace_s=0)
