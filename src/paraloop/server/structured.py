"""Constrained output for /v1/chat/completions: `response_format` (json_object, json_schema) and a required or
named `tool_choice` as a grammar the engine's rows sample within.

In: the decoded body, the tool plan (tool_calls.py), the tokenizer and [server] max_schema_bytes. Out: the grammar's
source (`grammar_source`), then compiled (`compile_source`) for SamplingParams.grammar; a 400 naming the field for a
schema too large or using a
feature llguidance does not implement (its message names the keyword, e.g. `Unimplemented keys: ["not"]`).

JSON comes out compact (no optional whitespace). Schemas are bounded before compiling: size here, nesting by the
body decoder (server.max_json_depth), and the compile and every mask step by llguidance's fuel limits.
"""

import json
from typing import Any

from paraloop.engine.grammar import Grammar, GrammarError, compile_grammar, json_schema_grammar, lark_grammar
from paraloop.server.errors import bad_request
from paraloop.server.schemas import ChatBody, JsonObjectFormat, JsonSchemaFormat, Tool
from paraloop.server.tool_calls import ToolPlan

ANY_OBJECT = {"type": "object"}
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


def compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def check_size(text: str, *, field: str, max_bytes: int) -> None:
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise bad_request(field, f"{size} bytes of JSON schema, more than server.max_schema_bytes={max_bytes}")


def call_schema(tool: Tool) -> dict[str, Any]:
    """One call of `tool` as json_tools writes it: {"name": ..., "arguments": {...}} (the name first)."""
    return {
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, "arguments": tool.function.parameters or NO_ARGUMENTS},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def tool_grammar(
    plan: ToolPlan, *, max_bytes: int, answer: tuple[dict[str, Any], str] | None = None
) -> tuple[str, str]:
    """(grammar, the field it came from): one call (or, with parallel_tool_calls, one or more) of the forced tool or
    of any tool, in json_tools' format, and nothing else; with `answer` (a response_format schema and its field,
    tool_choice "auto"), either those calls or a JSON answer valid under the schema (errors then name the schema's
    field, llguidance's message the keyword)."""
    tools = [t for t in plan.tools if plan.forced in (None, "required", t.function.name)]
    schema = {"anyOf": [call_schema(t) for t in tools], "x-guidance": {"whitespace_flexible": False}}
    text = compact(schema)
    check_size(text, field="tools", max_bytes=max_bytes)
    start, end = plan.format.start, plan.format.end
    calls = 'call ("\\n" call)*' if plan.parallel else "call"
    lark = f"start: {calls}\ncall: {compact(start + chr(10))} %json {text} {compact(chr(10) + end)}\n"
    field = "tools"
    if answer is not None:
        answer_schema, field = answer
        answer_text = compact({**answer_schema, "x-guidance": {"whitespace_flexible": False}})
        check_size(answer_text, field=field, max_bytes=max_bytes)
        lark = lark.replace("start: ", "start: answer | ", 1) + f"answer: %json {answer_text}\n"
    try:
        return lark_grammar(lark), field
    except GrammarError as e:
        raise bad_request(field, f"invalid schema: {e}") from None


def format_schema(body: ChatBody, *, max_bytes: int) -> tuple[dict[str, Any], str] | None:
    """The schema `response_format` asks for and its field, or None for free text."""
    fmt = body.response_format
    if isinstance(fmt, JsonObjectFormat):
        return ANY_OBJECT, "response_format"
    if isinstance(fmt, JsonSchemaFormat):
        schema = ANY_OBJECT if fmt.json_schema.schema is None else fmt.json_schema.schema
        field = "response_format.json_schema.schema"
        check_size(compact(schema), field=field, max_bytes=max_bytes)
        return schema, field
    return None


def grammar_source(body: ChatBody, plan: ToolPlan | None, *, max_bytes: int) -> tuple[str, str] | None:
    """(grammar, the field it comes from) the request's rows sample within, or None when the output is free."""
    answer = format_schema(body, max_bytes=max_bytes)
    if plan is not None and plan.parse:
        if plan.forced is not None:  # the answer is a call: response_format is for a later, text answer
            return tool_grammar(plan, max_bytes=max_bytes)
        if answer is None:
            return None
        if plan.format.name != "json_tools":
            raise bad_request(
                "response_format",
                "with tools it is enforced only in the json_tools call format; "
                f"this model writes calls as {plan.format.name}",
            )
        return tool_grammar(plan, max_bytes=max_bytes, answer=answer)
    if answer is None:
        return None
    schema, field = answer
    try:
        return json_schema_grammar(schema), field
    except GrammarError as e:
        raise bad_request(field, f"invalid JSON schema: {e}") from None


def compile_source(source: tuple[str, str], tokenizer: Any) -> Grammar:
    """Compile (off the event loop: the first call also builds llguidance's view of the vocabulary, seconds for a
    large one); 400 naming the field when llguidance refuses the schema."""
    grammar, field = source
    try:
        return compile_grammar(grammar, tokenizer)
    except GrammarError as e:
        raise bad_request(field, f"unsupported or invalid JSON schema: {e}") from None
