"""A request's way from its body to an engine request, one pipeline for every generating route
(/v1/completions, /v1/chat/completions, /generate): `parse` -> `prepare` -> submit (engine_calls.py) -> the
route shapes the answer.

In: the route's typed body (schemas.py). Out: one `Prepared`: the engine's GenerateRequest (prompt tokens,
sampling params with the grammar of response_format / tool_choice, the adapter `model` selects), the engine's
field names as the route's body spells them, the model id to echo and the tool plan (chat). Whatever the body
asks that cannot be honoured is a 400 naming its field, raised before any work.

A request's sizes are checked twice, each time for its own reason:
1. Here, before anything is tokenized, on what the body alone says: n, max_tokens, top_logprobs and stop (the
   engine's `check_sizes` without a prompt), the prompt's characters, ids or messages (limits.py). Templating
   and tokenizing cost time in the length of their input, so they never run on input that could not fit.
2. At admission, by the engine (`Engine.generate` / `score` -> admission.validate), on the token counts known
   only after tokenizing: the prompt's tokens against engine.max_prompt_tokens, n x (prompt + max_tokens)
   against engine.max_kv_tokens, token ids against the vocabulary. The engine checks every caller there (the
   mock environment and the evaluator too), so nothing here asks it a third time: its refusal comes with the
   first event, before any response starts (engine_calls.first_event), as a 400 naming the route's field.
"""

import json
import uuid
from typing import Any, NamedTuple, TypeVar

import anyio
import msgspec
from aiohttp import web

from paraloop.config import EngineConfig
from paraloop.engine.admission import check_sizes
from paraloop.engine.grammar import Grammar
from paraloop.messages import GenerateRequest
from paraloop.server.chat_rules import check_messages, template_messages
from paraloop.server.errors import bad_request, request_errors
from paraloop.server.limits import check_chat_size, check_text, check_token_count
from paraloop.server.logprob_objects import check_prompt_top
from paraloop.server.schemas import (
    Body,
    ChatBody,
    CompletionBody,
    GenerateBody,
    PromptObject,
    decode,
    prompt_tokens_of,
    sampling_params,
)
from paraloop.server.state import STATE, ServerState
from paraloop.server.structured import compile_source, grammar_source
from paraloop.server.tool_calls import ToolPlan, add_tool_prompt, template_knows_tools, tool_dicts, tool_plan

RequestBody = CompletionBody | ChatBody | GenerateBody
B = TypeVar("B", bound=Body)


class Prepared(NamedTuple):
    """An engine request and how the engine's field names read in this route's body (for 400 messages)."""

    request: GenerateRequest
    fields: dict[str, str]
    model: str = ""  # the model id the request named (echoed in the response), or the served name
    tools: ToolPlan | None = None  # chat: the request's tool plan when calls are parsed out of the text


class Asked(NamedTuple):
    """What a body asks of the engine, read (and refused where the route cannot honour it) before anything is
    built."""

    prefix: str  # of the request id
    max_tokens: int | None  # None: engine.default_max_tokens
    top_logprobs: int
    fields: dict[str, str]  # the engine's field names as this route's body spells them


async def parse(request: web.Request, kind: type[B]) -> B:
    """The route's typed body (a 400 naming the offending field)."""
    return decode(await request.read(), kind, max_depth=request.app[STATE].settings.server.max_json_depth)


async def prepare(state: ServerState, body: RequestBody) -> Prepared:
    """The engine request of `body`: its route's refusals, the sizes bounded, the prompt built, the grammar
    compiled."""
    config = state.settings.engine
    asked = asks(body, config)
    k = asked.top_logprobs
    params = sampling_params(body, engine=config, max_tokens=asked.max_tokens, top_logprobs=k)
    with request_errors(asked.fields):  # size check 1, before tokenizing (the module's docstring)
        check_sizes(n=body.n or 1, params=params, config=config)
    plan = tool_plan(body, state.tokenizer) if isinstance(body, ChatBody) else None
    tokens, prompt_field = prompt_ids(state.tokenizer, body, plan, config=config)  # bounds its text first
    # size check 2 is the engine's, at admission
    grammar = await grammar_of(state, body, plan)
    request = GenerateRequest(
        request_id=f"{asked.prefix}-{uuid.uuid4().hex}",
        prompt_tokens=tokens,
        n=body.n or 1,
        params=params if grammar is None else msgspec.structs.replace(params, grammar=grammar),
        adapter=state.adapter_of(body.model),
    )
    tools = plan if plan is not None and plan.parse else None
    return Prepared(request, asked.fields | {"prompt": prompt_field}, body.model or state.model_name, tools)


# --- what each route's body asks ---------------------------------------------------------------------------


def asks(body: RequestBody, config: EngineConfig) -> Asked:
    if isinstance(body, CompletionBody):
        return completion_asks(body, config)
    if isinstance(body, ChatBody):
        return chat_asks(body)
    return generate_asks(body, config)


def completion_asks(body: CompletionBody, config: EngineConfig) -> Asked:
    if body.echo and body.stream:
        raise bad_request("echo", "not supported with stream")
    if body.prompt_logprobs is not None and body.stream:
        raise bad_request("prompt_logprobs", "not supported with stream")
    if body.suffix:
        raise bad_request("suffix", "not supported")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise bad_request("best_of", "not supported (only best_of == n)")
    if body.max_tokens == 0 and not (body.echo or body.prompt_logprobs is not None):
        raise bad_request("max_tokens", "0 only scores the prompt: give echo or prompt_logprobs with it")
    if body.max_tokens == 0 and body.stream:
        raise bad_request("max_tokens", "0 (scoring the prompt only) cannot be streamed")
    check_prompt_top(body.prompt_logprobs, config=config)
    max_tokens = 1 if body.max_tokens == 0 else body.max_tokens  # checked and admitted as one token
    return Asked("cmpl", max_tokens, body.logprobs or 0, {"top_logprobs": "logprobs"})


def chat_asks(body: ChatBody) -> Asked:
    if body.top_logprobs and not body.logprobs:
        raise bad_request("top_logprobs", "requires logprobs=true")
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise bad_request("max_completion_tokens", "give max_tokens or max_completion_tokens, not both")
    limit_field = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"
    max_tokens = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
    k = (body.top_logprobs or 0) if body.logprobs else 0
    return Asked("chatcmpl", max_tokens, k, {"max_tokens": limit_field})


def generate_asks(body: GenerateBody, config: EngineConfig) -> Asked:
    if body.prompt_logprobs is not None and body.stream:
        raise bad_request("prompt_logprobs", "not supported with stream")
    check_prompt_top(body.prompt_logprobs, config=config)
    return Asked("gen", body.max_tokens, body.logprobs or 0, {"top_logprobs": "logprobs"})


# --- the prompt ---------------------------------------------------------------------------------------------


def prompt_ids(
    tokenizer: Any, body: RequestBody, plan: ToolPlan | None, *, config: EngineConfig
) -> tuple[list[int], str]:
    """The prompt's token ids and the field that held it; its text bounded before the tokenizer sees it."""
    if isinstance(body, ChatBody):
        return chat_prompt(tokenizer, body, plan, config=config), "messages"
    if isinstance(body, GenerateBody):
        prompt, field = prompt_of(body.prompt)
    else:
        prompt, field = prompt_tokens_of(body.prompt, field="prompt"), "prompt"
    return encode_prompt(tokenizer, prompt, field=field, config=config), field


def prompt_of(prompt: str | PromptObject | list[Any]) -> tuple[str | list[int], str]:
    """vLLM prompt shapes: a string, {"prompt_token_ids": [...]}, {"prompt": "..."}, or a list of token ids.
    Returns the prompt and the field that held it (for messages)."""
    if isinstance(prompt, PromptObject):
        if (prompt.prompt_token_ids is None) == (prompt.prompt is None):
            raise bad_request("prompt", 'expected {"prompt_token_ids": [...]} or {"prompt": "..."}')
        if prompt.prompt_token_ids is not None:
            field = "prompt.prompt_token_ids"
            return prompt_tokens_of(prompt.prompt_token_ids, field=field, text=False), field
        return prompt_tokens_of(prompt.prompt, field="prompt.prompt"), "prompt.prompt"
    return prompt_tokens_of(prompt, field="prompt"), "prompt"


def encode_prompt(tokenizer: Any, prompt: str | list[int], *, field: str, config: EngineConfig) -> list[int]:
    """A text prompt is encoded with the tokenizer's special tokens (BOS where the model has one), as vLLM
    does; its length is bounded first, so the tokenizer never runs on more text than could fit."""
    if isinstance(prompt, str):
        check_text(len(prompt), field=field, config=config)
        return tokenizer.encode(prompt)
    check_token_count(len(prompt), field=field, config=config)
    return prompt


RESERVED_TEMPLATE_KWARGS = frozenset({"conversation", "tokenize", "add_generation_prompt", "continue_final_message"})


def chat_prompt(tokenizer: Any, body: ChatBody, plan: ToolPlan | None, *, config: EngineConfig) -> list[int]:
    """The chat template applied by the tokenizer, then encoded without adding special tokens a second time.
    The messages' size is bounded before the template renders them, and the rendered text before it is
    encoded. Tools go to a template that renders them, else into the system message (add_tool_prompt)."""
    check_messages(body.messages)
    messages = template_messages(body.messages, template_knows_tools=template_knows_tools(tokenizer))
    tool_kwargs: dict[str, Any] = {}
    tool_chars = 0
    if plan is not None:
        tools = tool_dicts(plan.tools)
        tool_chars = len(json.dumps(tools))
        if plan.format.in_template:
            tool_kwargs["tools"] = tools
        else:
            messages = add_tool_prompt(messages, plan.tools)
    check_chat_size(len(messages), sum(len(m["content"]) for m in messages) + tool_chars, config=config)
    reserved = sorted(RESERVED_TEMPLATE_KWARGS & set(body.chat_template_kwargs or {}))
    if reserved:
        raise bad_request("chat_template_kwargs", f"{', '.join(reserved)} cannot be set here")
    if body.continue_final_message and body.add_generation_prompt:
        raise bad_request("continue_final_message", "cannot be combined with add_generation_prompt=true")
    try:
        text = tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            **tool_kwargs,
            **(body.chat_template_kwargs or {}),
        )
    except Exception as e:  # a template's raise_exception() (e.g. roles out of order) is the client's input
        raise bad_request("messages", f"the chat template rejected the messages: {e}") from None
    check_text(len(text), field="messages", config=config)
    return tokenizer.encode(text, add_special_tokens=False)


async def grammar_of(state: ServerState, body: RequestBody, plan: ToolPlan | None) -> Grammar | None:
    """The grammar a chat's rows sample within (response_format, tool_choice), compiled off the event loop."""
    if not isinstance(body, ChatBody):
        return None
    source = grammar_source(body, plan, max_bytes=state.settings.server.max_schema_bytes)
    return None if source is None else await anyio.to_thread.run_sync(compile_source, source, state.tokenizer)
