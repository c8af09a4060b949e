"""GET /openapi.json documents every route paraloop serves, with the request schemas it really decodes and the
limits it is configured with; it stays in step with the router because it is built from it."""

import json

import pytest

from support.http_harness import running_server
from paraloop.config import AgentSessionsConfig
from paraloop.run.agent_sessions import AgentSessions
from paraloop.run.control import LearnerControl, control_routes
from paraloop.run.session_routes import session_routes
from paraloop.run.status import RunStatus
from paraloop.server.openapi import BODIES, SUMMARIES, routes_of

EXPECTED = {
    ("/v1/completions", "post"),
    ("/v1/chat/completions", "post"),
    ("/generate", "post"),
    ("/v1/models", "get"),
    ("/health", "get"),
    ("/openapi.json", "get"),
    ("/control/status", "get"),
    ("/control/pause", "post"),
    ("/control/resume", "post"),
    ("/control/step", "post"),
    ("/control/snapshot", "post"),
    ("/control/stop", "post"),
    ("/metrics", "get"),
    ("/v1/load_lora_adapter", "post"),
    ("/v1/unload_lora_adapter", "post"),
    ("/v1/sessions/{session_id}/reward", "post"),
}
MINIMAL = {
    "/v1/completions": {"prompt": "hi", "max_tokens": 1},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    "/generate": {"prompt": {"prompt_token_ids": [5, 6]}, "max_tokens": 1},
    "/v1/load_lora_adapter": {"lora_name": "x", "lora_path": "/nonexistent"},
    "/v1/unload_lora_adapter": {"lora_name": "x"},
    "/v1/sessions/{session_id}/reward": {"reward": 1.0, "group": "g"},
}


@pytest.fixture(scope="module")
def server(tiny_model_path):
    status = RunStatus(total_steps=1, mode="sync", run_dir="unused")
    sessions = AgentSessions(AgentSessionsConfig(), batch_size=8)  # a run in sessions mode: its reward route
    with running_server(
        tiny_model_path,
        overrides={"engine": {"max_n": 3, "max_tokens_limit": 77}},
        extra_routes=[*control_routes(status, LearnerControl(status)), *session_routes(sessions)],
        turns=sessions,
    ) as s:
        yield s


@pytest.fixture(scope="module")
def doc(server) -> dict:
    reply = server.get("/openapi.json")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("application/json")
    return reply.json()


def operations(doc: dict) -> set[tuple[str, str]]:
    return {(path, method) for path, ops in doc["paths"].items() for method in ops}


def test_every_route_the_app_serves_is_documented_and_nothing_else(server, doc):
    assert doc["openapi"].startswith("3.1")
    served = {(path, method.lower()) for path, method in routes_of(server.app)}
    assert operations(doc) == served == EXPECTED
    for path, ops in doc["paths"].items():
        for op in ops.values():
            assert op["summary"] == SUMMARIES[path] and {"200", "400", "429"} <= set(op["responses"])


def test_query_parameters_are_documented(server, doc):
    [timeout] = doc["paths"]["/control/step"]["post"]["parameters"]
    assert timeout["name"] == "timeout" and timeout["in"] == "query"
    reply = server.post("/control/step?timeout=-1", {})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "timeout"


def test_every_reference_resolves(doc):
    text = json.dumps(doc)
    names = set(doc["components"]["schemas"])
    refs = {part.split('"')[0] for part in text.split('"$ref": "#/components/schemas/')[1:]}
    assert refs and refs <= names


def concrete(path: str) -> str:
    """A documented path with its parameters filled in (an unknown session: answered 404 once the body decodes)."""
    return path.replace("{session_id}", "nobody")


@pytest.mark.parametrize("path", list(BODIES))
def test_each_documented_body_field_is_accepted_and_an_undocumented_one_refused(server, doc, path):
    ref = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert schema["additionalProperties"] is False
    assert set(schema.get("required", [])) <= set(MINIMAL[path])
    for name, prop in schema["properties"].items():
        value = prop.get("default")
        body = {**MINIMAL[path], name: value} if name not in MINIMAL[path] else MINIMAL[path]
        reply = server.post(concrete(path), body)
        if reply.status_code != 200:  # e.g. a field only accepted at some values; never an unknown one
            assert "unrecognized" not in reply.json()["error"]["message"], (name, reply.text)
    reply = server.post(concrete(path), {**MINIMAL[path], "not_a_field": 1})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "not_a_field"


def test_the_configured_limits_are_in_the_schemas(doc):
    schemas = doc["components"]["schemas"]
    for name in ("CompletionBody", "ChatBody", "GenerateBody"):
        props = schemas[name]["properties"]
        assert {"type": "integer", "minimum": 1, "maximum": 3} in props["n"]["anyOf"]
        assert any(alt.get("maximum") == 77 for alt in props["max_tokens"]["anyOf"])


def test_a_post_route_documented_without_a_body_refuses_one(server, doc):
    for path, ops in doc["paths"].items():
        if "post" in ops and "requestBody" not in ops["post"]:
            reply = server.post(path, {"surprise": 1})
            assert reply.status_code == 400 and reply.json()["error"]["param"] == "surprise", path


def test_with_a_control_token_the_document_says_so_and_health_stays_open(tiny_model_path):
    with running_server(tiny_model_path, overrides={"server": {"control_token": "t0k"}}) as s:
        assert s.get("/openapi.json").status_code == 401
        doc = s.get("/openapi.json", headers={"Authorization": "Bearer t0k"}).json()
    assert doc["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    assert doc["security"] == [{"bearer": []}] and doc["paths"]["/health"]["get"]["security"] == []
    assert "security" not in doc["paths"]["/v1/completions"]["post"]
