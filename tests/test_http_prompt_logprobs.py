"""Prompt log-probs: OpenAI's legacy `echo` + `logprobs` on /v1/completions (lm-eval's log-likelihood requests:
`max_tokens: 0`), and vLLM's `prompt_logprobs` on /v1/completions and /generate.

Each prompt token's reported log-prob is the model's log-softmax at the position before it, checked against the
model's own forward pass over the prompt (a separate load, as test_http_serve does).
"""

import pytest
from support.http_harness import running_server
from support.engines import greedy_logprobs

from paraloop.model import load_model

PROMPT = "The cat sat on the mat because the mat was warm."


@pytest.fixture(scope="module")
def server(tiny_model_path):
    with running_server(tiny_model_path) as s:
        yield s


@pytest.fixture(scope="module")
def reference(tiny_model_path):
    """log p(token_i | tokens_<i) for i >= 1 under the model itself."""
    model, tokenizer, _, _ = load_model(tiny_model_path)
    tokens = tokenizer.encode(PROMPT)
    return tokens, greedy_logprobs(model, tokens[:1], tokens[1:])


def test_echo_with_max_tokens_0_scores_the_prompt_as_lm_eval_asks(server, reference):
    tokens, expected = reference
    reply = server.post(
        "/v1/completions", {"prompt": PROMPT, "echo": True, "logprobs": 1, "max_tokens": 0, "temperature": 0}
    )
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    assert choice["text"] == PROMPT and choice["token_ids"] == []
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(tokens)
    assert "".join(logprobs["tokens"]) == PROMPT
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["token_logprobs"][1:] == pytest.approx(expected, abs=2e-3)  # test_http_serve's bound
    assert logprobs["text_offset"] == [sum(map(len, logprobs["tokens"][:i])) for i in range(len(tokens))]
    for lp, top in zip(logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:], strict=True):
        assert max(top.values()) >= lp - 1e-6  # the most likely alternative is at least as likely


def test_echo_with_generation_puts_the_prompt_first_and_the_completion_after(server, reference):
    tokens, expected = reference
    reply = server.post("/v1/completions", {"prompt": PROMPT, "echo": True, "logprobs": 0, "max_tokens": 3, "seed": 1})
    choice = reply.json()["choices"][0]
    logprobs = choice["logprobs"]
    assert choice["text"] == PROMPT + "".join(logprobs["tokens"][len(tokens) :])
    assert logprobs["token_logprobs"][1 : len(tokens)] == pytest.approx(expected, abs=2e-3)
    assert logprobs["token_logprobs"][len(tokens) :] == choice["token_logprobs"]
    assert logprobs["top_logprobs"] is None


@pytest.mark.parametrize("route", ["/v1/completions", "/generate"])
def test_vllm_prompt_logprobs_hold_each_prompt_token_its_rank_and_the_top_alternatives(server, reference, route):
    tokens, expected = reference
    reply = server.post(route, {"prompt": PROMPT, "prompt_logprobs": 2, "max_tokens": 1})
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    scored = answer["choices"][0]["prompt_logprobs"] if route == "/v1/completions" else answer["prompt_logprobs"]
    assert scored[0] is None and len(scored) == len(tokens)
    for token, entry, lp in zip(tokens[1:], scored[1:], expected, strict=True):
        first = next(iter(entry))  # the prompt's own token first, then the alternatives
        assert first == str(token) and entry[first]["logprob"] == pytest.approx(lp, abs=2e-3)
        best = max(v["logprob"] for v in entry.values())
        assert entry[first]["rank"] == 1 if entry[first]["logprob"] >= best else entry[first]["rank"] > 1
        assert 2 <= len(entry) <= 3
