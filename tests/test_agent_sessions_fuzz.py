"""Fuzzing a server that records agent sessions (the tiny model, the real engine, a run's sessions store and reward
route) from its own /openapi.json, with the session strategies weighted up: every answer in time, never a 5xx,
errors in OpenAI's shape; afterwards no turn is left in flight, every bound held, and it still serves."""

import http.client
import json
import os
import time

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from support.fuzz_requests import FuzzRequest, requests, session_requests
from support.http_harness import running_server

from paraloop.config import AgentSessionsConfig
from paraloop.run.agent_sessions import AgentSessions
from paraloop.run.session_routes import session_routes

EXAMPLES = int(os.environ.get("PARALOOP_SESSIONS_FUZZ_EXAMPLES", "400"))
ANSWER_DEADLINE_S = 20.0
CONFIG = AgentSessionsConfig(group_size=2, max_open=3, max_session_tokens=96, max_waiting_groups=2)

pytestmark = pytest.mark.timeout(600)


def send(port: int, req: FuzzRequest) -> tuple[int, bytes, float]:
    start = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=ANSWER_DEADLINE_S)
    try:
        conn.request(req.method, req.path, body=req.body, headers=dict(req.headers) if req.body is not None else {})
        resp = conn.getresponse()
        return resp.status, resp.read(), time.monotonic() - start
    finally:
        conn.close()


def test_fuzzing_a_sessions_server_never_gets_a_5xx_a_hang_or_a_broken_bound(tiny_model_path):
    sessions = AgentSessions(CONFIG, batch_size=8)
    overrides = {"engine": {"max_n": 2, "max_tokens_limit": 8, "default_max_tokens": 4}}
    with running_server(
        tiny_model_path, overrides=overrides, extra_routes=session_routes(sessions), turns=sessions
    ) as server:
        doc = server.get("/openapi.json").json()
        assert "/v1/sessions/{session_id}/reward" in doc["paths"]
        statuses: dict[int, int] = {}

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(st.one_of(session_requests(), session_requests(), requests(doc)))
        def fuzz(req: FuzzRequest) -> None:
            status, body, took = send(server.port, req)
            statuses[status] = statuses.get(status, 0) + 1
            assert took < ANSWER_DEADLINE_S, (req, took)
            assert status < 500, (req, status, body[:500])
            if status >= 400:
                error = json.loads(body)["error"]
                assert set(error) == {"message", "type", "param", "code"}, body[:500]
            stats = sessions.stats()
            assert stats["turns_in_flight"] == 0, (req, stats)  # a turn's end runs however its request ended
            assert stats["open_sessions"] <= CONFIG.max_open
            assert stats["groups_waiting"] + stats["unfinished_groups"] <= CONFIG.max_waiting_groups
            assert all(s.tokens <= CONFIG.max_session_tokens for s in sessions.sessions.values())

        fuzz()
        print(f"sessions fuzz: statuses {sorted(statuses.items())}, store {sessions.stats()}")
        stats = sessions.stats()
        assert stats["turns"] > 0 and stats["rewarded_sessions"] > 0, stats  # the fuzz reached both sides
        assert statuses.get(200, 0) > 0 and statuses.get(404, 0) > 0 and statuses.get(429, 0) > 0, statuses
        reply = server.post("/v1/completions", {"prompt": "Hello", "max_tokens": 1})
        assert reply.status_code == 200, reply.text
