"""A client that hangs up mid-generation frees its rows in the engine at once (streaming or not): an SSE reader
that goes away, an environment that disconnects in the middle of a plain request.

The requests ask for far more tokens than the engine can generate before `IDLE_WITHIN_S` (minutes of decoding even
on a fast machine), so the engine is idle in time only if the hang-up ended them; once idle, the decode steps of a
later request generate its tokens alone.
"""

import openai
import pytest

from support.http_harness import raw_request, running_server

N, MAX_TOKENS = 2, 50_000
IDLE_WITHIN_S = 10.0


@pytest.fixture(scope="module")
def server(tiny_model_path):
    with running_server(
        tiny_model_path, overrides={"engine": {"max_tokens_limit": MAX_TOKENS}, "server": {"served_model_name": "m"}}
    ) as s:
        yield s


def hang_up_and_check_freed(server, sock) -> None:
    at_hang_up = server.engine.stats()["generated_tokens"]
    sock.close()
    stats = server.wait_idle(deadline_s=IDLE_WITHIN_S)
    assert stats["active_rows"] == 0 and stats["queue_depth"] == 0, f"rows still decoding after the hang-up: {stats}"
    assert stats["kv_tokens_admitted"] == 0
    assert stats["generated_tokens"] - at_hang_up < N * MAX_TOKENS // 10  # stopped early, did not run on
    # Decode steps run after it (another request's 3 tokens): a row the hang-up left decoding would add its own.
    assert server.post("/v1/completions", {"prompt": "x", "max_tokens": 3, "ignore_eos": True}).status_code == 200
    assert server.engine.stats()["generated_tokens"] == stats["generated_tokens"] + 3, "decoding went on"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "x", "n": N, "max_tokens": MAX_TOKENS, "ignore_eos": True}),
        (
            "/generate",
            {"prompt": {"prompt_token_ids": [5, 6]}, "n": N, "max_tokens": MAX_TOKENS, "ignore_eos": True},
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "hi"}],
                "n": N,
                "max_tokens": MAX_TOKENS,
                "ignore_eos": True,
            },
        ),
    ],
)
def test_hanging_up_on_a_plain_request_frees_its_rows(server, path, body):
    sock = raw_request(server.port, path, body)
    assert server.wait_for(lambda s: s["active_rows"] == N)["active_rows"] == N
    hang_up_and_check_freed(server, sock)
    assert server.post("/v1/completions", {"prompt": "x", "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize("path", ["/v1/completions", "/generate"])
def test_hanging_up_on_a_stream_frees_its_rows(server, path):
    body = {"prompt": "x", "n": N, "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True}
    sock = raw_request(server.port, path, body)
    head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 200"), head
    hang_up_and_check_freed(server, sock)


def test_closing_an_openai_client_stream_frees_its_rows(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
        stream = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            n=N,
            max_tokens=MAX_TOKENS,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        for i, _ in enumerate(stream):
            if i == 3:
                break
        stream.close()
    stats = server.wait_idle(deadline_s=IDLE_WITHIN_S)
    assert stats["active_rows"] == 0 and stats["queue_depth"] == 0, f"rows still decoding after close: {stats}"
