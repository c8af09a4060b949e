"""Bounds checked before paraloop spends work on a request: its body arrives whole, in time (`read_body`, for
every server: `paraloop serve`/`run` and `paraloop tinker`), and a prompt's text, token ids or chat stay within
what the engine takes before they are templated and tokenized (prepare.py's first size check, with the engine's
`check_sizes`).

In: a request, or a decoded body's parts and the [engine] limits. Out: the body, nothing, or an APIError (400
naming the route's field, 408 for a body that does not arrive).
"""

import anyio
from aiohttp import web

from paraloop.config import EngineConfig
from paraloop.server.errors import APIError, bad_request


async def read_body(request: web.Request, timeout_s: float) -> bytes:
    """The whole body (at most the app's client_max_size: aiohttp's 413) within `timeout_s` (server.body_timeout_s;
    else a 408): a body that stops arriving holds no handler. One that aiohttp cannot decode (not the gzip or
    deflate its Content-Encoding claims, or cut short) is a 400."""
    with anyio.move_on_after(timeout_s):
        try:
            return await request.read()
        except web.RequestPayloadError:
            if encoding := request.headers.get("Content-Encoding"):
                raise bad_request("Content-Encoding", f"the body is not valid {encoding}") from None
            raise bad_request(None, "the body did not arrive whole") from None
    raise APIError(408, f"the request body did not arrive within {timeout_s} s (server.body_timeout_s)", code="timeout")


CHARS_PER_TOKEN = 64
"""Text longer than this many characters per allowed prompt token cannot fit engine.max_prompt_tokens (no
tokenizer has longer tokens in practice), so it is refused before the tokenizer runs on it."""


def max_prompt_chars(config: EngineConfig) -> int:
    return config.max_prompt_tokens * CHARS_PER_TOKEN


def check_text(chars: int, *, field: str, config: EngineConfig) -> None:
    """A prompt text of `chars` characters, before it is tokenized."""
    if chars > max_prompt_chars(config):
        raise bad_request(
            field,
            f"{chars} characters, more than engine.max_prompt_tokens={config.max_prompt_tokens} tokens can hold "
            f"(at most {max_prompt_chars(config)} characters are read)",
        )


def check_token_count(count: int, *, field: str, config: EngineConfig) -> None:
    """A prompt given as token ids, before it is copied anywhere."""
    if count > config.max_prompt_tokens:
        raise bad_request(field, f"{count} tokens, more than engine.max_prompt_tokens={config.max_prompt_tokens}")


def check_chat_size(messages: int, chars: int, *, config: EngineConfig) -> None:
    """A chat, before its template is rendered: every message adds at least one token."""
    if messages > config.max_prompt_tokens:
        raise bad_request(
            "messages", f"{messages} messages, more than engine.max_prompt_tokens={config.max_prompt_tokens}"
        )
    check_text(chars, field="messages", config=config)
