"""An external RL environment in its own process: sample groups from a running paraloop over HTTP, score them,
and print them as Atropos ScoredData (or post them to an Atropos API server).

    paraloop serve --model-path models/smollm2 --port 8000        # or a `paraloop run` (it serves the same API)
    python examples/external_env.py --url http://127.0.0.1:8000 --model-path models/smollm2 --groups 4
    python examples/external_env.py ... --atropos-url http://127.0.0.1:8001   # feed a trainer through Atropos

What it shows, in order (see `sample_group`): the environment applies the chat template itself, so it knows the
exact prompt ids; it asks for all `group_size` samples of one prompt in ONE request (n=group_size); it keeps the
token ids and log-probs the server reports for every sampled token (paraloop adds `token_ids`, `logprobs`/
`token_logprobs` and `adapter_versions` to each answer) instead of re-tokenising the text, which would train on
tokens the policy never produced; it builds the Atropos group: tokens = prompt + completion ids, masks -100 over
the prompt and the token id over the completion, inference_logprobs 1.0 over the prompt and the sampling
log-probs over the completion, scores from the reward.

Two endpoints: `generate` (vLLM-style /generate with prompt token ids, what Atropos' vllm server type uses) and
`chat` (OpenAI /v1/chat/completions; the server applies the same chat template from the messages). Needs only the
model directory's tokenizer (transformers) and the standard library; rewards come from paraloop's tasks, but any
function of the completion would do.
"""

import argparse
import json
import os
import random
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from paraloop.envs.tasks import Sample, load_task

PROMPT_MASK = -100
PROMPT_LOGPROB = 1.0


def post(url: str, body: dict[str, Any], *, timeout: float = 600) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        raise SystemExit(f"external_env: POST {url} answered {e.code}: {e.read().decode(errors='replace')}") from None
    except urllib.error.URLError as e:
        raise SystemExit(f"external_env: cannot reach {url}: {e.reason}") from None


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])  # transformers 5 returns a BatchEncoding


def sample_rows(args: argparse.Namespace, messages: list[dict], prompt: list[int], seed: int) -> list[dict]:
    """One request for the whole group; per row: token ids, their log-probs, finish reason, text, versions."""
    params = {
        "n": args.group_size,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "seed": seed,
    }
    if args.endpoint == "generate":
        answer = post(f"{args.url}/generate", {"prompt": {"prompt_token_ids": prompt}, "logprobs": 0, **params})
        if answer["prompt_token_ids"] != prompt:
            raise SystemExit("external_env: the server changed the prompt ids")
        return [
            {
                "tokens": ids,
                # each entry is [{"<sampled id>": logprob, ...alternatives}]: the sampled token comes first
                "logprobs": [next(iter(entry[0].values())) for entry in lps],
                "finish_reason": finish,
                "text": text,
                "versions": versions,
            }
            for ids, lps, finish, text, versions in zip(
                answer["token_ids"],
                answer["logprobs"],
                answer["finish_reasons"],
                answer["text"],
                answer["adapter_versions"],
                strict=True,
            )
        ]
    answer = post(f"{args.url}/v1/chat/completions", {"messages": messages, **params})
    return [
        {
            "tokens": choice["token_ids"],
            "logprobs": choice["token_logprobs"],
            "finish_reason": choice["finish_reason"],
            "text": choice["message"]["content"],
            "versions": choice["adapter_versions"],
        }
        for choice in answer["choices"]
    ]


def sample_group(args: argparse.Namespace, tokenizer: Any, task: Any, rng: random.Random) -> dict[str, Any]:
    """One scored Atropos group (ScoredData) for one prompt drawn from the task."""
    messages = task.prompt(rng)
    prompt = chat_prompt_ids(tokenizer, messages)
    rows = sample_rows(args, messages, prompt, seed=rng.getrandbits(31))
    if len(rows) != args.group_size or any(r["finish_reason"] == "abort" for r in rows):
        raise SystemExit("external_env: the server did not complete every sample (is it stopping?)")
    scores = []
    for row in rows:
        ids = row["tokens"]
        text_ids = ids[:-1] if row["finish_reason"] == "stop" and ids and ids[-1] == tokenizer.eos_token_id else ids
        sample = Sample(
            prompt=messages,
            text=row["text"],
            finish_reason=row["finish_reason"],
            tokens=ids,
            pieces=[tokenizer.decode([t]) for t in text_ids],
        )
        scores.append(float(task.reward(sample)))
    return {
        "tokens": [prompt + r["tokens"] for r in rows],
        "masks": [[PROMPT_MASK] * len(prompt) + r["tokens"] for r in rows],
        "scores": scores,
        "inference_logprobs": [[PROMPT_LOGPROB] * len(prompt) + r["logprobs"] for r in rows],
        "generation_params": {"temperature": args.temperature},
        # not part of ScoredData: what produced the group, for the log line
        "_adapter_versions": sorted({v for r in rows for v in r["versions"]}),
        "_prompt": messages[-1]["content"],
    }


def register_env(args: argparse.Namespace) -> int:
    """Atropos hands out an env_id only once its trainer has asked for a first batch: retry until then."""
    body = {
        "max_token_length": args.max_token_length,
        "desired_name": "paraloop-external-example",
        "weight": 1.0,
        "group_size": args.group_size,
    }
    deadline = time.monotonic() + args.wait_s
    while True:
        answer = post(f"{args.atropos_url}/register-env", body)
        if answer.get("status") == "success":
            return int(answer["env_id"])
        if time.monotonic() > deadline:
            raise SystemExit(f"external_env: Atropos did not accept the environment within {args.wait_s} s: {answer}")
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="paraloop serve/run base URL")
    parser.add_argument("--model-path", required=True, help="model directory (its tokenizer and chat template)")
    parser.add_argument("--task", default="paraloop.envs.tasks:one_word", help="reward task, module:function")
    parser.add_argument("--endpoint", choices=("generate", "chat"), default="generate")
    parser.add_argument("--groups", type=int, default=4, help="groups to sample")
    parser.add_argument("--group-size", type=int, default=8, help="samples per prompt (n)")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--atropos-url", help="post each group to this Atropos API's /scored_data")
    parser.add_argument("--max-token-length", type=int, default=4096, help="sent to Atropos /register-env")
    parser.add_argument("--wait-s", type=float, default=60.0, help="how long to wait for Atropos to accept us")
    args = parser.parse_args(argv)
    args.url = args.url.rstrip("/")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory; never reach out to the Hub
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    try:
        task = load_task(args.task)
    except ValueError as e:
        raise SystemExit(f"external_env: {e}") from None
    env_id = register_env(args) if args.atropos_url else None
    rng = random.Random(args.seed)
    for i in range(args.groups):
        group = sample_group(args, tokenizer, task, rng)
        versions, prompt = group.pop("_adapter_versions"), group.pop("_prompt")
        mean = sum(group["scores"]) / len(group["scores"])
        print(f"group {i}: {prompt!r} mean score {mean:.3f}, adapter versions {versions}", file=sys.stderr)
        if env_id is not None:
            post(f"{args.atropos_url}/scored_data", {**group, "env_id": env_id})
        else:
            print(json.dumps(group), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
