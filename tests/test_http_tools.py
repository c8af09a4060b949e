"""Tool calls and OpenAI's message rules on /v1/chat/completions, on the tiny random model.

The tiny model's template knows no tools, so the tools are described in a system message and calls are parsed in
json_tools' format; "required" and a named tool_choice are enforced by the grammar, so even random weights emit
well-formed calls whose arguments validate against the tool's parameters. Both decode paths (the CPU step and
mlx-lm's) are exercised.
"""

import json

import jsonschema
import pytest
from support.http_harness import running_server, sse_events

from paraloop.server.chat_rules import call_text

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "What is 2 + 3? Then say it back."}]
ADD = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": -99, "maximum": 99},
        "b": {"type": "integer", "minimum": -99, "maximum": 99},
    },
    "required": ["a", "b"],
    "additionalProperties": False,
}
ECHO = {
    "type": "object",
    "properties": {"text": {"type": "string", "maxLength": 12}},
    "required": ["text"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "add", "description": "a + b", "parameters": ADD}},
    {"type": "function", "function": {"name": "echo", "parameters": ECHO}},
]
SCHEMAS = {"add": ADD, "echo": ECHO}


@pytest.fixture(scope="module", params=["cpu", "mlx-lm"])
def server(request, tiny_model_path):
    with running_server(tiny_model_path, overrides={"engine": {"decode": request.param}}) as s:
        yield s


def chat(server, **body):
    reply = server.post(CHAT, {"messages": USER, "max_tokens": 512, **body})
    assert reply.status_code == 200, reply.text
    return reply.json()


def check_call(call: dict, names: set[str]) -> None:
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] in names
    jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])


def test_required_tool_choice_makes_every_sample_a_well_formed_call(server):
    answer = chat(server, tools=TOOLS, tool_choice="required", n=4, temperature=1.0, seed=3, max_tokens=512)
    for choice in answer["choices"]:
        assert choice["finish_reason"] == "tool_calls", choice
        assert choice["message"]["content"] is None
        assert choice["constrained"] is True
        calls = choice["message"]["tool_calls"]
        assert calls
        for call in calls:
            check_call(call, {"add", "echo"})


def test_a_named_tool_choice_calls_that_function_once_and_finishes_with_stop(server):
    named = {"type": "function", "function": {"name": "echo"}}
    answer = chat(server, tools=TOOLS, tool_choice=named, parallel_tool_calls=False, n=3, seed=5)
    for choice in answer["choices"]:
        assert choice["finish_reason"] == "stop"  # as OpenAI answers a named tool_choice
        (call,) = choice["message"]["tool_calls"]
        check_call(call, {"echo"})


def test_streamed_tool_call_deltas_reassemble_into_the_non_streamed_call(server):
    body = {"tools": TOOLS, "tool_choice": "required", "seed": 11, "temperature": 0.9}
    whole = chat(server, **body)["choices"][0]
    reply = server.post(CHAT, {"messages": USER, "max_tokens": 512, "stream": True, **body})
    assert reply.status_code == 200
    chunks = [e for e in sse_events(reply) if e != "[DONE]"]
    calls: dict[int, dict] = {}
    content = ""
    for chunk in chunks:
        delta = chunk["choices"][0]["delta"]
        content += delta.get("content") or ""
        for part in delta.get("tool_calls", []):  # OpenAI's shape: pieces keyed by index, arguments appended
            call = calls.setdefault(part["index"], {"id": part.get("id"), "name": "", "arguments": ""})
            call["name"] += part["function"].get("name") or ""
            call["arguments"] += part["function"].get("arguments") or ""
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"] == "tool_calls"
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in whole["message"]["tool_calls"]
    ]
    assert (content or None) == whole["message"]["content"]
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == whole["token_ids"]


def test_auto_tool_choice_answers_text_or_calls_and_tool_choice_none_never_parses(server):
    answer = chat(server, tools=TOOLS, max_tokens=8, seed=1)
    choice = answer["choices"][0]
    assert "constrained" not in choice  # the model chooses: nothing is enforced
    assert choice["finish_reason"] in ("length", "stop", "tool_calls")
    answer = chat(server, tools=TOOLS, tool_choice="none", max_tokens=8, seed=1)
    assert "tool_calls" not in answer["choices"][0]["message"]


def test_tools_with_a_response_format_answer_either_a_call_or_json_valid_under_the_schema(server):
    """The Agents SDK's `output_type` with tools: tool_choice "auto" and a json_schema response_format."""
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}
    answer = chat(server, tools=TOOLS, response_format=fmt, n=6, seed=2, max_tokens=512)
    kinds = set()
    for choice in answer["choices"]:
        assert choice["constrained"] is True
        if choice["message"].get("tool_calls"):
            assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
            for call in choice["message"]["tool_calls"]:
                check_call(call, {"add", "echo"})
            kinds.add("call")
        else:
            assert choice["finish_reason"] == "stop"
            jsonschema.validate(json.loads(choice["message"]["content"]), schema)
            kinds.add("json")
    assert kinds  # which of the two a random model picks is its own business


def test_a_history_with_calls_and_tool_results_is_accepted_and_rendered(server):
    history = [
        *USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}},
                {"id": "call_2", "type": "function", "function": {"name": "echo", "arguments": '{"text": "hi"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "hi"}]},
    ]
    answer = server.post(CHAT, {"messages": history, "tools": TOOLS, "max_tokens": 2})
    assert answer.status_code == 200, answer.text
    text = rendered(server, history)  # the template knows no tools: the calls are shown as the model writes them
    assert call_text("add", {"a": 2, "b": 3}) in text and call_text("echo", {"text": "hi"}) in text
    assert "<|im_start|>tool\n5<|im_end|>" in text


def rendered(server, history: list[dict]) -> str:
    from paraloop.server.prepare import chat_prompt
    from paraloop.server.schemas import ChatBody, decode
    from paraloop.server.tool_calls import tool_plan

    body = decode(json.dumps({"messages": history, "tools": TOOLS}).encode(), ChatBody, max_depth=32)
    tokenizer = server.engine.tokenizer
    tokens = chat_prompt(tokenizer, body, tool_plan(body, tokenizer), config=server.settings.engine)
    return tokenizer.decode(tokens)


def test_the_tool_prompt_lists_every_tool_when_the_template_knows_none(server):
    text = rendered(server, USER)
    assert "<tools>" in text and '"name": "add"' in text and '"name": "echo"' in text
    assert text.index("<tools>") < text.index(USER[0]["content"])


CALL = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}
BAD_MESSAGES = [
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "system"}], "messages[0].content"),
    ([{"role": "user", "content": None}], "messages[0].content"),
    ([*USER, {"role": "assistant"}], "messages[1].content"),
    ([{"role": "tool", "content": "5"}], "messages[0].tool_call_id"),
    ([{"role": "tool", "content": "5", "tool_call_id": "c1"}], "messages[0].tool_call_id"),
    (
        [*USER, {"role": "assistant", "tool_calls": [CALL]}, {"role": "tool", "tool_call_id": "c1"}],
        "messages[2].content",
    ),
    ([*USER, {"role": "assistant", "tool_calls": [CALL]}, {"role": "user", "content": "x"}], "messages[2].role"),
    ([*USER, {"role": "assistant", "tool_calls": [CALL, CALL]}], "messages[1].tool_calls"),
    ([{"role": "user", "content": "x", "tool_calls": [CALL]}], "messages[0].tool_calls"),
    ([{"role": "user", "content": "x", "tool_call_id": "c1"}], "messages[0].tool_call_id"),
    (
        [*USER, {"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "{}"}}]}],
        "messages[1].tool_calls[0].type",
    ),
    (
        [*USER, {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f"}}]}],
        "messages[1].tool_calls[0].function.arguments",
    ),
]


@pytest.mark.parametrize(("messages", "param"), BAD_MESSAGES)
def test_openai_message_rules_are_a_400_naming_the_field(server, messages, param):
    reply = server.post(CHAT, {"messages": messages, "max_tokens": 1})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


BAD_TOOLS = [
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
    ({"tools": [*TOOLS, TOOLS[0]]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ({"tools": TOOLS, "tool_choice": "any"}, "tool_choice"),
    (
        {
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}],
            "tool_choice": "required",
        },
        "tools",
    ),
    ({"tools": TOOLS, "tool_choice": "required", "ignore_eos": True}, "ignore_eos"),
]


@pytest.mark.parametrize(("fields", "param"), BAD_TOOLS)
def test_bad_tool_fields_are_a_400_naming_the_field(server, fields, param):
    reply = server.post(CHAT, {"messages": USER, "max_tokens": 1, **fields})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param
