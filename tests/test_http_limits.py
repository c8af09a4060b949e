"""Every request's cost is bounded before anything is allocated for it, and the engine's admitted work is bounded
in KV-cache tokens: bad or oversized input is a 4xx in the OpenAI shape naming the field, never a 5xx, never a hang.
"""

import json
import resource
import socket
import time

import pytest

from support.http_harness import raw_request, running_server
from paraloop.run.control import LearnerControl, control_routes
from paraloop.run.status import RunStatus
from support.http_harness import assert_error, assert_still_serving

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
ROUTES = {
    "/v1/completions": {"prompt": "hi", "max_tokens": 1},
    CHAT: {"messages": USER, "max_tokens": 1},
    "/generate": {"prompt": {"prompt_token_ids": [5, 6]}, "max_tokens": 1},
}
LIMITS = {
    "engine": {
        "max_prompt_tokens": 64,
        "max_tokens_limit": 1000,
        "max_n": 4,
        "max_kv_tokens": 3000,
        "max_top_logprobs": 5,
        "max_stop_strings": 3,
        "max_stop_string_chars": 8,
        "max_stop_token_ids": 2,
    },
    "server": {"max_json_depth": 8},
}
FAST_S = 2.0  # a refusal takes milliseconds; anything near this was work done on input it should have refused


@pytest.fixture(scope="module")
def server(tiny_model_path):
    status = RunStatus(total_steps=1, mode="sync", run_dir="unused")
    with running_server(
        tiny_model_path, overrides=LIMITS, extra_routes=control_routes(status, LearnerControl(status))
    ) as s:
        yield s


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


ANY = object()  # any `param`


def refused(server, path: str, body, status: int = 400, param=ANY, **kwargs) -> dict:
    """POST and expect a quick OpenAI-shaped `status` error naming `param`."""
    start = time.monotonic()
    reply = server.post(path, raw=body, **kwargs) if isinstance(body, bytes) else server.post(path, body, **kwargs)
    assert time.monotonic() - start < FAST_S
    error = reply.json()["error"]
    return assert_error(reply, status, error["param"] if param is ANY else param)


@pytest.mark.parametrize("path", list(ROUTES))
def test_a_huge_n_is_refused_at_once_without_allocating(server, path):
    """The issue's {"n": 2147483648} grew the process until the OOM killer ended it."""
    before = max_rss_mb()
    for n in (2**31, 2**62, 10**400):
        error = refused(server, path, {**ROUTES[path], "n": n}, param="n")
        assert error["code"] == "invalid_value"
    assert max_rss_mb() - before < 50
    assert_still_serving(server)


@pytest.mark.parametrize("path", list(ROUTES))
def test_invalid_utf8_inside_a_json_string_is_a_400(server, path):
    for bad in (b"\xff\xfe", b"\xc3(", b"\xed\xa0\x80"):  # not UTF-8; a truncated sequence; a UTF-8 surrogate
        raw = json.dumps({**ROUTES[path], "model": "MODEL"}).encode().replace(b"MODEL", b"m" + bad)
        error = refused(server, path, raw, param=None)
        assert error["code"] == "invalid_json" and "UTF-8" in error["message"]
    assert_still_serving(server)


INT_FIELDS = ["n", "max_tokens", "top_k", "seed", "logprobs", "stop_token_ids"]


@pytest.mark.parametrize("field", INT_FIELDS)
@pytest.mark.parametrize("value", ["1" + "0" * 30, "-1" + "0" * 30, "1" + "0" * 5000])
def test_integers_far_beyond_int64_are_a_400_naming_the_field(server, field, value):
    body = json.dumps({"prompt": "hi", "max_tokens": 1, field: 0}).replace(
        f'"{field}": 0', f'"{field}": [{value}]' if field == "stop_token_ids" else f'"{field}": {value}'
    )
    error = refused(server, "/v1/completions", body.encode())
    assert error["param"] in (field, f"{field}[0]")


def test_a_huge_token_id_in_a_prompt_is_a_400(server):
    for value in ("1" + "0" * 30, "1" + "0" * 5000):
        raw = b'{"prompt": {"prompt_token_ids": [5, ' + value.encode() + b"]}}"
        assert refused(server, "/generate", raw)["param"] == "prompt.prompt_token_ids[1]"


@pytest.mark.parametrize("value", ["1e400", "-1e400"])
def test_floats_out_of_range_are_a_400_naming_the_field(server, value):
    raw = b'{"prompt": "hi", "temperature": ' + value.encode() + b"}"
    refused(server, "/v1/completions", raw, param="temperature")


@pytest.mark.parametrize("depth", [9, 500, 100_000])
def test_deep_nesting_is_a_400(server, depth):
    nested = "[" * depth + "]" * depth
    raw = json.dumps({"messages": USER, "chat_template_kwargs": {"x": 0}}).replace("0}", nested + "}").encode()
    error = refused(server, CHAT, raw)
    assert "nested more than 8 levels" in error["message"]
    tools = json.dumps(
        {"messages": USER, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"a": [[[[[1]]]]]}}}]}
    )
    assert refused(server, CHAT, tools.encode())["param"] == "tools[0].function.parameters"
    schema = {"type": "json_schema", "json_schema": {"name": "s", "schema": {"a": [[[[[1]]]]]}}}
    fmt = json.dumps({"messages": USER, "response_format": schema})
    assert refused(server, CHAT, fmt.encode())["param"] == "response_format.json_schema.schema"
    refused(server, "/v1/completions", ("[" * depth + "]" * depth).encode())  # not even an object
    assert_still_serving(server)


def test_a_huge_integer_inside_a_free_form_field_is_a_400(server):
    raw = b'{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"x": 1' + b"0" * 40 + b"}}"
    assert refused(server, CHAT, raw)["param"] == "chat_template_kwargs"


@pytest.mark.parametrize(
    ("path", "changes", "param"),
    [
        ("/v1/completions", {"n": 5}, "n"),
        ("/v1/completions", {"max_tokens": 1001}, "max_tokens"),
        (CHAT, {"max_completion_tokens": 1001, "max_tokens": None}, "max_completion_tokens"),
        ("/v1/completions", {"logprobs": 6}, "logprobs"),
        (CHAT, {"logprobs": True, "top_logprobs": 6}, "top_logprobs"),
        ("/generate", {"logprobs": 6}, "logprobs"),
        ("/v1/completions", {"stop": ["a", "b", "c", "d"]}, "stop"),
        ("/v1/completions", {"stop": "123456789"}, "stop"),
        ("/generate", {"stop": ["123456789"]}, "stop"),
        ("/v1/completions", {"stop_token_ids": [1, 2, 3]}, "stop_token_ids"),
        ("/v1/completions", {"prompt": list(range(1, 66))}, "prompt"),
        ("/generate", {"prompt": {"prompt_token_ids": [5] * 65}}, "prompt.prompt_token_ids"),
        ("/v1/completions", {"prompt": "word " * 2000}, "prompt"),
        ("/generate", {"prompt": {"prompt": "x" * 5000}}, "prompt.prompt"),
        (CHAT, {"messages": [{"role": "user", "content": "x" * 5000}]}, "messages"),
        (CHAT, {"messages": [{"role": "user", "content": "x"}] * 65}, "messages"),
        # n x (prompt + max_tokens) over engine.max_kv_tokens = 3000: could never be admitted
        ("/v1/completions", {"prompt": [5] * 50, "n": 4, "max_tokens": 800}, "n"),
        ("/generate", {"prompt": {"prompt_token_ids": [5] * 60}, "n": 4, "max_tokens": 700}, "n"),
        ("/generate", {"prompt": {"prompt_token_ids": [5] * 60}, "max_tokens": 1000, "n": 3}, "n"),
    ],
)
def test_each_limit_is_a_400_naming_the_route_field(server, path, changes, param):
    body = {**ROUTES[path], **changes}
    error = refused(server, path, {k: v for k, v in body.items() if v is not None}, param=param)
    assert error["message"].startswith(param)


def test_a_text_prompt_too_long_to_fit_is_refused_before_it_is_tokenized(server):
    tokenizer = server.engine.tokenizer
    calls = []
    encode = tokenizer.encode
    tokenizer.encode = lambda *a, **k: calls.append(a) or encode(*a, **k)
    try:
        refused(server, "/v1/completions", {"prompt": "x" * 100_000, "max_tokens": 1}, param="prompt")
        refused(server, CHAT, {"messages": [{"role": "user", "content": "x" * 100_000}]}, param="messages")
    finally:
        tokenizer.encode = encode
    assert calls == []


def test_the_engine_admits_work_bounded_in_kv_tokens_and_answers_429_when_full(server):
    # The hog holds 2 x (2 + 1000) = 2004 of 3000 KV tokens for seconds; 2 x (2 + 600) more does not fit, though one
    # request is far below server.max_concurrent_requests; 1 x (1 + 2) does.
    hog = {"prompt": {"prompt_token_ids": [5, 6]}, "n": 2, "max_tokens": 1000, "ignore_eos": True}
    sock = raw_request(server.port, "/generate", hog)
    try:
        stats = server.wait_for(lambda s: s["active_rows"] == 2)
        assert stats["kv_tokens_admitted"] == 2004 and stats["queue_depth"] == 1
        reply = server.post("/generate", {**hog, "max_tokens": 600})
        error = assert_error(reply, 429)
        assert error["code"] == "engine_busy" and "max_kv_tokens=3000" in error["message"]
        assert int(reply.headers["retry-after"]) >= 1
        small = server.post("/generate", {"prompt": {"prompt_token_ids": [5]}, "max_tokens": 2})
        assert small.status_code == 200, small.text
        assert server.engine.stats()["active_rows"] == 2  # the hog was running all along
    finally:
        sock.close()
    stats = server.wait_idle()
    assert stats["kv_tokens_admitted"] == 0 and stats["queue_depth"] == 0
    assert_still_serving(server)


@pytest.mark.parametrize(
    "content_type",
    ["multipart/form-data; boundary=x", "application/xml", "image/png", "application/json; charset=latin-1"],
)
def test_a_body_that_is_not_json_is_a_415(server, content_type):
    error = refused(
        server, "/v1/completions", ROUTES["/v1/completions"], status=415, headers={"Content-Type": content_type}
    )
    assert error["code"] == "unsupported_media_type"


def test_json_content_types_and_none_at_all_are_accepted(server):
    body = json.dumps(ROUTES["/v1/completions"]).encode()
    # JSON, and the types clients put on a body sent without one (curl -d, urllib: form-urlencoded; fetch: text/plain)
    for content_type in (
        "application/json; charset=utf-8",
        "application/vnd.x+json",
        "application/x-www-form-urlencoded",
        "text/plain;charset=UTF-8",
    ):
        headers = {"Content-Type": content_type}
        assert server.post("/v1/completions", raw=body, headers=headers).status_code == 200
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:  # no Content-Type header
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode() + body)
        assert sock.makefile("rb").readline().startswith(b"HTTP/1.1 200")


def test_control_routes_take_no_body_and_only_their_method(server):
    assert server.post("/control/pause", raw=b"").status_code == 200
    assert server.post("/control/resume", {}).status_code == 200
    assert refused(server, "/control/pause", {"force": True}, param="force")["message"].startswith("force")
    refused(server, "/control/pause", b"[1]")
    refused(server, "/control/pause", b"{bad")
    refused(server, "/control/resume", b"{}", status=415, headers={"Content-Type": "application/xml"})
    for path in ("/control/pause", "/control/resume", "/control/step", "/control/snapshot", "/control/stop"):
        assert_error(server.get(path), 405)
    assert_error(server.post("/control/status", {}), 405)
    assert_error(server.post("/metrics", {}), 405)
    assert server.get("/control/status").json()["paused"] is False


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_body_that_is_not_the_encoding_it_claims_is_a_400_naming_content_encoding(server, encoding):
    """aiohttp decodes gzip and deflate bodies itself; one that does not decode was a 500."""
    body = json.dumps(ROUTES["/v1/completions"]).encode()
    refused(server, "/v1/completions", body, param="Content-Encoding", headers={"Content-Encoding": encoding})
    assert_still_serving(server)
