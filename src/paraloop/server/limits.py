"""Bounds on a prompt checked before paraloop spends work on it: the text, token ids or chat it must not
exceed before it is templated and tokenized (prepare.py's first size check, with the engine's `check_sizes`).

In: a decoded body's parts and the [engine] limits. Out: nothing, or an APIError 400 naming the route's field.
"""

from paraloop.config import EngineConfig
from paraloop.server.errors import bad_request

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
