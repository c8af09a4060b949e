"""Agent sessions over HTTP on the tiny model: requests tagged with a session are recorded by the ids the engine
produced (chat, completions, streamed or not), and POST /v1/sessions/{id}/reward answers its errors in OpenAI's
shape naming the field, behind the bearer token."""

import pytest
from support.http_harness import assert_error, running_server, sse_events

from paraloop.config import AgentSessionsConfig
from paraloop.messages import PROMPT_MASK
from paraloop.run.agent_sessions import AgentSessions
from paraloop.run.session_routes import session_routes

TOKEN = "secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def served(tiny_model_path):
    sessions = AgentSessions(AgentSessionsConfig(group_size=1, max_open=4), batch_size=8)
    overrides = {"server": {"control_token": TOKEN}}
    with running_server(
        tiny_model_path, overrides=overrides, extra_routes=session_routes(sessions), turns=sessions
    ) as server:
        yield server, sessions


def post(server, path, body, headers=None):
    return server.post(path, body, headers={**AUTH, **(headers or {})})


def reward_group(sessions, server, sid, value=1.0, group="g"):
    reply = post(server, f"/v1/sessions/{sid}/reward", {"reward": value, "group": group})
    assert reply.status_code == 200, reply.text
    return reply.json(), sessions._receive.receive_nowait().groups[0]


def test_completions_turns_that_extend_are_one_sample_of_the_engines_own_ids(served):
    server, sessions = served
    prompt = [5, 6, 7]
    first = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 4, "metadata": {"paraloop_session": "c1"}})
    assert first.status_code == 200, first.text
    ids = first.json()["choices"][0]["token_ids"]
    second_prompt = prompt + ids + [8, 9]
    second = post(
        server,
        "/v1/completions",
        {"prompt": second_prompt, "max_tokens": 3},
        headers={"X-Paraloop-Session": "c1"},
    )
    assert second.status_code == 200, second.text
    more = second.json()["choices"][0]["token_ids"]
    answer, group = reward_group(sessions, server, "c1", 0.25)
    assert answer["samples"] == 1 and answer["group_complete"]
    assert group.tokens == [second_prompt + more]
    m = PROMPT_MASK
    assert group.masks == [[m] * 3 + ids + [m, m] + more]
    lps = first.json()["choices"][0]["token_logprobs"] + second.json()["choices"][0]["token_logprobs"]
    trained = [lp for lp, mask in zip(group.inference_logprobs[0], group.masks[0], strict=True) if mask != m]
    assert trained == lps
    assert group.scores == [0.25]


def test_a_streamed_chat_turn_is_recorded_as_streamed(served):
    server, sessions = served
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5,
        "stream": True,
        "metadata": {"paraloop_session": "s1", "other": "kept"},
    }
    reply = post(server, "/v1/chat/completions", body)
    assert reply.status_code == 200, reply.text
    streamed = [t for e in sse_events(reply) if e != "[DONE]" for c in e["choices"] for t in c["token_ids"]]
    # The turn ended before `[DONE]` went out: a reward or a next turn sent at once finds no turn in flight (409).
    assert sessions.stats()["turns_in_flight"] == 0
    _, group = reward_group(sessions, server, "s1")
    assert group.tokens[0][-len(streamed) :] == streamed
    assert [t for t, mask in zip(group.tokens[0], group.masks[0], strict=True) if mask != PROMPT_MASK] == streamed


def test_a_chat_session_whose_template_does_not_extend_its_history_splits_into_samples(served):
    server, sessions = served
    messages = [{"role": "user", "content": "hi"}]
    first = post(
        server, "/v1/chat/completions", {"messages": messages, "max_tokens": 6, "metadata": {"paraloop_session": "s2"}}
    )
    assert first.status_code == 200, first.text
    answer = first.json()["choices"][0]["message"]
    later = [
        *messages,
        {"role": "assistant", "content": answer["content"] + " (edited)"},
        {"role": "user", "content": "more"},
    ]
    second = post(
        server, "/v1/chat/completions", {"messages": later, "max_tokens": 4, "metadata": {"paraloop_session": "s2"}}
    )
    assert second.status_code == 200, second.text
    before = sessions.stats()["split_samples"]
    result, group = reward_group(sessions, server, "s2")
    assert result["samples"] == 2 and len(group.tokens) == 2  # the edited history cannot extend the first sample
    assert before >= 1


def test_tagged_requests_that_cannot_be_a_turn_are_400s_naming_the_field(served):
    server, _ = served
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = [
        ({**chat, "n": 2, "metadata": {"paraloop_session": "x"}}, {}, "n"),
        ({**chat, "model": "base", "metadata": {"paraloop_session": "x"}}, {}, "model"),
        ({**chat, "metadata": {"paraloop_session": "bad id!"}}, {}, "metadata.paraloop_session"),
        ({**chat, "metadata": {"paraloop_session": "a"}}, {"X-Paraloop-Session": "b"}, "metadata.paraloop_session"),
        (chat, {"X-Paraloop-Session": "x" * 129}, "X-Paraloop-Session"),
        ({**chat, "metadata": {f"k{i}": "v" for i in range(17)}}, {}, "metadata"),
    ]
    for body, headers, param in cases:
        assert_error(post(server, "/v1/chat/completions", body, headers), 400, param)
    echo = {"prompt": [1, 2], "max_tokens": 0, "echo": True, "logprobs": 0, "metadata": {"paraloop_session": "x"}}
    assert_error(post(server, "/v1/completions", echo), 400, "max_tokens")
    assert_still_serving_with_token(server)


def test_the_reward_route_answers_its_errors_in_openais_shape(served):
    server, sessions = served
    path = "/v1/sessions/nobody/reward"
    assert_error(post(server, path, {"reward": 1.0, "group": "g"}), 404, "session_id")
    assert_error(
        post(server, "/v1/sessions/" + "x" * 300 + "/reward", {"reward": 1.0, "group": "g"}), 404, "session_id"
    )
    assert_error(post(server, path, {"group": "g"}), 400, "reward")
    assert_error(post(server, path, {"reward": "high", "group": "g"}), 400, "reward")
    assert_error(post(server, path, {"reward": 1.0, "group": ""}), 400, "group")
    assert_error(post(server, path, {"reward": 1.0, "group": "g" * 129}), 400, "group")
    assert_error(post(server, path, {"reward": 1.0, "group": "g", "extra": 1}), 400, "extra")
    assert_error(post(server, path, {"reward": 1e400, "group": "g"}), 400, None)  # not JSON's number: invalid JSON
    assert_error(server.post(path, raw=b"not json", headers=AUTH), 400)
    assert_error(server.post(path, {"reward": 1.0, "group": "g"}), 401)  # no bearer token
    assert_error(server.request("GET", path, headers=AUTH), 405)
    assert sessions.stats()["rewarded_sessions"] >= 0


def test_open_sessions_are_bounded_with_a_429(served):
    server, sessions = served
    body = {"prompt": [3, 4], "max_tokens": 1}
    opened = []
    for i in range(4 - sessions.stats()["open_sessions"]):
        sid = f"open{i}"
        assert post(server, "/v1/completions", {**body, "metadata": {"paraloop_session": sid}}).status_code == 200
        opened.append(sid)
    assert_error(
        post(server, "/v1/completions", {**body, "metadata": {"paraloop_session": "one-more"}}),
        429,
        "metadata.paraloop_session",
    )
    assert post(server, "/v1/completions", body).status_code == 200  # untagged requests are not bounded by it
    for sid in opened:
        reward_group(sessions, server, sid)


def test_a_server_without_sessions_refuses_tagged_requests(tiny_model_path):
    with running_server(tiny_model_path) as server:
        body = {"prompt": [1, 2], "max_tokens": 1, "metadata": {"paraloop_session": "x"}}
        assert_error(server.post("/v1/completions", body), 400, "metadata.paraloop_session")
        assert_error(server.post("/v1/sessions/x/reward", {"reward": 1.0, "group": "g"}), 404)
        assert server.post("/v1/completions", {**body, "metadata": {"other": "x"}}).status_code == 200


def assert_still_serving_with_token(server) -> None:
    reply = server.post("/v1/completions", {"prompt": "Hello", "max_tokens": 1}, headers=AUTH)
    assert reply.status_code == 200, reply.text
