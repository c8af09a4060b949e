"""A real Atropos environment process (tests/scripts/atropos_env.py, atroposlib's BaseEnv + ManagedServer, server type
vllm)
feeding AtroposClient through the real run-api, its /generate calls answered by a recording stub or `paraloop serve`.

What must hold: every sequence is prompt + generated tokens exactly as the inference server returned them, masks are
-100 on the prompt and the token id on generated positions, inference_logprobs are 1.0 on the prompt and the
server's logprobs on generated positions, scores and env_id arrive, and batches hold batch_size sequences.
"""

import asyncio
import os
import random
import sys
from pathlib import Path

import pytest
from aiohttp import web

from support import free_port

from paraloop.atropos.client import AtroposClient
from paraloop.atropos.launch import ENV_SHIM, ProcessGroup, start_run_api, wait_http
from paraloop.config import AtroposConfig

REPO = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("PARALOOP_ATROPOS_VENV", REPO / ".venv-atropos"))
RUN_API, ENV_PYTHON = VENV / "bin" / "run-api", VENV / "bin" / "python"
ENV_SCRIPT = Path(__file__).with_name("scripts") / "atropos_env.py"
BATCH_SIZE, GROUP_SIZE, STEPS = 4, 2, 2

pytestmark = [
    pytest.mark.atropos,
    pytest.mark.timeout(240),
]


class GenerateStub:
    """vLLM-style POST /generate and GET /health; random tokens and logprobs, every answer recorded."""

    def __init__(self, *, vocab: int, first_id: int = 3) -> None:
        self.rng = random.Random(0)
        self.vocab, self.first_id = vocab, first_id
        self.answers: dict[tuple[int, ...], tuple[list[float], list[int]]] = {}  # full sequence -> (lps, prompt)
        self.requests: list[dict] = []

    async def generate(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        prompt = body["prompt"]["prompt_token_ids"]
        rows, finish = [], []
        for _ in range(body.get("n", 1)):
            length = self.rng.randint(1, body.get("max_tokens", 16))
            tokens = [self.rng.randrange(self.first_id, self.vocab) for _ in range(length)]
            logprobs = [-round(self.rng.uniform(0.01, 6.0), 6) for _ in tokens]
            self.answers[tuple(prompt + tokens)] = (logprobs, prompt)
            rows.append([[{str(t): lp}] for t, lp in zip(tokens, logprobs, strict=True)])
            finish.append("length" if length == body.get("max_tokens") else "stop")
        return web.json_response({"logprobs": rows, "finish_reasons": finish})

    async def start(self) -> tuple[web.AppRunner, int]:
        app = web.Application()
        app.router.add_post("/generate", self.generate)
        app.router.add_get("/health", lambda _: web.Response(text="ok"))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, site._server.sockets[0].getsockname()[1]


def env_argv(*, api_url: str, server_port: int, model_dir: Path, shim: bool) -> list[str]:
    run = [str(ENV_PYTHON), str(ENV_SHIM), str(ENV_SCRIPT)] if shim else [str(ENV_PYTHON), str(ENV_SCRIPT)]
    return [
        *run,
        "serve",
        "--env.rollout_server_url",
        api_url,
        "--env.tokenizer_name",
        str(model_dir),
        "--env.group_size",
        str(GROUP_SIZE),
        "--env.total_steps",
        str(STEPS + 2),
        "--openai.base_url",
        f"http://127.0.0.1:{server_port}/v1",
        "--openai.server_type",
        "vllm",
        "--openai.tokenizer_name",
        str(model_dir),
        "--openai.model_name",
        "paraloop",
    ]


async def batches_from_real_env(
    procs: ProcessGroup, *, server_port: int, model_dir: Path, run_dir: Path, single_server_config: bool = False
) -> tuple:
    """Start run-api and the environment, register a client and take STEPS batches from it. With
    single_server_config the environment returns a bare server config (like GSM8K) and runs through env_shim.py."""
    api_url = f"http://127.0.0.1:{free_port()}"
    await start_run_api(procs, str(RUN_API), api_url)
    client = AtroposClient(
        AtroposConfig(api_url=api_url, poll_interval=0.1, max_backoff=1.0),
        batch_size=BATCH_SIZE,
        token_budget=4096,
        total_steps=STEPS,
        checkpoint_dir=str(run_dir),
    )
    await client.register()
    argv = env_argv(api_url=api_url, server_port=server_port, model_dir=model_dir, shim=single_server_config)
    extra_env = {"ATROPOS_TEST_SINGLE_SERVER_CONFIG": "1"} if single_server_config else {}
    env = await procs.start("env", argv, env=extra_env)
    batches = []
    async with asyncio.timeout(90):
        async for batch in client.batches():
            batches.append(batch)
            if len(batches) == STEPS:
                break
    assert env.returncode is None, "the environment process died"
    return batches, client.status()


def check_batches(batches: list, status: dict) -> None:
    assert len(batches) == STEPS
    for batch in batches:
        assert batch.source == "atropos" and isinstance(batch.source_step, int)
        assert sum(len(g.tokens) for g in batch.groups) == BATCH_SIZE
        for g in batch.groups:
            assert len(g.tokens) == GROUP_SIZE and g.env_id == 0
            assert g.generation_params == {"temperature": 1.0, "max_tokens": 16}
            assert len(g.scores) == GROUP_SIZE and all(0.0 <= s <= 1.1 for s in g.scores)
    assert status["groups_rejected"] == 0 and status["per_env"]["0"]["groups"] == STEPS * BATCH_SIZE // GROUP_SIZE


def test_a_real_environment_sends_what_the_inference_server_generated(tiny_model_path, tmp_path):
    stub = GenerateStub(vocab=1024)

    async def scenario():
        runner, port = await stub.start()
        try:
            async with ProcessGroup(grace=5) as procs:
                # GSM8K-style single server config: only env_shim.py makes it call this stub, not :9004.
                return await batches_from_real_env(
                    procs, server_port=port, model_dir=tiny_model_path, run_dir=tmp_path, single_server_config=True
                )
        finally:
            await runner.cleanup()

    batches, status = asyncio.run(scenario())
    check_batches(batches, status)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_model_path / "tokenizer.json"))
    for g in (g for b in batches for g in b.groups):
        for tokens, mask, lps in zip(g.tokens, g.masks, g.inference_logprobs, strict=True):
            logprobs, prompt = stub.answers[tuple(tokens)]  # exactly a sequence the server generated
            generated = tokens[len(prompt) :]
            assert mask == [-100] * len(prompt) + generated
            assert lps == [1.0] * len(prompt) + logprobs
            # The env applied the chat template itself and sent token ids: /generate must not re-template.
            text = tokenizer.decode(prompt, skip_special_tokens=False)
            assert text.startswith("<|im_start|>user\nWhat is ") and text.endswith("<|im_start|>assistant\n")
    assert all(r["n"] == GROUP_SIZE and r["logprobs"] == 0 for r in stub.requests)


def test_a_real_environment_served_by_paraloop_serve(tiny_model_path, tmp_path):
    port = free_port()

    async def scenario():
        async with ProcessGroup(grace=10) as procs:
            server = await procs.start(
                "serve",
                [
                    sys.executable,
                    "-m",
                    "paraloop",
                    "serve",
                    "--model-path",
                    str(tiny_model_path),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ],
            )
            async with asyncio.timeout(120):
                await wait_http(f"http://127.0.0.1:{port}/health", proc=server)
            return await batches_from_real_env(procs, server_port=port, model_dir=tiny_model_path, run_dir=tmp_path)

    batches, status = asyncio.run(scenario())
    check_batches(batches, status)
    # The logprobs are the model's: recompute log-softmax at temperature 1 for every generated token.
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(tiny_model_path))
    for g in (g for b in batches for g in b.groups):
        for tokens, mask, lps in zip(g.tokens, g.masks, g.inference_logprobs, strict=True):
            first = next(j for j, m in enumerate(mask) if m != -100)
            assert all(m == -100 for m in mask[:first]) and mask[first:] == tokens[first:]
            assert lps[:first] == [1.0] * first
            logits = model(mx.array(tokens[:-1])[None])[0].astype(mx.float32)
            expected = (logits - mx.logsumexp(logits, axis=-1, keepdims=True))[
                mx.arange(len(tokens) - 1), mx.array(tokens[1:])
            ]
            assert mx.allclose(mx.array(lps[first:]), expected[first - 1 :], atol=2e-3).item()
