"""The log-prob objects of the OpenAI and vLLM answers: legacy completions' `logprobs` (with `echo`, the prompt's
tokens first), chat's `logprobs.content`, and vLLM's `prompt_logprobs`.

In: the tokenizer, a finished row (RowAccumulator) or a prompt's scores (engine/scoring.PromptLogprobs). Out: the
JSON-ready objects, token texts decoded one token at a time (a token holding part of a character shows U+FFFD).
"""

from typing import Any

from paraloop.config import EngineConfig
from paraloop.engine import RowAccumulator
from paraloop.engine.scoring import PromptLogprobs
from paraloop.server.errors import bad_request


def token_text(tokenizer: Any, token: int) -> str:
    return tokenizer.decode([token])


def completion_logprobs(tokenizer: Any, row: RowAccumulator, *, k: int, offset: int = 0) -> dict[str, Any]:
    """Legacy completions `logprobs`: tokens, token_logprobs, top_logprobs (None when k == 0), text_offset."""
    texts = [token_text(tokenizer, t) for t in row.tokens]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    top = [{token_text(tokenizer, t): lp for t, lp in alts[:k]} for alts in row.top_logprobs] if k else None
    return {"tokens": texts, "token_logprobs": row.logprobs, "top_logprobs": top, "text_offset": offsets}


def _chat_entry(tokenizer: Any, token: int, logprob: float) -> dict[str, Any]:
    text = token_text(tokenizer, token)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def chat_logprobs(tokenizer: Any, row: RowAccumulator, *, k: int) -> dict[str, Any]:
    content = []
    for token, lp, alts in zip(row.tokens, row.logprobs, row.top_logprobs, strict=True):
        entry = _chat_entry(tokenizer, token, lp)
        entry["top_logprobs"] = [_chat_entry(tokenizer, t, a) for t, a in alts[:k]]
        content.append(entry)
    return {"content": content, "refusal": None}


def check_prompt_top(top: int | None, *, config: EngineConfig) -> None:
    if top is not None and top > config.max_top_logprobs:
        raise bad_request(
            "prompt_logprobs", f"{top} alternatives, more than engine.max_top_logprobs={config.max_top_logprobs}"
        )


def vllm_prompt_logprobs(tokenizer: Any, tokens: list[int], scores: PromptLogprobs, *, k: int) -> list[Any]:
    """vLLM's `prompt_logprobs`: None for the first token, then per token {id: {logprob, rank, decoded_token}},
    the prompt's own token first, then the `k` most likely alternatives."""
    out: list[Any] = [None]
    for token, lp, rank, alts in zip(tokens[1:], scores.chosen, scores.ranks, scores.top, strict=True):
        entry = {str(token): {"logprob": lp, "rank": rank, "decoded_token": token_text(tokenizer, token)}}
        for i, (alt, alt_lp) in enumerate(alts[:k]):
            entry.setdefault(str(alt), {"logprob": alt_lp, "rank": i + 1, "decoded_token": token_text(tokenizer, alt)})
        out.append(entry)
    return out


def echoed_logprobs(
    tokenizer: Any, tokens: list[int], scores: PromptLogprobs, row: RowAccumulator, *, k: int
) -> dict[str, Any]:
    """Legacy `logprobs` with echo: the prompt's tokens first (the first has no log-prob: null), then the row's."""
    prompt = completion_logprobs(
        tokenizer, RowAccumulator(tokens=tokens[1:], logprobs=scores.chosen, top_logprobs=scores.top), k=k
    )
    first = token_text(tokenizer, tokens[0])
    generated = completion_logprobs(tokenizer, row, k=k, offset=len(first) + sum(map(len, prompt["tokens"])))
    top = None if not k else [None, *prompt["top_logprobs"], *generated["top_logprobs"]]
    return {
        "tokens": [first, *prompt["tokens"], *generated["tokens"]],
        "token_logprobs": [None, *prompt["token_logprobs"], *generated["token_logprobs"]],
        "top_logprobs": top,
        "text_offset": [0, *(o + len(first) for o in prompt["text_offset"]), *generated["text_offset"]],
    }
