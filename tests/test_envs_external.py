"""examples/external_env.py against a real `paraloop serve` on the tiny model: a separate process builds Atropos
groups from the server's own token ids and log-probs, the same through /generate and /v1/chat/completions, and
(with the Atropos venv) delivers them to a real run-api that hands them to a trainer unchanged."""

import json
import os
import sys
import urllib.request
from pathlib import Path

import pytest

from support import procs
from support import free_port
from support.serving import Serve
from support.run_api import run_api
from paraloop.envs.tasks import TINY_PROMPTS, Sample, capitals

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "external_env.py"
DEADLINE_S = 90  # only bounds a hang


@pytest.fixture(scope="module")
def server(tiny_model_path):
    with Serve("--model-path", str(tiny_model_path)) as serve:
        yield serve


def example_cmd(server: Serve, model: Path, *args: str) -> list[str]:
    """examples/external_env.py making two groups of four on the capitals task against `server`."""
    return [
        sys.executable,
        str(EXAMPLE),
        "--url",
        server.url,
        "--model-path",
        str(model),
        "--task",
        "paraloop.envs.tasks:capitals",
        "--groups",
        "2",
        "--group-size",
        "4",
        "--max-tokens",
        "6",
        "--seed",
        "3",
        *args,
    ]


def run_example(server: Serve, model: Path, *args: str) -> list[dict]:
    cmd = example_cmd(server, model, *args)
    result = procs.run(cmd, timeout=DEADLINE_S)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("group ") == 2  # one log line per group
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_path))


def chat_ids(tokenizer, content: str) -> list[int]:
    return list(
        tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)["input_ids"]
    )


def same_logprobs(a: dict, b: dict) -> bool:
    rows = zip(a["inference_logprobs"], b["inference_logprobs"], strict=True)
    return all(x == pytest.approx(y, abs=1e-6) for x, y in rows)


@pytest.fixture(scope="module")
def via_generate(server, tiny_model_path) -> list[dict]:
    return run_example(server, tiny_model_path, "--endpoint", "generate")


def test_groups_from_generate_are_atropos_groups_of_the_servers_own_ids(via_generate, tokenizer):
    groups = via_generate
    assert len(groups) == 2
    templates = {tuple(chat_ids(tokenizer, p)): p for p in TINY_PROMPTS}
    for group in groups:
        assert set(group) == {"tokens", "masks", "scores", "inference_logprobs", "generation_params"}
        assert group["generation_params"] == {"temperature": 1.0}
        assert len(group["tokens"]) == 4
        prompt_len = group["masks"][0].count(-100)
        prompt = group["tokens"][0][:prompt_len]
        assert tuple(prompt) in templates  # the chat template, applied by the environment
        for tokens, masks, logprobs, score in zip(
            group["tokens"], group["masks"], group["inference_logprobs"], group["scores"], strict=True
        ):
            completion = tokens[prompt_len:]
            assert tokens[:prompt_len] == prompt and 1 <= len(completion) <= 6
            assert masks == [-100] * prompt_len + completion
            assert logprobs[:prompt_len] == [1.0] * prompt_len
            assert len(logprobs) == len(tokens) and all(lp <= 0 for lp in logprobs[prompt_len:])
            text_ids = completion[:-1] if completion[-1] == tokenizer.eos_token_id else completion
            pieces = [tokenizer.decode([t]) for t in text_ids]
            assert score == capitals().reward(Sample(prompt=[], text="", finish_reason="length", pieces=pieces))


def test_chat_completions_give_the_same_groups_as_generate(server, tiny_model_path, via_generate):
    # same seeds, same prompt ids: the server samples the same tokens whichever endpoint asks
    via_chat = run_example(server, tiny_model_path, "--endpoint", "chat")
    for a, b in zip(via_generate, via_chat, strict=True):
        assert a["tokens"] == b["tokens"] and a["masks"] == b["masks"] and a["scores"] == b["scores"]
        assert same_logprobs(a, b)


def test_an_unreachable_server_is_one_clear_error(tiny_model_path):
    port = free_port()  # closed again: nothing listens there
    result = procs.run(
        [sys.executable, str(EXAMPLE), "--url", f"http://127.0.0.1:{port}", "--model-path", str(tiny_model_path)],
        timeout=DEADLINE_S,
    )
    assert result.returncode == 1
    assert f"external_env: cannot reach http://127.0.0.1:{port}/generate" in result.stderr


def http(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=DEADLINE_S) as response:
        return json.loads(response.read())


@pytest.mark.atropos
def test_posted_groups_reach_an_atropos_trainer_unchanged(server, tiny_model_path, via_generate):
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    with run_api(port):
        # the trainer's side: register, then a first /batch, which lets environments register
        http(
            api + "/register",
            {
                "wandb_group": "g",
                "wandb_project": "p",
                "batch_size": 8,
                "max_token_len": 512,
                "checkpoint_dir": "",
                "save_checkpoint_interval": 0,
                "starting_step": 0,
                "num_steps": 1,
            },
        )
        assert http(api + "/batch")["batch"] is None
        printed = run_example(server, tiny_model_path, "--endpoint", "generate")  # the same groups, for reference
        cmd = example_cmd(server, tiny_model_path, "--atropos-url", api)
        result = procs.run(cmd, timeout=DEADLINE_S)
        assert result.returncode == 0, result.stderr
        assert result.stdout == ""  # posted, not printed
        batch = http(api + "/batch")["batch"]
        assert len(batch) == 2
        for got, want in zip(
            sorted(batch, key=lambda g: g["tokens"]), sorted(printed, key=lambda g: g["tokens"]), strict=True
        ):
            assert got["tokens"] == want["tokens"] and got["masks"] == want["masks"]
            assert got["scores"] == want["scores"] and got["env_id"] == 0
            assert same_logprobs(got, want)
