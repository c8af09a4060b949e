"""OpenAI's rules for a chat's messages, and the messages as a chat template reads them.

In: the decoded messages of /v1/chat/completions. Out: nothing or a 400 naming the field (`check_messages`: a user
message without content, a tool message without tool_call_id, a tool message answering no call, ... as OpenAI
refuses them), and the list of dicts handed to the template (`template_messages`).

A template that knows no tools (no `tools` in its source) reads an assistant's calls as text in the format the
tool prompt asked for (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`, tool_calls.py), so the model sees
what it called; a template that knows tools gets them as OpenAI sends them, with the arguments decoded from JSON
(the form Hugging Face templates expect).
"""

import json
from typing import Any

from paraloop.server.errors import bad_request
from paraloop.server.schemas import ChatMessage, ToolCall

CONTENT_REQUIRED = frozenset({"system", "developer", "user", "tool"})


def check_messages(messages: list[ChatMessage]) -> None:
    """Each role's required and forbidden fields, and the tool protocol: a tool message answers a call of the
    assistant message before it, and every call is answered before the conversation goes on."""
    open_calls: set[str] = set()  # ids of the last assistant message's calls not answered yet
    for i, message in enumerate(messages):
        field = f"messages[{i}]"
        role = message.role
        if role in CONTENT_REQUIRED and message.content is None:
            raise bad_request(f"{field}.content", f"required for a {role} message")
        if role == "assistant" and message.content is None and not message.tool_calls and message.refusal is None:
            raise bad_request(f"{field}.content", "required for an assistant message unless it has tool_calls")
        if message.tool_calls is not None and role != "assistant":
            raise bad_request(f"{field}.tool_calls", f"only assistant messages carry tool calls, not {role} ones")
        if message.refusal is not None and role != "assistant":
            raise bad_request(f"{field}.refusal", f"only assistant messages carry a refusal, not {role} ones")
        if role == "tool":
            if message.tool_call_id is None:
                raise bad_request(f"{field}.tool_call_id", "required for a tool message")
            if message.tool_call_id not in open_calls:
                raise bad_request(
                    f"{field}.tool_call_id",
                    f"{message.tool_call_id!r} answers no tool call of the assistant message before it",
                )
            open_calls.discard(message.tool_call_id)
            continue
        if message.tool_call_id is not None:
            raise bad_request(f"{field}.tool_call_id", f"only tool messages carry one, not {role} ones")
        if open_calls:
            raise bad_request(
                f"{field}.role",
                "the assistant's tool calls must each be answered by a tool message "
                f"first (not answered: {', '.join(sorted(open_calls))})",
            )
        if role == "assistant" and message.tool_calls:
            ids = [call.id for call in message.tool_calls]
            if len(set(ids)) != len(ids):
                raise bad_request(f"{field}.tool_calls", "two calls share an id")
            open_calls = set(ids)


def message_text(i: int, message: ChatMessage) -> str:
    """The message's content as text (content parts: only text is understood)."""
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise bad_request(
                f"messages[{i}].content[{j}].type", f"only text content parts are supported, not {part.type!r}"
            )
        texts.append(part.text)
    return "".join(texts)


def decoded_arguments(arguments: str) -> Any:
    """Arguments as templates expect them (a dict); text that is not a JSON object stays as it was sent."""
    try:
        value = json.loads(arguments)
    except (ValueError, RecursionError):  # not JSON, or nested deeper than Python's parser goes
        return arguments
    return value if isinstance(value, dict) else arguments


def call_text(name: str, arguments: Any) -> str:
    """A call in the format the fallback tool prompt asks for (json_tools' format)."""
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + "\n</tool_call>"


def template_call(call: ToolCall) -> dict[str, Any]:
    arguments = decoded_arguments(call.function.arguments)
    return {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}}


def template_messages(messages: list[ChatMessage], *, template_knows_tools: bool) -> list[dict[str, Any]]:
    out = []
    for i, message in enumerate(messages):
        entry: dict[str, Any] = {"role": message.role, "content": message_text(i, message)}
        if message.name is not None:
            entry["name"] = message.name
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        if message.tool_calls:
            if template_knows_tools:
                entry["tool_calls"] = [template_call(call) for call in message.tool_calls]
            else:
                calls = [
                    call_text(c.function.name, decoded_arguments(c.function.arguments)) for c in message.tool_calls
                ]
                entry["content"] = "\n".join(filter(None, [entry["content"], *calls]))
        out.append(entry)
    return out
