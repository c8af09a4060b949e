"""Multi-turn episodes without a model: a scripted engine that answers each turn with given text, and the
calculator tool call a script writes."""

from typing import Any

import anyio

from paraloop.messages import Completion, GenerateRequest

EOS = 2  # the tiny model's <|im_end|>


def turn(tokenizer: Any, text: str, *, eos: bool) -> Completion:
    tokens = tokenizer.encode(text) + ([EOS] if eos else [])
    return Completion(
        row=0,
        tokens=tokens,
        logprobs=[-0.5] * len(tokens),
        versions=[0] * len(tokens),
        text=text,
        finish_reason="stop" if eos else "length",
    )


def call(expression: str) -> str:
    return f'<tool_call>{{"name": "calculator", "arguments": {{"expression": "{expression}"}}}}</tool_call>'


class ScriptedEngine:
    """Answers turn t of row r with script[r][t - 1] (text, then EOS); records the requests."""

    def __init__(self, tokenizer: Any, script: list[list[str]]) -> None:
        self.tokenizer, self.script = tokenizer, script
        self.requests: list[GenerateRequest] = []
        self.version = 2

    async def complete_many(self, requests: list[GenerateRequest]) -> list[list[Completion]]:
        self.requests += requests
        out = []
        for request in requests:
            rows = []
            for i in range(request.n):
                row, t = (
                    (i, 1)
                    if "-turn" not in request.request_id
                    else (int(request.request_id.split("-")[-2]), int(request.request_id.split("turn")[-1]))
                )
                c = turn(self.tokenizer, self.script[row][t - 1], eos=True)
                rows.append(
                    Completion(
                        row=i,
                        tokens=c.tokens,
                        logprobs=[-0.1 * t] * len(c.tokens),
                        versions=[self.version + t] * len(c.tokens),
                        text=c.text,
                        finish_reason="stop",
                    )
                )
            out.append(rows)
        await anyio.lowlevel.checkpoint()
        return out
