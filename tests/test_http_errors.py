"""Every error is OpenAI-shaped JSON with the right status, names the bad field, and the server keeps serving."""

import logging

import pytest
from aiohttp import web

from support.http_harness import GOOD, assert_error, assert_still_serving, raw_request, running_server
from paraloop.server import STATE

BIG = 4000  # max_tokens of a request that keeps the engine busy until it is cancelled


@pytest.fixture(scope="module")
def server(tiny_model_path):
    with running_server(tiny_model_path) as s:
        yield s


CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
BAD_INPUTS = [
    ("/v1/completions", b"{not json", None),
    ("/v1/completions", b"", None),
    ("/v1/completions", b"[1, 2]", None),
    ("/v1/completions", {"max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"prompt": [5, 99999]}, "prompt"),
    ("/v1/completions", {"prompt": [5, 99999], "echo": True, "max_tokens": 0}, "prompt"),  # echoed, never run
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "x", "min_p": 2}, "min_p"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "x", "n": 10_000}, "n"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**6}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": 3}, "stop"),
    ("/v1/completions", {"prompt": "x", "echo": True, "stream": True}, "echo"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 1}}, "logit_bias"),
    (CHAT, {"model": "m"}, "messages"),
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    (
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        "messages[0].content[0].type",
    ),
    (CHAT, {"messages": USER, "top_logprobs": 2}, "top_logprobs"),
    (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (CHAT, {"messages": USER, "max_completion_tokens": 10**6}, "max_completion_tokens"),
    (CHAT, {"messages": USER, "stream_options": {"include_usage": True, "x": 1}}, "stream_options.x"),
    (CHAT, {"messages": USER, "tools": [{"type": "function"}]}, "tools[0].function"),
    (CHAT, {"messages": USER, "chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
    (
        CHAT,
        {"messages": USER, "add_generation_prompt": True, "continue_final_message": True},
        "continue_final_message",
    ),
    ("/generate", b"{", None),
    ("/generate", {"prompt": {"prompt_token_ids": "5 6"}}, "prompt.prompt_token_ids"),
    ("/generate", {"prompt": "x", "top_k": -2}, "top_k"),
    ("/generate", {"prompt": {"prompt_token_ids": [5, 99999]}, "stream": True}, "prompt.prompt_token_ids"),
]


@pytest.mark.parametrize(("path", "body", "param"), BAD_INPUTS)
def test_bad_input_is_a_400_naming_the_field_and_the_server_keeps_serving(server, path, body, param):
    reply = server.post(path, raw=body) if isinstance(body, bytes) else server.post(path, body)
    error = assert_error(reply, 400, param)
    assert error["type"] == "invalid_request_error"
    if param:
        assert error["message"].startswith(param)
    assert_still_serving(server)


def test_unknown_route_is_404_and_wrong_method_is_405(server):
    assert_error(server.get("/v2/nothing"), 404)
    reply = server.get("/v1/completions")
    assert_error(reply, 405)
    assert reply.headers["allow"] == "POST"
    assert_error(server.post("/health", {}), 405)
    assert_still_serving(server)


def test_a_body_over_max_body_bytes_is_413(tiny_model_path):
    with running_server(tiny_model_path, overrides={"server": {"max_body_bytes": 1024}}) as s:
        error = assert_error(s.post("/v1/completions", {"prompt": "x" * 4096}), 413)
        assert error["code"] == "request_too_large"
        assert_still_serving(s)


def test_a_control_token_guards_every_route_but_health(tiny_model_path):
    with running_server(tiny_model_path, overrides={"server": {"control_token": "s3cret"}}) as s:
        assert_error(s.get("/v1/models"), 401)
        assert_error(s.post(*GOOD, headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(s.post("/generate", {"prompt": "x"}), 401)
        assert_error(s.get("/nowhere"), 401)  # no probing of routes without the token either
        assert s.get("/health").status_code == 200
        assert s.post(*GOOD, headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_a_full_engine_queue_is_429_with_retry_after(tiny_model_path):
    with running_server(tiny_model_path, overrides={"server": {"max_concurrent_requests": 1}}) as s:
        hog = raw_request(s.port, "/v1/completions", {"prompt": "x", "max_tokens": BIG, "ignore_eos": True})
        try:
            s.wait_for(lambda stats: stats["active_rows"] == 1)
            reply = s.post(*GOOD)
            error = assert_error(reply, 429)
            assert error["type"] == "rate_limit_error" and int(reply.headers["retry-after"]) >= 1
        finally:
            hog.close()
        s.wait_idle()
        assert_still_serving(s)


def test_an_unexpected_exception_is_a_logged_500_and_serving_goes_on(tiny_model_path, caplog):
    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("a bug")

    with running_server(tiny_model_path, extra_routes=[web.get("/broken", broken)]) as s:
        with caplog.at_level(logging.ERROR, logger="paraloop.server"):
            error = assert_error(s.get("/broken"), 500)
        assert "a bug" not in error["message"]  # internals stay in the log
        assert any("/broken" in r.getMessage() and r.exc_info for r in caplog.records)
        assert_still_serving(s)


def test_while_shutting_down_every_request_is_503(server):
    server.app[STATE].shutting_down = True
    try:
        assert_error(server.get("/health"), 503)
        assert_error(server.post(*GOOD), 503)
    finally:
        server.app[STATE].shutting_down = False
    assert_still_serving(server)
