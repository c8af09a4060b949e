"""Tool calls on /v1/chat/completions: the model family's call format, the prompt that offers the tools, and the
calls parsed out of generated text (whole, or as it streams).

In: the request's `tools`, `tool_choice`, `parallel_tool_calls` and the tokenizer (mlx-lm's TokenizerWrapper names
its family's parser from `mlx_lm.tool_parsers`, inferred from the chat template). Out: a `ToolFormat` (markers and
parser), the template's arguments or a system message describing the tools, and `ToolSplitter`, which turns text
into content and OpenAI-shaped calls.

A model whose template names no tool format gets json_tools' format (`<tool_call>{"name", "arguments"}</tool_call>`,
as Hermes and Qwen use) described in a system message. "required" and a named tool_choice are enforced by a grammar
(structured.py) only in that format; other families' formats are parsed but not enforced (a 400 says so).
"""

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from mlx_lm.tool_parsers import json_tools

from paraloop.server.chat_rules import call_text
from paraloop.server.errors import bad_request
from paraloop.server.schemas import ChatBody, NamedToolChoice, Tool

FALLBACK_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
{example}"""


@dataclass(frozen=True)
class ToolFormat:
    """How a model family writes calls: text between `start` and `end` (end "" means: to the end of the text),
    parsed by `parse(text, tools)` into {"name", "arguments"} dicts (one or a list)."""

    name: str
    start: str
    end: str
    parse: Any
    in_template: bool  # the chat template renders `tools` itself


def template_knows_tools(tokenizer: Any) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template


def tool_format(tokenizer: Any) -> ToolFormat:
    """The family's format from mlx-lm's parsers, or json_tools' as the fallback."""
    parser = getattr(tokenizer, "tool_parser", None)
    in_template = template_knows_tools(tokenizer)
    if getattr(tokenizer, "has_tool_calling", False) and parser is not None:
        module = parser.__module__.rsplit(".", 1)[-1]
        return ToolFormat(module, tokenizer.tool_call_start, tokenizer.tool_call_end or "", parser, in_template)
    return ToolFormat(
        "json_tools", json_tools.tool_call_start, json_tools.tool_call_end, json_tools.parse_tool_call, in_template
    )


def tool_dicts(tools: list[Tool]) -> list[dict[str, Any]]:
    out = []
    for tool in tools:
        function: dict[str, Any] = {"name": tool.function.name}
        if tool.function.description is not None:
            function["description"] = tool.function.description
        function["parameters"] = tool.function.parameters or {"type": "object", "properties": {}}
        out.append({"type": "function", "function": function})
    return out


def fallback_system_prompt(tools: list[Tool]) -> str:
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tool_dicts(tools))
    return FALLBACK_PROMPT.format(tools=listing, example=call_text("<function-name>", "<args-json-object>"))


def add_tool_prompt(messages: list[dict[str, Any]], tools: list[Tool]) -> list[dict[str, Any]]:
    """A template without tools: describe them in the system message (appended to the first one, or a new one)."""
    text = fallback_system_prompt(tools)
    if messages and messages[0]["role"] in ("system", "developer"):
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{text}" if messages[0]["content"] else text}
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


@dataclass(frozen=True)
class ToolPlan:
    """What a request asks of tools: the tools offered, whether calls are parsed out, and which are enforced."""

    tools: list[Tool]
    format: ToolFormat
    parse: bool  # tool_choice is not "none"
    forced: str | None  # "required", a function's name, or None (the model chooses)
    parallel: bool

    @property
    def named(self) -> bool:
        return self.forced is not None and self.forced != "required"


def tool_plan(body: ChatBody, tokenizer: Any) -> ToolPlan | None:
    """None when the request offers no tools; 400 for a tool_choice that cannot be honoured."""
    choice = body.tool_choice
    if not body.tools:
        if choice is not None and choice != "none":
            raise bad_request("tool_choice", "requires tools")
        return None  # parallel_tool_calls alone is accepted, as OpenAI accepts it
    names = [t.function.name for t in body.tools]
    if len(set(names)) != len(names):
        raise bad_request("tools", "two tools share a name")
    forced: str | None = None
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise bad_request("tool_choice.function.name", f"{choice.function.name!r} names none of the tools")
        forced = choice.function.name
    elif choice == "required":
        forced = "required"
    fmt = tool_format(tokenizer)
    if forced is not None and fmt.name != "json_tools":
        raise bad_request(
            "tool_choice",
            f"{choice if isinstance(choice, str) else 'a named function'} is enforced "
            f"only in the json_tools call format; this model writes calls as {fmt.name} (use 'auto')",
        )
    return ToolPlan(list(body.tools), fmt, choice != "none", forced, body.parallel_tool_calls is not False)


def call_object(parsed: dict[str, Any], index: int) -> dict[str, Any]:
    arguments = parsed.get("arguments", {})
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False, default=str)
    call_id = parsed.get("id") if isinstance(parsed.get("id"), str) else f"call_{uuid.uuid4().hex[:24]}"
    return {
        "index": index,
        "id": call_id,
        "type": "function",
        "function": {"name": str(parsed.get("name", "")), "arguments": text},
    }


@dataclass
class ToolSplitter:
    """Text in, content and calls out, as the text arrives: text that may begin a call's start marker is held back
    until the next text settles it; a call is parsed once its end marker (or the end of the text) is seen. A call
    the family's parser cannot read is handed back as content, so no generated text is lost."""

    plan: ToolPlan
    tool_dicts: list[dict[str, Any]] = field(default_factory=list)
    calls: int = 0
    _pending: str = ""
    _inside: bool = False
    _space: str = ""  # whitespace held back: dropped if a call follows it, released with the next text otherwise

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """Content that can be released now, and the calls completed by `text`."""
        fmt, content, calls = self.plan.format, [], []
        buf = self._pending + text
        while True:
            if not self._inside:
                at = buf.find(fmt.start)
                if at < 0:
                    hold = held_prefix(buf, fmt.start)
                    content.append(self._text(buf[: len(buf) - hold]))
                    self._pending = buf[len(buf) - hold :]
                    break
                content.append(self._text(buf[:at]))
                self._space = ""  # whitespace before a call separates calls: it is not content
                buf, self._inside = buf[at + len(fmt.start) :], True
            if not fmt.end:  # the call runs to the end of the text
                self._pending = buf
                break
            end = buf.find(fmt.end)
            if end < 0:
                self._pending = buf
                break
            text_of_call, buf = buf[:end], buf[end + len(fmt.end) :]
            self._inside = False
            parsed = self._parse(text_of_call)
            if parsed is None:
                content.append(fmt.start + text_of_call + fmt.end)
            else:
                calls.extend(parsed)
        return "".join(content), calls

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """The end of the text: a call without its end marker is parsed as it stands (truncated ones fail)."""
        pending, self._pending = self._pending, ""
        if not self._inside:
            text = self._text(pending)
            return text + ("" if self.calls else self._space), []
        self._inside = False
        parsed = self._parse(pending)
        if parsed is None:
            return self.plan.format.start + pending, []
        return "", parsed

    def _text(self, text: str) -> str:
        """Content to release now: held whitespace goes out with the next text that is not whitespace."""
        if not text:
            return ""
        body = text.rstrip()
        if not body:
            self._space += text
            return ""
        out, self._space = self._space + body, text[len(body) :]
        return out

    def _parse(self, text: str) -> list[dict[str, Any]] | None:
        try:
            parsed = self.plan.format.parse(text, self.tool_dicts)
        except Exception:  # a family parser raises whatever its format's reader raises
            return None
        items = parsed if isinstance(parsed, list) else [parsed]
        if not all(isinstance(p, dict) and isinstance(p.get("name"), str) for p in items):
            return None
        out = []
        for p in items:
            if self.calls and not self.plan.parallel:
                break  # parallel_tool_calls = false: the first call only
            out.append(call_object(p, self.calls))
            self.calls += 1
        return out


def held_prefix(buf: str, marker: str) -> int:
    """Length of the longest suffix of `buf` that is a proper prefix of `marker`."""
    for k in range(min(len(marker) - 1, len(buf)), 0, -1):
        if buf.endswith(marker[:k]):
            return k
    return 0


def split_calls(plan: ToolPlan, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """A whole completion's content (None when only calls were made) and its calls (without stream indices)."""
    splitter = ToolSplitter(plan, tool_dicts(plan.tools))
    content, calls = splitter.feed(text)
    rest, more = splitter.finish()
    content, calls = content + rest, calls + more
    for call in calls:
        del call["index"]
    return (None if calls and not content else content), calls


def finish_reason(plan: ToolPlan, finish: str | None, made_calls: bool) -> str | None:
    """OpenAI's: "tool_calls" when the model chose to call, "stop" when a named tool_choice made it call."""
    if finish == "stop" and made_calls and not plan.named:
        return "tool_calls"
    return finish
