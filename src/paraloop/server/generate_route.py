"""POST /generate, vLLM style, exactly as Atropos's `vllm` server type sends and parses it.

In: {"prompt": {"prompt_token_ids": [...]}, "logprobs": 0, "n", "max_tokens", "temperature", "top_p", "stop", ...}
(or "prompt": "<text>", encoded with the tokenizer's special tokens; never a chat template).
Out: {"text": [...], "prompt": str, "prompt_token_ids": [...], "token_ids": [[...]], "finish_reasons": [...],
"logprobs": [[[{"<token_id>": logprob, ...}] per token] per completion], "adapter", "adapter_version",
"adapter_versions", "sampling_kept"}. The body is made an engine request by prepare.py, as the OpenAI routes'
are; `model`, when given, selects the adapter as there. A paraloop extension, `sampling_kept` holds per
completion and token the size of the kept set top_k / top_p / min_p sampled the token from (0: the full
vocabulary); the logprobs are of that kept set's renormalised distribution.
Each logprobs entry is a one-element list holding a dict whose FIRST key is the sampled token (Atropos reads
`list(item[0].items())[0]`), followed by the top-`logprobs` alternatives. With "stream": true the answer is
vLLM's newline-delimited JSON, one {"text": [prompt + text so far, ...]} line per generated token.
"""

import msgspec
from aiohttp import web

from paraloop.engine import RowAccumulator
from paraloop.messages import GenerateRequest
from paraloop.server.engine_calls import collect, distinct_versions, first_event, open_generation, score
from paraloop.server.errors import log
from paraloop.server.logprob_objects import vllm_prompt_logprobs
from paraloop.server.prepare import Prepared, parse, prepare
from paraloop.server.responses import json_response
from paraloop.server.schemas import GenerateBody
from paraloop.server.state import STATE, ServerState


def prompt_text(state: ServerState, body: GenerateBody, gen: GenerateRequest) -> str:
    """The prompt as vLLM echoes it: the text given, else the ids decoded (once the engine admitted them)."""
    return body.prompt if isinstance(body.prompt, str) else state.tokenizer.decode(gen.prompt_tokens)


def token_logprobs(row: RowAccumulator) -> list[list[dict[str, float]]]:
    out = []
    for token, lp, alts in zip(row.tokens, row.logprobs, row.top_logprobs, strict=True):
        entry = {str(token): lp}
        for alt, alt_lp in alts:
            entry.setdefault(str(alt), alt_lp)
        out.append([entry])
    return out


async def generate(request: web.Request) -> web.StreamResponse:
    state, body = request.app[STATE], await parse(request, GenerateBody)
    prepared = await prepare(state, body)
    if body.stream:
        return await stream_generate(request, state, prepared, body)
    scores = await score(state.engine, prepared, top=body.prompt_logprobs)
    rows, gen = await collect(state.engine, prepared), prepared.request
    oldest = distinct_versions([v for row in rows for v in row.versions])
    prompt_logprobs = (
        None
        if scores is None
        else vllm_prompt_logprobs(state.tokenizer, gen.prompt_tokens, scores, k=body.prompt_logprobs or 0)
    )
    return json_response(
        {
            "text": [row.text for row in rows],
            "prompt": prompt_text(state, body, gen),
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
    request: web.Request, state: ServerState, prepared: Prepared, body: GenerateBody
) -> web.StreamResponse:
    gen = prepared.request
    async with open_generation(state.engine, gen) as events:
        event = await first_event(events, fields=prepared.fields)
        prompt = prompt_text(state, body, gen)
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        texts = [""] * gen.n
        try:
            while event is not None:
                texts[event.row] += event.text
                await response.write(msgspec.json.encode({"text": [prompt + t for t in texts]}) + b"\n")
                event = await anext(events, None)
        except ConnectionResetError:  # the client went away: leaving the block frees the engine rows
            return response
        except Exception:
            log.exception("error while streaming %s", gen.request_id)
            return response
    await response.write_eof()
    return response
