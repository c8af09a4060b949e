"""POST /generate as Atropos's `vllm` server type sends and parses it (atroposlib 0.4.0 vllm_server.py)."""

import json
import os
from pathlib import Path

import pytest

from support.http_harness import running_server
from support import procs

REPO = Path(__file__).resolve().parents[1]
ATROPOS_PYTHON = REPO / ".venv-atropos" / "bin" / "python"

# Runs under the atropos venv (atroposlib's pins conflict with paraloop's); prints one JSON line.
ATROPOS_CLIENT = """
import asyncio, json, sys
from atroposlib.envs.server_handling.managed_server import ManagedServer
from atroposlib.envs.server_handling.server_baseline import APIServerConfig
from atroposlib.envs.server_handling.vllm_server import VLLMServer

url, model = sys.argv[1], sys.argv[2]

async def main():
    config = APIServerConfig(base_url=url + "/v1", model_name=model, tokenizer_name=model, server_type="vllm",
                             api_key="unused", timeout=60)
    server = VLLMServer(config)
    request = {"prompt": {"prompt_token_ids": [5, 6, 7, 8]}, "n": 2, "max_tokens": 5, "temperature": 1.0,
               "top_p": 1.0, "seed": 11, "ignore_eos": True}
    _, tokens, logprobs, finish = await server.tokens_and_logprobs_completion(
        input_ids=request["prompt"]["prompt_token_ids"], n=2, max_tokens=5, temperature=1.0, top_p=1.0, seed=11,
        ignore_eos=True)
    managed = ManagedServer(server=server, tokenizer=server.tokenizer)
    chat = await managed.chat_completion(messages=[{"role": "user", "content": "What is 2 plus 2?"}], n=2,
                                         max_tokens=6, temperature=1.0)
    nodes = [n.model_dump() for n in managed.get_state()["nodes"]]
    assert len(chat.choices) == 2 and len(nodes) == 2
    if server.check_task is not None:
        server.check_task.cancel()
    print(json.dumps({"direct": {"request": request, "tokens": tokens, "logprobs": logprobs, "finish": finish},
                      "nodes": nodes}))

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def server(tiny_model_path):
    with running_server(tiny_model_path) as s:
        yield s


def parse_like_atropos(results: dict) -> tuple[list[list[int]], list[list[float]], list[str]]:
    """VLLMServer._tokens_and_logprobs_completion_wrapper's parsing, verbatim in substance."""
    tokens, logprobs, finish = [], [], []
    for output_token_logprobs, finish_reason in zip(results["logprobs"], results["finish_reasons"], strict=True):
        logprobs.append([list(item[0].values())[0] for item in output_token_logprobs])
        tokens.append([int(list(item[0].keys())[0]) for item in output_token_logprobs])
        finish.append(finish_reason)
    return tokens, logprobs, finish


def test_the_atropos_request_body_parses_as_atropos_parses_it(server):
    prompt_ids = server.engine.tokenizer.encode("What is 4 plus 3? Reply with the number only.")
    body = {
        "prompt": {"prompt_token_ids": prompt_ids},
        "logprobs": 0,
        "n": 2,
        "max_tokens": 8,
        "temperature": 1.0,
        "top_p": 1.0,
        "stop": ["<|im_end|>"],
    }
    r = server.post("/generate", body)
    assert r.status_code == 200, r.text
    data = r.json()
    tokens, logprobs, finish = parse_like_atropos(data)
    assert tokens == data["token_ids"] and len(tokens) == 2
    assert all(len(t) == len(lp) and 1 <= len(t) <= 8 for t, lp in zip(tokens, logprobs, strict=True))
    assert all(lp <= 0 for row in logprobs for lp in row)
    assert set(finish) <= {"stop", "length"}
    assert data["prompt_token_ids"] == prompt_ids
    end = server.engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for text, ids, reason in zip(data["text"], tokens, finish, strict=True):
        # The text leaves special tokens out (a sampled <|endoftext|>, the EOS a stopped row ends with).
        assert text == server.engine.tokenizer.decode(ids, skip_special_tokens=True), (text, ids)
        if reason == "stop":  # stopped on the stop string (here also the EOS token): its token is returned
            assert ids[-1] == end and end not in ids[:-1]
    assert data["adapter_version"] == 0 and data["adapter_versions"] == [[0], [0]]


def test_a_text_prompt_is_encoded_without_a_chat_template(server):
    r = server.post("/generate", {"prompt": "The sun is a", "max_tokens": 3, "ignore_eos": True})
    data = r.json()
    assert data["prompt_token_ids"] == server.engine.tokenizer.encode("The sun is a")
    assert data["prompt"] == "The sun is a" and data["finish_reasons"] == ["length"]
    assert len(data["token_ids"][0]) == 3


def test_logprobs_k_puts_the_sampled_token_first_then_the_alternatives(server):
    r = server.post(
        "/generate",
        {"prompt": {"prompt_token_ids": [5, 6, 7]}, "logprobs": 2, "max_tokens": 4, "temperature": 0.7},
    )
    data = r.json()
    for token, [entry] in zip(data["token_ids"][0], data["logprobs"][0], strict=True):
        assert next(iter(entry)) == str(token)
        assert 1 <= len(entry) <= 3  # the sampled token, plus up to 2 alternatives (it may be one of them)


def test_streaming_generate_sends_cumulative_ndjson_lines(server):
    body = {"prompt": "Bread and", "n": 2, "max_tokens": 4, "seed": 3, "ignore_eos": True}
    plain = server.post("/generate", body).json()
    lines = [json.loads(line) for line in server.post("/generate", {**body, "stream": True}).text.splitlines()]
    assert len(lines) == 8  # one per generated token
    assert lines[-1]["text"] == ["Bread and" + t for t in plain["text"]]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": {"prompt_token_ids": [5]}, "prompt_logprobs": 21}, "prompt_logprobs"),
        ({"prompt": {"prompt_token_ids": [5]}, "prompt_logprobs": -1}, "prompt_logprobs"),
        ({"prompt": {"prompt_token_ids": [5]}, "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        ({"prompt": {"prompt_token_ids": []}}, "prompt.prompt_token_ids"),
        ({"prompt": {"prompt_token_ids": [5, 99999]}}, "prompt.prompt_token_ids"),
        ({"prompt": {"token_ids": [5]}}, "prompt.token_ids"),
        ({"prompt": {}}, "prompt"),
        ({"prompt": {"prompt": "x", "prompt_token_ids": [5]}}, "prompt"),
        ({"prompt": "x", "best_of": 2}, "best_of"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "repetition_penalty": 1.2}, "repetition_penalty"),
        ({"prompt": "x", "n": 10_000}, "n"),
    ],
)
def test_bad_generate_bodies_are_400_naming_the_field(server, body, param):
    r = server.post("/generate", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.atropos
def test_atroposlib_vllm_client_and_managed_server_read_our_answers(server, tiny_model_path):
    """The real atroposlib 0.4.0 client (its own venv): VLLMServer and ManagedServer against our /generate."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    out = procs.run([str(ATROPOS_PYTHON), "-c", ATROPOS_CLIENT, server.url, str(tiny_model_path)], timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    direct = result["direct"]
    assert len(direct["tokens"]) == 2 and direct["finish"] == ["length", "length"]
    again = server.post("/generate", {**direct["request"], "logprobs": 0}).json()  # same seed: same samples
    assert direct["tokens"] == again["token_ids"]
    expected = [next(iter(entry[0].values())) for row in again["logprobs"] for entry in row]
    assert [lp for row in direct["logprobs"] for lp in row] == pytest.approx(expected, abs=1e-4)
    for node in result["nodes"]:  # ManagedServer's training view: prompt masked, completion logprobs aligned
        n_prompt = node["masked_tokens"].count(-100)
        assert node["logprobs"][:n_prompt] == [1.0] * n_prompt
        assert node["masked_tokens"][n_prompt:] == node["tokens"][n_prompt:]
        assert all(lp <= 0 for lp in node["logprobs"][n_prompt:])
