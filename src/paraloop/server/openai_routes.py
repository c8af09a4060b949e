"""POST /v1/completions and /v1/chat/completions, OpenAI-compatible, plain JSON or SSE streaming.

In: an OpenAI request body, made an engine request by prepare.py (as /generate's is). Out: an OpenAI
response whose standard fields are exactly standard (the official `openai` client parses them), plus
paraloop's extras on every choice and stream chunk:
`token_ids` (generated ids), `token_logprobs` (per-token logprob of the sampled token under the distribution it
was sampled from, as the engine recorded it), `adapter` (the adapter that produced them: "policy", "base" or a
named adapter) and `adapter_versions` (adapter versions that produced the tokens, usually one); the response
carries `adapter`, `adapter_version` (the oldest of them) and `adapter_versions`; a chat choice sampled within a
grammar (structured.py) also has `constrained: true`. `model` selects the adapter (ServerState.adapter_of) and is
echoed as given. Chat: tools (tool_calls.py) and the message rules (chat_rules.py); completions: prompt log-probs
(`echo`, `prompt_logprobs`, scored by the engine).
Usage counts tokens: the prompt once, completion tokens summed over choices. A request tagged with an agent
session is also a recorded turn of a training run (session_turns.py).
"""

import time
from collections.abc import Callable
from typing import Any

import msgspec
from aiohttp import web

from paraloop.engine import RowAccumulator
from paraloop.messages import TokenEvent
from paraloop.server.engine_calls import (
    check,
    collect,
    distinct_versions,
    first_event,
    open_generation,
    score,
)
from paraloop.server.errors import bad_request, error_body, log
from paraloop.server.logprob_objects import (
    chat_logprobs,
    completion_logprobs,
    echoed_logprobs,
    vllm_prompt_logprobs,
)
from paraloop.server.prepare import Prepared, parse, prepare
from paraloop.server.responses import json_response
from paraloop.server.schemas import ChatBody, CompletionBody
from paraloop.server.session_turns import recorded_turn, session_of
from paraloop.server.state import STATE, ServerState
from paraloop.server.tool_calls import ToolPlan, ToolSplitter, finish_reason, split_calls, tool_dicts


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def extras(row: RowAccumulator) -> dict[str, Any]:
    return {
        "token_ids": row.tokens,
        "token_logprobs": row.logprobs,
        "adapter": row.adapter,
        "adapter_versions": distinct_versions(row.versions),
    }


def top_level_versions(rows: list[RowAccumulator], current: int) -> dict[str, Any]:
    distinct = distinct_versions([v for row in rows for v in row.versions])
    return {
        "adapter": next((row.adapter for row in rows if row.adapter), None),
        "adapter_version": distinct[0] if distinct else current,
        "adapter_versions": distinct or [current],
    }


# --- handlers --------------------------------------------------------------------------------------------------------


async def completions(request: web.Request) -> web.StreamResponse:
    state, body = request.app[STATE], await parse(request, CompletionBody)
    session = session_of(request, body)
    if session is not None and (body.max_tokens == 0 or body.echo or body.prompt_logprobs is not None):
        raise bad_request("max_tokens" if body.max_tokens == 0 else "echo", "a session's turn generates, not scores")
    prepared = await prepare(state, body)
    k = body.logprobs
    if body.stream:
        chunks = Chunks(state, prepared, chat=False, logprobs=k, include_usage=_include_usage(body))
        return await stream(request, state, prepared, chunks, session=session)
    gen = prepared.request
    scores = await score(state.engine, prepared, top=scored_top(body))
    if body.max_tokens == 0:  # scoring only: admitted by `score`, or (echo alone) never run, only checked
        if scores is None:
            check(state.engine, prepared)
        rows = [RowAccumulator(finish_reason="length") for _ in range(gen.n)]
    else:
        with recorded_turn(state.turns, session, prepared) as record:
            rows = await collect(state.engine, prepared)
            record(rows)
    prompt_text = state.tokenizer.decode(gen.prompt_tokens) if body.echo else ""
    choices = []
    for i, row in enumerate(rows):
        if k is None:
            logprobs = None
        elif body.echo:
            assert scores is not None
            logprobs = echoed_logprobs(state.tokenizer, gen.prompt_tokens, scores, row, k=k)
        else:
            logprobs = completion_logprobs(state.tokenizer, row, k=k)
        choice = {
            "index": i,
            "text": prompt_text + row.text,
            "logprobs": logprobs,
            "finish_reason": row.finish_reason,
            **extras(row),
        }
        if body.prompt_logprobs is not None and scores is not None:
            choice["prompt_logprobs"] = vllm_prompt_logprobs(
                state.tokenizer, gen.prompt_tokens, scores, k=body.prompt_logprobs
            )
        choices.append(choice)
    return json_response(_envelope(state, prepared, "text_completion", choices, rows))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state, body = request.app[STATE], await parse(request, ChatBody)
    session = session_of(request, body)
    prepared = await prepare(state, body)
    k = (body.top_logprobs or 0) if body.logprobs else None
    if body.stream:
        chunks = Chunks(state, prepared, chat=True, logprobs=k, include_usage=_include_usage(body))
        return await stream(request, state, prepared, chunks, session=session)
    with recorded_turn(state.turns, session, prepared) as record:
        rows = await collect(state.engine, prepared)
        record(rows)
    choices = []
    for i, row in enumerate(rows):
        message, finish = chat_message(prepared, row)
        choices.append(
            {
                "index": i,
                "message": message,
                "logprobs": chat_logprobs(state.tokenizer, row, k=k) if k is not None else None,
                "finish_reason": finish,
                **extras(row),
                **constrained(prepared),
            }
        )
    return json_response(_envelope(state, prepared, "chat.completion", choices, rows))


def scored_top(body: CompletionBody) -> int | None:
    """How many alternatives the prompt's tokens are scored with (echo with logprobs, prompt_logprobs);
    None: the prompt is not scored."""
    if (body.echo and body.logprobs is not None) or body.prompt_logprobs is not None:
        return max(body.logprobs or 0, body.prompt_logprobs or 0)
    return None


def chat_message(prepared: Prepared, row: RowAccumulator) -> tuple[dict[str, Any], str | None]:
    """The assistant message of a finished row (its calls parsed out when tools are offered) and its finish."""
    if prepared.tools is None:
        return {"role": "assistant", "content": row.text}, row.finish_reason
    content, calls = split_calls(prepared.tools, row.text)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return message, finish_reason(prepared.tools, row.finish_reason, bool(calls))


def constrained(prepared: Prepared) -> dict[str, Any]:
    """Marks choices sampled within a grammar: their token_logprobs are of the unconstrained distribution."""
    return {"constrained": True} if prepared.request.params.grammar is not None else {}


def _include_usage(body: CompletionBody | ChatBody) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def _envelope(
    state: ServerState, prepared: Prepared, obj: str, choices: list, rows: list[RowAccumulator]
) -> dict[str, Any]:
    gen = prepared.request
    return {
        "id": gen.request_id,
        "object": obj,
        "created": int(time.time()),
        "model": prepared.model,
        "choices": choices,
        "usage": usage(len(gen.prompt_tokens), sum(len(r.tokens) for r in rows)),
        "system_fingerprint": None,
        **top_level_versions(rows, state.engine.version),
    }


# --- streaming -------------------------------------------------------------------------------------------------------


class Chunks:
    """The SSE chunks of one request: one per TokenEvent, and the usage chunk. Remembers per choice whether the
    role was sent (chat) and the text offset (legacy logprobs)."""

    def __init__(
        self,
        state: ServerState,
        prepared: Prepared,
        *,
        chat: bool,
        logprobs: int | None,
        include_usage: bool,
    ):
        gen = prepared.request
        self.state, self.gen, self.chat, self.k, self.include_usage = (
            state,
            gen,
            chat,
            logprobs,
            include_usage,
        )
        self.head = {
            "id": gen.request_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": prepared.model,
        }
        self.started: set[int] = set()
        self.offsets: dict[int, int] = {}
        self.completion_tokens = 0
        self.splitters: dict[int, ToolSplitter] = {}  # per choice, when tool calls are parsed out
        self.plan: ToolPlan | None = prepared.tools
        self.constrained = constrained(prepared)

    def token(self, event: TokenEvent) -> dict[str, Any]:
        row = RowAccumulator().add(event)
        self.completion_tokens += len(row.tokens)
        tokenizer = self.state.tokenizer
        choice: dict[str, Any] = {"index": event.row}
        finish = event.finish_reason
        if self.chat:
            first = event.row not in self.started
            self.started.add(event.row)
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if self.plan is None:
                delta["content"] = event.text
            else:
                finish = self._tool_delta(event, delta, first=first)
            choice["delta"] = delta
            choice["logprobs"] = chat_logprobs(tokenizer, row, k=self.k) if self.k is not None else None
        else:
            choice["text"] = event.text
            if self.k is not None:
                offset = self.offsets.get(event.row, 0)
                choice["logprobs"] = completion_logprobs(tokenizer, row, k=self.k, offset=offset)
                self.offsets[event.row] = offset + sum(len(t) for t in choice["logprobs"]["tokens"])
            else:
                choice["logprobs"] = None
        choice["finish_reason"] = finish
        return {
            **self.head,
            "choices": [choice | extras(row) | self.constrained],
            **({"usage": None} if self.include_usage else {}),
        }

    def _tool_delta(self, event: TokenEvent, delta: dict[str, Any], *, first: bool) -> str | None:
        """Content and completed calls of this token into `delta` (OpenAI's shape: calls carry their index);
        returns the choice's finish_reason."""
        assert self.plan is not None
        splitter = self.splitters.get(event.row)
        if splitter is None:
            splitter = self.splitters[event.row] = ToolSplitter(self.plan, tool_dicts(self.plan.tools))
        content, calls = splitter.feed(event.text)
        if event.finish_reason is not None:
            rest, more = splitter.finish()
            content, calls = content + rest, calls + more
        if content or (first and not calls):
            delta["content"] = content
        if calls:
            delta["tool_calls"] = calls
        return finish_reason(self.plan, event.finish_reason, splitter.calls > 0)

    def usage(self) -> dict[str, Any]:
        return {
            **self.head,
            "choices": [],
            "usage": usage(len(self.gen.prompt_tokens), self.completion_tokens),
        }


async def stream(
    request: web.Request, state: ServerState, prepared: Prepared, chunks: Chunks, *, session: str | None = None
) -> web.StreamResponse:
    """SSE: one `data: {chunk}` per generated token, then a usage chunk if asked, then `data: [DONE]`.

    The first event is pulled before the response starts, so a refusal (429, 400) is still a plain JSON error. A
    session's turn (session_turns.py) is recorded before `[DONE]`, so the agent's next turn finds it.
    """
    with recorded_turn(state.turns, session, prepared) as record:
        return await _stream(request, state, prepared, chunks, record if session is not None else None)


async def _stream(
    request: web.Request,
    state: ServerState,
    prepared: Prepared,
    chunks: Chunks,
    record: Callable[[list[RowAccumulator]], None] | None,
) -> web.StreamResponse:
    rows = [RowAccumulator() for _ in range(prepared.request.n)] if record is not None else []
    async with open_generation(state.engine, prepared.request) as events:
        event = await first_event(events, fields=prepared.fields)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        try:
            while event is not None:
                if record is not None:
                    rows[event.row].add(event)
                await send_event(response, chunks.token(event))
                event = await anext(events, None)
            if record is not None:
                record(rows)
            if chunks.include_usage:
                await send_event(response, chunks.usage())
            await response.write(b"data: [DONE]\n\n")
        except ConnectionResetError:  # the client went away: leaving the block frees the engine rows
            return response
        except Exception:  # headers are sent: report in-band, as OpenAI does, and keep serving
            log.exception("error while streaming %s", prepared.request.request_id)
            await _send_error(response, 500, "internal server error (see the server log)")
            return response
    await response.write_eof()
    return response


async def send_event(response: web.StreamResponse, payload: dict[str, Any]) -> None:
    await response.write(b"data: " + msgspec.json.encode(payload) + b"\n\n")


async def _send_error(response: web.StreamResponse, status: int, message: str) -> None:
    try:
        await send_event(response, error_body(status, message))
    except ConnectionResetError:
        pass
