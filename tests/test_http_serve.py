"""`paraloop serve` as a user runs it: a subprocess that serves until SIGINT/SIGTERM, or one error line and exit 2."""

import http.client
import json
import queue
import re
import signal
import socket
import subprocess
import sys
import threading

import pytest

from paraloop.serve import main

DEADLINE_S = 60  # generous: only bounds a hang, never asserted on


class Serve:
    """A running `python -m paraloop serve ...`, its bound port read from the log line it prints."""

    def __init__(self, *args: str) -> None:
        cmd = [sys.executable, "-m", "paraloop", "serve", "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        while True:
            line = self.lines.get(timeout=DEADLINE_S)
            assert line, "paraloop serve exited before serving"
            if m := re.search(r"serving .* on http://127\.0\.0\.1:(\d+)", line):
                self.port = int(m.group(1))
                return

    def _pump(self) -> None:
        for line in self.proc.stderr:
            self.lines.put(line)
        self.lines.put("")

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=DEADLINE_S)
        conn.request(method, path, body=json.dumps(body) if body is not None else None)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())

    def stop(self, sig: int) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=DEADLINE_S)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_answers_until_a_signal_then_exits_0(tiny_model_path, sig):
    server = Serve("--model-path", str(tiny_model_path), "--served-model-name", "tiny")
    try:
        assert server.request("GET", "/health") == (200, {"status": "ok", "adapter_version": 0})
        status, body = server.request("GET", "/v1/models")
        assert status == 200 and body["data"][0]["id"] == "tiny"
        status, body = server.request("POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 2})
        assert status == 200 and body["usage"]["completion_tokens"] >= 1
    finally:
        assert server.stop(sig) == 0


def test_a_stream_in_flight_at_shutdown_ends_with_abort_and_exit_0(tiny_model_path):
    server = Serve("--model-path", str(tiny_model_path))
    body = json.dumps(
        {"prompt": "x", "n": 2, "max_tokens": 4000, "ignore_eos": True, "stream": True}
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE_S) as sock:
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode() + body)
        received = b""
        while b"data: {" not in received:  # generating
            received += sock.recv(65536)
        assert server.stop(signal.SIGTERM) == 0
        while chunk := sock.recv(65536):
            received += chunk
    chunks = [json.loads(m) for m in re.findall(rb"data: (\{.*?\})\n\n", received)]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks]
    assert sorted(f for f in finishes if f) == ["abort", "abort"]


def test_serve_loads_an_adapter(tiny_model_path, tmp_path):
    import mlx.core as mx

    from paraloop.config import LoraConfig
    from paraloop.lora import adapter_arrays, adapter_config, attach_lora, save_adapter
    from paraloop.model import load_model

    model, _, _, _ = load_model(tiny_model_path)
    config = adapter_config(LoraConfig(rank=4, num_layers=2), model)
    attach_lora(model, config, seed=1)
    arrays = {k: mx.ones_like(v) * 0.01 for k, v in adapter_arrays(model).items()}
    save_adapter(tmp_path / "adapter", arrays, config)
    server = Serve("--model-path", str(tiny_model_path), "--lora-path", str(tmp_path / "adapter"))
    try:
        status, body = server.request("POST", "/generate", {"prompt": "Hello", "max_tokens": 2})
        assert status == 200 and body["adapter_version"] == 0
    finally:
        assert server.stop(signal.SIGTERM) == 0


def one_error_line(capsys, *argv: str) -> str:
    """Run `paraloop serve ARGV` in-process (it fails before serving); return its only stderr line."""
    assert main(["--port", "0", *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("paraloop: error: "), lines
    return lines[0]


def test_bad_input_is_one_error_line_and_exit_2(tiny_model_path, tmp_path, capsys):
    assert "model.base_path" in one_error_line(capsys)
    assert str(tmp_path / "nope") in one_error_line(capsys, "--model-path", str(tmp_path / "nope"))
    bad = tmp_path / "bad-adapter"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": 2}))
    (bad / "adapters.safetensors").write_bytes(b"not safetensors")
    assert "bad-adapter" in one_error_line(
        capsys, "--model-path", str(tiny_model_path), "--lora-path", str(bad)
    )
    toml = tmp_path / "bad.toml"
    toml.write_text("[server]\nportt = 1\n")
    assert "server.portt" in one_error_line(
        capsys, "--model-path", str(tiny_model_path), "--config", str(toml)
    )


def test_a_taken_port_is_one_error_line_and_exit_2(tiny_model_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_error_line(capsys, "--model-path", str(tiny_model_path), "--port", str(port))
    assert line.startswith(f"paraloop: error: cannot listen on 127.0.0.1:{port}")
