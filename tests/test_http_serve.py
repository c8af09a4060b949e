"""`paraloop serve` as a user runs it: a subprocess that serves until SIGINT/SIGTERM, or one error line and exit 2."""

import json
import re
import signal
import socket
import time

import pytest

from paraloop.serve import main
from support import free_port
from support.engines import greedy_logprobs
from support.serving import DEADLINE_S, Serve


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_answers_until_a_signal_then_exits_0(tiny_model_path, sig):
    with Serve("--model-path", str(tiny_model_path), "--served-model-name", "tiny") as server:
        assert server.request("GET", "/health") == (200, {"status": "ok", "adapter_version": 0})
        status, body = server.request("GET", "/v1/models")
        assert status == 200 and body["data"][0]["id"] == "tiny"
        status, body = server.request("POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 2})
        assert status == 200 and body["usage"]["completion_tokens"] >= 1
        assert server.stop(sig) == 0


def test_a_stream_in_flight_at_shutdown_ends_with_abort_and_exit_0(tiny_model_path):
    body = json.dumps({"prompt": "x", "n": 2, "max_tokens": 4000, "ignore_eos": True, "stream": True}).encode()
    with (
        Serve("--model-path", str(tiny_model_path)) as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE_S) as sock,
    ):
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode() + body)
        received = b""
        while b"data: {" not in received:  # generating
            chunk = sock.recv(65536)
            assert chunk, f"the server closed the connection before streaming: {received!r}"
            received += chunk
        assert server.stop(signal.SIGTERM) == 0
        while chunk := sock.recv(65536):
            received += chunk
    chunks = [json.loads(m) for m in re.findall(rb"data: (\{.*?\})\n\n", received)]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks]
    assert sorted(f for f in finishes if f) == ["abort", "abort"]


def test_serve_answers_with_the_adapter_it_was_given(tiny_model_path, tmp_path):
    import mlx.core as mx

    from paraloop.config import LoraConfig
    from paraloop.lora import adapter_arrays, adapter_config, apply_adapter, attach_lora, save_adapter
    from paraloop.model import load_model

    model, _, _, _ = load_model(tiny_model_path)
    config = adapter_config(LoraConfig(rank=4, num_layers=2, keys="all"), model)
    attach_lora(model, config, seed=1)
    # a strong random adapter: its answers differ clearly from the base model's
    arrays = {
        k: mx.random.normal(v.shape, key=mx.random.key(i)) * 0.2
        for i, (k, v) in enumerate(sorted(adapter_arrays(model).items()))
    }
    save_adapter(tmp_path / "adapter", arrays, config)
    prompt = [5, 6, 7, 8]
    with Serve("--model-path", str(tiny_model_path), "--lora-path", str(tmp_path / "adapter")) as server:
        status, body = server.request(
            "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        )
        assert status == 200 and body["adapter_version"] == 0, body
        assert server.stop(signal.SIGTERM) == 0
    tokens, served = body["choices"][0]["token_ids"], body["choices"][0]["token_logprobs"]

    base, _, _, _ = load_model(tiny_model_path)
    adapted, _, _, _ = load_model(tiny_model_path)
    apply_adapter(adapted, tmp_path / "adapter")
    assert served == pytest.approx(greedy_logprobs(adapted, prompt, tokens), abs=2e-3)
    without = greedy_logprobs(base, prompt, tokens)
    assert max(abs(a - b) for a, b in zip(served, without, strict=True)) > 0.05, "the adapter changed nothing"
    # greedy: each served token is the adapted model's argmax at its position
    logits = adapted(mx.array(prompt + tokens[:-1])[None])[0][len(prompt) - 1 :]
    assert mx.argmax(logits, axis=-1).tolist() == tokens


def test_paraloop_log_sets_the_level_of_serve(tiny_model_path):
    port = free_port()
    with Serve("--model-path", str(tiny_model_path), port=port, env={"PARALOOP_LOG": "warning"}) as server:
        wait_health(server)
        assert server.request("POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 2})[0] == 200
        assert server.stop(signal.SIGTERM) == 0
    logged = server.lines.text()
    assert "serving" not in logged and " INFO " not in logged, logged  # INFO is the default level


def wait_health(server: Serve) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        try:
            if server.request("GET", "/health")[0] == 200:
                return
        except OSError:
            pass
        assert server.proc.poll() is None, f"paraloop serve exited: {server.lines.text()[-2000:]}"
        assert time.monotonic() < deadline, "paraloop serve did not answer /health in time"
        time.sleep(0.1)


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
    assert "bad-adapter" in one_error_line(capsys, "--model-path", str(tiny_model_path), "--lora-path", str(bad))
    toml = tmp_path / "bad.toml"
    toml.write_text("[server]\nportt = 1\n")
    assert "server.portt" in one_error_line(capsys, "--model-path", str(tiny_model_path), "--config", str(toml))


def test_a_taken_port_is_one_error_line_and_exit_2(tiny_model_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_error_line(capsys, "--model-path", str(tiny_model_path), "--port", str(port))
    assert line.startswith(f"paraloop: error: cannot listen on 127.0.0.1:{port}")
