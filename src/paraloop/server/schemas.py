"""Typed request bodies: JSON bytes in, msgspec Structs (or a 400 naming the bad field) out.

Three bodies: OpenAI's /v1/completions and /v1/chat/completions, and vLLM's /generate (as Atropos sends it).
Unknown fields are rejected rather than silently ignored, so a sampling knob paraloop does not implement never
changes nothing quietly; the penalty knobs are accepted only at their neutral values for the same reason.
`sampling_params` turns a decoded body into the engine's SamplingParams with the configured limits applied.
"""

import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta

from paraloop.config import EngineConfig
from paraloop.engine.filtering import MAX_TEMPERATURE
from paraloop.messages import SamplingParams
from paraloop.server.errors import APIError, bad_request

INT64 = (-(2**63), 2**63 - 1)  # every integer field is bounded: JSON integers are otherwise unbounded

Int = Annotated[int, Meta(ge=INT64[0], le=INT64[1])]
Count = Annotated[int, Meta(ge=1, le=INT64[1])]  # n, max_tokens: the engine's limits apply on top
NonNegInt = Annotated[int, Meta(ge=0, le=INT64[1])]
TokenId = Annotated[int, Meta(ge=0, le=INT64[1])]  # the vocabulary is checked by the engine
Temperature = Annotated[float, Meta(ge=0, le=MAX_TEMPERATURE)]  # under 1e-5: greedy
Probability = Annotated[float, Meta(ge=0, le=1)]
TopP = Annotated[float, Meta(gt=0, le=1)]
Seed = Int
TokenIds = list[TokenId]


class Body(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Base of request bodies; `None` everywhere means "not given" (clients send explicit nulls)."""


class Sampling(Body, kw_only=True):
    model: str | None = None  # the served name (default adapter), "policy", "base" or a named adapter
    n: Count | None = None
    max_tokens: Count | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, Meta(ge=-1, le=INT64[1])] | None = None  # 0 or -1 (vLLM): off
    min_p: Probability | None = None
    stop: str | list[str] | None = None
    stop_token_ids: TokenIds | None = None
    ignore_eos: bool | None = None
    seed: Seed | None = None
    stream: bool | None = None
    frequency_penalty: float | None = None  # accepted only at the neutral value
    presence_penalty: float | None = None
    repetition_penalty: float | None = None


class StreamOptions(Body, kw_only=True):
    include_usage: bool = False


# OpenAI's metadata: at most 16 pairs, keys up to 64 characters, values up to 512. paraloop reads one key,
# `paraloop_session` (server/session_turns.py); the others are accepted and not used.
Metadata = Annotated[
    dict[Annotated[str, Meta(max_length=64)], Annotated[str, Meta(max_length=512)]], Meta(max_length=16)
]


class OpenAISampling(Sampling, kw_only=True):
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted, not used
    metadata: Metadata | None = None


# One prompt: text, token ids, or a batch of one of either (["text"], [[ids]]); checked by `prompt_tokens_of`.
Prompt = str | list[TokenId | str | TokenIds]


class CompletionBody(OpenAISampling, kw_only=True):
    prompt: Prompt
    max_tokens: NonNegInt | None = None  # 0 with echo or prompt_logprobs: score the prompt, generate nothing
    logprobs: NonNegInt | None = None
    echo: bool | None = None
    prompt_logprobs: NonNegInt | None = None  # vLLM's: log-probs of the prompt's tokens, with this many alternatives
    best_of: Count | None = None
    suffix: str | None = None


class ContentPart(msgspec.Struct, kw_only=True):
    """A content part; only {"type": "text", "text": ...} is supported (others are refused, never fetched)."""

    type: str
    text: str | None = None


class FunctionCall(Body, kw_only=True):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(Body, kw_only=True):
    """A call an assistant message made (OpenAI's shape; every field is required, as OpenAI requires it)."""

    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(Body, kw_only=True):
    """One message; which fields each role needs is checked by chat_rules.check_messages, as OpenAI checks it."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None  # an assistant message's refusal, as OpenAI returns it


class FunctionDef(Body, kw_only=True):
    name: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")]  # OpenAI's rule
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema (checked when it is compiled into a grammar)
    strict: bool | None = None


class Tool(Body, kw_only=True):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(Body, kw_only=True):
    name: str


class NamedToolChoice(Body, kw_only=True):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["auto", "none", "required"] | NamedToolChoice


class TextFormat(Body, kw_only=True, tag_field="type", tag="text"):
    pass


class JsonObjectFormat(Body, kw_only=True, tag_field="type", tag="json_object"):
    pass


class JsonSchemaSpec(Body, kw_only=True):
    name: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")]
    description: str | None = None
    schema: dict[str, Any] | None = None  # absent: any JSON object (OpenAI's default)
    strict: bool | None = None


class JsonSchemaFormat(Body, kw_only=True, tag_field="type", tag="json_schema"):
    json_schema: JsonSchemaSpec


ResponseFormat = TextFormat | JsonObjectFormat | JsonSchemaFormat


class ChatBody(OpenAISampling, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: Count | None = None
    logprobs: bool | None = None
    top_logprobs: NonNegInt | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None  # e.g. {"enable_thinking": false} for Qwen3
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None


class SessionRewardBody(Body, kw_only=True):
    """POST /v1/sessions/{session_id}/reward (run/session_routes.py): the session's reward and its group's key."""

    reward: float
    group: Annotated[str, Meta(min_length=1, max_length=128)]


class PromptObject(Body, kw_only=True):
    """vLLM's prompt object: exactly one of the two fields."""

    prompt_token_ids: TokenIds | None = None
    prompt: str | None = None


class GenerateBody(Sampling, kw_only=True):
    """vLLM's /generate: the prompt plus SamplingParams fields at the top level."""

    prompt: str | PromptObject | list[TokenId | str | TokenIds]
    logprobs: NonNegInt | None = None
    prompt_logprobs: NonNegInt | None = None  # vLLM's: log-probs of the prompt's tokens, with this many alternatives


B = TypeVar("B", bound=Body)
_AT = re.compile(r" - at `\$(.*)`$")
_FIELD = re.compile(r"(?:unknown|missing required) field `([^`]+)`")


def decode(body: bytes, kind: type[B], *, max_depth: int) -> B:
    """Decode a JSON body into `kind`, or raise a 400 naming the offending field. Free-form fields (`Any`) are
    bounded like the rest: nesting at most `max_depth` deep, integers within int64, finite numbers."""
    if not body.strip():
        raise bad_request(None, "request body is empty (expected a JSON object)")
    try:
        decoded = msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as e:
        raise _validation_error(str(e)) from None
    except msgspec.DecodeError as e:
        raise APIError(400, f"invalid JSON: {e}", code="invalid_json") from None
    except UnicodeDecodeError as e:  # invalid UTF-8 inside a string
        raise APIError(
            400, f"invalid JSON: the body is not valid UTF-8 ({e.reason} at byte {e.start})", code="invalid_json"
        ) from None
    except RecursionError:
        raise APIError(400, f"invalid JSON: nested more than {max_depth} levels deep", code="invalid_json") from None
    for path, value, depth in free_form_fields(decoded):
        check_free_form(value, field=path, depth=depth, max_depth=max_depth)
    return decoded


def free_form_fields(body: Body) -> list[tuple[str, Any, int]]:
    """(path, value, nesting depth of the value) of each free-form field a body holds."""
    out: list[tuple[str, Any, int]] = []
    if isinstance(body, ChatBody):
        if body.chat_template_kwargs is not None:
            out.append(("chat_template_kwargs", body.chat_template_kwargs, 2))
        for i, tool in enumerate(body.tools or ()):
            if tool.function.parameters is not None:
                out.append((f"tools[{i}].function.parameters", tool.function.parameters, 4))
        fmt = body.response_format
        if isinstance(fmt, JsonSchemaFormat) and fmt.json_schema.schema is not None:
            out.append(("response_format.json_schema.schema", fmt.json_schema.schema, 4))
    return out


def check_free_form(value: Any, *, field: str, depth: int, max_depth: int) -> None:
    """Walk a decoded JSON value without recursion: 400 naming the field for deep nesting or a huge integer."""
    stack = [(value, depth)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            if level > max_depth:
                raise bad_request(field, f"nested more than {max_depth} levels deep (server.max_json_depth)")
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
        elif type(item) is int and not INT64[0] <= item <= INT64[1]:
            raise bad_request(field, "an integer outside the 64-bit range")


def _validation_error(text: str) -> APIError:
    m = _AT.search(text)
    path = m.group(1).lstrip(".") if m else ""
    message = _AT.sub("", text)
    field = _FIELD.search(message)
    if field:  # point at the field itself, not its enclosing object
        path = f"{path}.{field.group(1)}" if path else field.group(1)
        if "unknown field" in message:
            message = "unrecognized request argument (not supported by paraloop)"
        else:
            message = "required field is missing"
    if not path and message.startswith("Expected `object`"):
        return bad_request(None, "request body must be a JSON object")
    return bad_request(path or None, message)


def prompt_tokens_of(prompt: Any, *, field: str, text: bool = True) -> list[int] | str:
    """One prompt: a string (returned as is, to be encoded; only if `text`) or a list of token ids.
    A batch of one is unwrapped."""
    if not text and not isinstance(prompt, list):
        raise bad_request(field, "expected a non-empty list of token ids")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request(field, "prompt is empty")
        return prompt
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        if min(prompt) < 0:
            raise bad_request(field, "token ids must be >= 0")
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise bad_request(field, "a batch of prompts is not supported: send one request per prompt (use n for samples)")
    raise bad_request(field, "expected a non-empty string or a non-empty list of token ids")


def check_neutral(body: Sampling) -> None:
    """Penalties are not implemented: accept them only where they change nothing."""
    for name, neutral in (("frequency_penalty", 0.0), ("presence_penalty", 0.0), ("repetition_penalty", 1.0)):
        value = getattr(body, name)
        if value is not None and value != neutral:
            raise bad_request(name, f"not supported (only {neutral} is accepted)")


def sampling_params(
    body: Sampling, *, engine: EngineConfig, max_tokens: int | None, top_logprobs: int = 0
) -> SamplingParams:
    """The engine's SamplingParams for `body`, defaults filled in. Limits (n, max_tokens, prompt length, vocabulary)
    are the engine's to check: it raises RequestError naming the field."""
    check_neutral(body)
    return SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(body.top_k or 0, 0),
        min_p=body.min_p or 0.0,
        max_tokens=engine.default_max_tokens if max_tokens is None else max_tokens,
        stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
        stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=bool(body.ignore_eos),
        seed=body.seed,
        top_logprobs=top_logprobs,
    )
