"""The HTTP servers under comparison and a closed-loop load generator for them.

Servers: `paraloop serve` (model.compute=auto: the 4-bit model dequantized to float32 on the CPU; also with its
prefix cache off, `engine.prefix_cache_mb=0`, for diagnostics) and mlx-lm's own server (`mlx_lm.server`) on the
4-bit model and on the float32 copy (also with its prompt cache off). Both processes get the same OpenBLAS: mlx_lm's
server is started after `import paraloop`, which preloads it. Each server runs in its own process group on
127.0.0.1 and is reused by the benchmarks of one run (see `server`), then killed by the harness.

Load: `closed_loop` runs C clients, each sending its requests one after another, and counts generated tokens from
each answer's `usage.completion_tokens`. EOS is switched off so every request decodes exactly max_tokens tokens:
paraloop takes `ignore_eos`; mlx_lm.server has no such field, so it gets a -1e9 `logit_bias` on the EOS tokens.
mlx_lm.server turns off batching for requests with a `seed`, so the load never sends one.
"""

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.harness import Context, free_port, python_cmd, wait_until

KINDS = {
    "paraloop": "paraloop serve, 4-bit model (dequantized to f32)",
    "mlx_lm_q4": "mlx_lm.server, 4-bit model",
    "mlx_lm_f32": "mlx_lm.server, float32 copy",
}
DIAGNOSTIC_KINDS = {
    "mlx_lm_f32_nocache": "mlx_lm.server, float32 copy, prompt cache off",
    "paraloop_nocache": "paraloop serve, prefix cache off",
}
MLX_LM_SERVER = "import paraloop; from mlx_lm.server import main; main()"  # the OpenBLAS preload, then mlx_lm
START_TIMEOUT_S = 180
TOPICS = (
    "a lighthouse keeper",
    "a lost robot",
    "the ocean",
    "a dragon who cannot fly",
    "a city at night",
    "an old clock",
    "a mountain village",
    "a space station",
    "a forgotten library",
    "a winter storm",
    "a talking cat",
    "the first day of school",
    "a desert caravan",
    "a haunted ship",
    "a garden in spring",
    "a chess champion",
)


@dataclass
class Server:
    kind: str
    url: str
    eos_ids: list[int] = field(default_factory=list)

    @property
    def is_paraloop(self) -> bool:
        return self.kind.startswith("paraloop")

    def no_eos(self) -> dict[str, Any]:
        """Body fields that keep the server decoding until max_tokens."""
        if self.is_paraloop:
            return {"ignore_eos": True}
        return {"logit_bias": {str(t): -1e9 for t in self.eos_ids}}


def eos_ids(model: Path) -> list[int]:
    from mlx_lm.utils import load_tokenizer

    return sorted(load_tokenizer(model).eos_token_ids)


def server(ctx: Context, kind: str) -> Server:
    """The running server of this kind, started (and health-checked) on first use."""
    pool: dict[str, Server] = ctx.shared.setdefault("servers", {})
    running = pool.get(kind)
    if running is not None and any(c.name == kind and c.alive() for c in ctx.children):
        return running
    port = free_port()
    if kind.startswith("paraloop"):
        model = ctx.model_q4
        cmd = python_cmd(
            "-m",
            "paraloop",
            "serve",
            "--model-path",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--set",
            "server.batch_size=32",
            "--set",
            "engine.max_n=64",
        )
        if kind.endswith("_nocache"):
            cmd += ["--set", "engine.prefix_cache_mb=0"]
    else:
        model = ctx.model_q4 if kind == "mlx_lm_q4" else ctx.model_f32
        cmd = python_cmd(
            "-c",
            MLX_LM_SERVER,
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--decode-concurrency",
            "32",
            "--prompt-concurrency",
            "8",
            "--log-level",
            "WARNING",
        )
        if kind.endswith("_nocache"):  # no reuse of cached prompt prefixes
            cmd += ["--prompt-cache-size", "0"]
    child = ctx.spawn(kind, cmd)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if not child.alive():
            raise RuntimeError(f"{kind} exited with {child.proc.returncode} while starting:\n{child.tail()}")
        try:
            return asyncio.run(_get_ok(f"{url}/health"))
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    wait_until(ready, timeout_s=START_TIMEOUT_S, interval_s=0.5, what=f"{kind} to answer /health")
    pool[kind] = Server(kind, url, eos_ids(model))
    return pool[kind]


async def _get_ok(url: str) -> bool:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        async with session.get(url) as response:
            return response.status == 200


# --- requests ----------------------------------------------------------------------------------------------------


def long_context(words: int) -> str:
    """Background text of about `words` words (~1.3 tokens each), for prompts where prefill matters."""
    sentences = [f"Note {i}: the story may mention {topic}." for i, topic in enumerate(TOPICS * 50)]
    text, count = [], 0
    for sentence in sentences:
        if count >= words:
            break
        text.append(sentence)
        count += len(sentence.split())
    return " ".join(text) + "\n\n"


def story_body(srv: Server, index: int, *, max_tokens: int, n: int | None = None, prefix: str = "") -> dict[str, Any]:
    """A chat request asking for a long answer, decoded to exactly max_tokens tokens."""
    topic = TOPICS[index % len(TOPICS)]
    body = {
        "messages": [{"role": "user", "content": f"{prefix}Write a long story about {topic} (story {index})."}],
        "max_tokens": max_tokens,
        "temperature": 1.0,
        **srv.no_eos(),
    }
    if n is not None:
        body["n"] = n
    return body


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with session.post(url, json=body) as response:
        payload = await response.json(content_type=None)
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status} from {url}: {payload}")
        return payload


@dataclass
class LoadResult:
    tokens: int
    wall_s: float
    requests: int
    failed: int
    latencies_s: list[float]

    def __add__(self, other: "LoadResult") -> "LoadResult":
        return LoadResult(
            self.tokens + other.tokens,
            self.wall_s + other.wall_s,
            self.requests + other.requests,
            self.failed + other.failed,
            self.latencies_s + other.latencies_s,
        )

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0


async def _closed_loop(url: str, bodies: list[list[dict[str, Any]]], timeout_s: float) -> LoadResult:
    tokens, failed, latencies = 0, 0, []
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def client(own: list[dict[str, Any]]) -> None:
            nonlocal tokens, failed
            for body in own:
                sent = time.perf_counter()
                try:
                    answer = await post(session, url, body)
                except (TimeoutError, aiohttp.ClientError, RuntimeError):
                    failed += 1
                    continue
                latencies.append(time.perf_counter() - sent)
                tokens += int(answer["usage"]["completion_tokens"])

        start = time.perf_counter()
        await asyncio.gather(*(client(own) for own in bodies))
        wall = time.perf_counter() - start
    return LoadResult(tokens, wall, sum(map(len, bodies)), failed, latencies)


def closed_loop(
    srv: Server,
    *,
    clients: int,
    per_client: int,
    max_tokens: int,
    n: int | None = None,
    same_prompt: bool = False,
    first: int = 0,
    prefix: str = "",
    timeout_s: float = 600,
    extra: Callable[[int], dict[str, Any]] | None = None,
) -> LoadResult:
    """`clients` concurrent clients, each sending `per_client` chat requests in a row; prompts are numbered from
    `first` (distinct prompts per round keep mlx_lm.server's prompt cache from replaying a previous round).
    `extra(client)`: more body fields for that client's requests (e.g. which adapter)."""
    bodies = [
        [
            story_body(
                srv, first if same_prompt else first + c * per_client + i, max_tokens=max_tokens, n=n, prefix=prefix
            )
            | (extra(c) if extra else {})
            for i in range(per_client)
        ]
        for c in range(clients)
    ]
    return asyncio.run(_closed_loop(f"{srv.url}/v1/chat/completions", bodies, timeout_s))


def ask(srv: Server, question: str, *, max_tokens: int = 24) -> str:
    """A greedy chat answer with EOS on: the sanity check that the server's model is the real one."""
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0.0}

    async def once() -> dict[str, Any]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
            return await post(session, f"{srv.url}/v1/chat/completions", body)

    return asyncio.run(once())["choices"][0]["message"]["content"]
