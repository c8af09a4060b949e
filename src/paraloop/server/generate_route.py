"""POST /generate, vLLM style, exactly as Atropos's `vllm` server type sends and parses it.

In: {"prompt": {"prompt_token_ids": [...]}, "logprobs": 0, "n", "max_tokens", "temperature", "top_p", "stop", ...}
(or "prompt": "<text>", encoded with the tokenizer's special tokens; never a chat template).
Out: {"text": [...], "prompt": str, "prompt_token_ids": [...], "token_ids": [[...]], "finish_reasons": [...],
"logprobs": [[[{"<token_id>": logprob, ...}] per token] per completion], "adapter", "adapter_version",
"adapter_versions", "sampling_kept"}. `model`, when given, selects the adapter as in the OpenAI routes. A paraloop
extension, `sampling_kept` holds per completion and token the size of the kept set top_k / top_p / min_p sampled
the token from (0: the full vocabulary); the logprobs are of that kept set's renormalised distribution.
Each logprobs entry is a one-element list holding a dict whose FIRST key is the sampled token (Atropos reads
`list(item[0].items())[0]`), followed by the top-`logprobs` alternatives. With "stream": true the answer is
vLLM's newline-delimited JSON, one {"text": [prompt + text so far, ...]} line per generated token.
"""

import uuid
from typing import Any

import msgspec
from aiohttp import web

from paraloop.engine import RowAccumulator
from paraloop.engine.admission import check_sizes
from paraloop.messages import GenerateRequest
from paraloop.server.engine_calls import (
    Prepared,
    collect,
    distinct_versions,
    first_event,
    open_generation,
    score,
)
from paraloop.server.errors import bad_request, log
from paraloop.server.limits import request_errors
from paraloop.server.logprob_objects import check_prompt_top, vllm_prompt_logprobs
from paraloop.server.openai_routes import encode_prompt, json_response
from paraloop.server.schemas import GenerateBody, PromptObject, decode, prompt_tokens_of, sampling_params
from paraloop.server.state import STATE, ServerState


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


def generate_request(state: ServerState, body: GenerateBody) -> Prepared:
    if body.prompt_logprobs is not None and body.stream:
        raise bad_request("prompt_logprobs", "not supported with stream")
    config = state.settings.engine
    check_prompt_top(body.prompt_logprobs, config=config)
    params = sampling_params(body, engine=config, max_tokens=body.max_tokens, top_logprobs=body.logprobs or 0)
    prompt, prompt_field = prompt_of(body.prompt)
    fields = {"prompt": prompt_field, "top_logprobs": "logprobs"}
    with request_errors(fields):
        check_sizes(n=body.n or 1, params=params, config=config)
    tokens = encode_prompt(state.tokenizer, prompt, field=prompt_field, config=config)
    request = GenerateRequest(
        request_id=f"gen-{uuid.uuid4().hex}", prompt_tokens=tokens, n=body.n or 1, params=params,
        adapter=state.adapter_of(body.model),
    )
    with request_errors(fields):
        state.engine.check(request)
    return Prepared(request, fields=fields, model=body.model or state.model_name)


def token_logprobs(row: RowAccumulator) -> list[list[dict[str, float]]]:
    out = []
    for token, lp, alts in zip(row.tokens, row.logprobs, row.top_logprobs, strict=True):
        entry = {str(token): lp}
        for alt, alt_lp in alts:
            entry.setdefault(str(alt), alt_lp)
        out.append([entry])
    return out


async def generate(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = decode(await request.read(), GenerateBody, max_depth=state.settings.server.max_json_depth)
    prepared = generate_request(state, body)
    gen = prepared.request
    prompt_text = body.prompt if isinstance(body.prompt, str) else state.tokenizer.decode(gen.prompt_tokens)
    if body.stream:
        return await stream_generate(request, state, prepared, prompt_text)
    scores = None
    if body.prompt_logprobs is not None:
        scores = await score(state.engine, prepared, top=body.prompt_logprobs)
    rows = await collect(state.engine, prepared)
    oldest = distinct_versions([v for row in rows for v in row.versions])
    prompt_logprobs = None if scores is None else vllm_prompt_logprobs(state.tokenizer, gen.prompt_tokens, scores,
                                                                       k=body.prompt_logprobs or 0)  # fmt: skip
    return json_response(
        {
            "text": [row.text for row in rows],
            "prompt": prompt_text,
            "prompt_token_ids": gen.prompt_tokens,
            "token_ids": [row.tokens for row in rows],
            "finish_reasons": [row.finish_reason for row in rows],
            "logprobs": [token_logprobs(row) for row in rows],
            "adapter": next((row.adapter for row in rows if row.adapter), None),
            "adapter_version": oldest[0] if oldest else state.engine.version,
            "adapter_versions": [distinct_versions(row.versions) for row in rows],
            "sampling_kept": [row.kept for row in rows],
            **({"prompt_logprobs": prompt_logprobs} if prompt_logprobs is not None else {}),
        }
    )


async def stream_generate(
    request: web.Request, state: ServerState, prepared: Prepared, prompt_text: str
) -> web.StreamResponse:
    gen = prepared.request
    async with open_generation(state.engine, gen) as events:
        event = await first_event(events, fields=prepared.fields)
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        texts = [""] * gen.n
        try:
            while event is not None:
                texts[event.row] += event.text
                await response.write(msgspec.json.encode({"text": [prompt_text + t for t in texts]}) + b"\n")
                event = await anext(events, None)
        except ConnectionResetError:  # the client went away: leaving the block frees the engine rows
            return response
        except Exception:
            log.exception("error while streaming %s", gen.request_id)
            return response
    await response.write_eof()
    return response
