"""Many adapters on one base: 32 streams over 4 LoRA adapters in one decode batch, SmolLM2-135M.

In process (no HTTP): the engine serves a policy adapter and 4 named adapters (rank 16 on every linear layer: 30
blocks x 7 = 210 layers each, random weights). Rounds alternate between 32 streams spread over the 4 named
adapters (8 each: every decode step gathers each row's adapter) and 32 streams on the policy alone (the
one-adapter fast path), and between that fast path and the same engine with its layers switched back to mlx-lm's
plain LoRALinear for the round (what decoding cost before per-row adapters); tokens/s compare summed tokens over
summed time. Over HTTP: `paraloop serve --lora-modules` with the same 4 adapters, 32 clients each naming one by
`model`, against mlx_lm.server (float32 copy, its fastest form on this CPU) given each adapter per request
(`"adapters": path`): it serves one adapter at a time and reloads the model to change it. Load time: an adapter
read from disk, checked and installed by the engine, against mlx-lm's own `load_adapters` onto a loaded model.
"""

import contextlib
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import servers
from bench.harness import Context, Line, free_port, python_cmd, wait_until

NAME = "multilora"
TITLE = "12. Many adapters in one batch (SmolLM2-135M, 32 streams, 4 adapters)"
BUDGET_S = 360
STREAMS = 32
ADAPTERS = 4
RANK = 16


def write_adapters(model_path: Path, out: Path) -> tuple[list[Path], dict]:
    """ADAPTERS random rank-16 adapters on every linear layer (mlx-lm's format) and one more for the policy."""
    import mlx.core as mx

    from paraloop.config import LoraConfig
    from paraloop.lora import adapter_arrays, adapter_config, attach_lora, save_adapter
    from paraloop.model import load_model

    model, _, _, _ = load_model(model_path)
    config = adapter_config(LoraConfig(rank=RANK, keys="all", num_layers=-1, dropout=0.0), model)
    attach_lora(model, config, seed=0)
    paths = []
    for i in range(ADAPTERS + 1):
        mx.random.seed(100 + i)
        arrays = {k: 0.02 * mx.random.normal(v.shape) for k, v in adapter_arrays(model).items()}
        paths.append(out / f"adapter{i}")
        save_adapter(paths[-1], arrays, config)
    return paths, config


@contextlib.contextmanager
def plain_layers(model: Any) -> Iterator[None]:
    """The model's routed LoRA layers as mlx-lm's LoRALinear for the block: decoding as before per-row adapters."""
    from mlx_lm.tuner.lora import LoRALinear

    from paraloop.engine.lora_rows import RoutedLoRALinear

    layers = [m for _, m in model.named_modules() if isinstance(m, RoutedLoRALinear) and m.adapters.policy]
    for layer in layers:
        layer.__class__ = LoRALinear
    try:
        yield
    finally:
        for layer in layers:
            layer.__class__ = RoutedLoRALinear


def in_process(ctx: Context, paths: list[Path], *, max_tokens: int, rounds: int) -> dict[str, Any]:
    import anyio

    from paraloop.config import EngineConfig
    from paraloop.engine import Engine
    from paraloop.lora import AdapterSlots, apply_adapter
    from paraloop.messages import GenerateRequest, SamplingParams
    from paraloop.model import load_model

    model, tokenizer, _, _ = load_model(ctx.model_q4)
    apply_adapter(model, paths[-1])
    engine = Engine(
        model, tokenizer, config=EngineConfig(), batch_size=STREAMS, adapter=AdapterSlots(model), max_lora_rank=RANK
    )
    names = [f"adapter{i}" for i in range(ADAPTERS)]
    params = SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True)
    totals: dict[str, list[float]] = {"mixed": [0, 0], "one": [0, 0], "plain": [0, 0]}
    loads, installs = [], []

    async def batch(kind: str, first: int) -> None:
        adapters = names if kind == "mixed" else ["policy"]
        requests = [
            GenerateRequest(
                request_id=f"{kind}-{first + i}",
                adapter=adapters[i % len(adapters)],
                prompt_tokens=tokenizer.encode(f"Story {first + i}: once upon a time, in a land"),
                params=params,
            )
            for i in range(STREAMS)
        ]
        start = time.perf_counter()
        with plain_layers(model) if kind == "plain" else contextlib.nullcontext():
            out = await engine.complete_many(requests)
        totals[kind][0] += sum(len(rows[0].tokens) for rows in out)
        totals[kind][1] += time.perf_counter() - start

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            for name, path in zip(names, paths, strict=False):
                start = time.perf_counter()
                adapter = await engine.adapters.load(name, path)
                loads.append(time.perf_counter() - start)
                installs.append(adapter.install_s)
            await batch("mixed", 10_000)  # warm-up (not counted): stacks built, kernels touched
            await batch("one", 20_000)
            for kind in totals:
                totals[kind] = [0, 0]
            for r in range(rounds):
                order = ["mixed", "one", "plain"]
                for kind in order if r % 2 else order[::-1]:  # alternate who goes first
                    await batch(kind, 1000 * (r + 1) + 100 * order.index(kind))
            tg.cancel_scope.cancel()

    anyio.run(main)
    rate = {k: n / s for k, (n, s) in totals.items()}
    return {"tokens_per_s": rate, "load_s": loads, "install_s": installs, "stats": engine.stats(), "totals": totals}


def mlx_lm_load_time(ctx: Context, path: Path, repeats: int) -> list[float]:
    """mlx-lm's load_adapters (LoRA layers + load_weights) onto an already loaded model, per adapter load."""
    import mlx.core as mx
    from mlx_lm.tuner.utils import load_adapters

    from paraloop.model import load_model

    out = []
    for _ in range(repeats):
        model, _, _, _ = load_model(ctx.model_q4)
        start = time.perf_counter()
        load_adapters(model, str(path))
        mx.eval(model.parameters())
        out.append(time.perf_counter() - start)
    return out


def paraloop_server(ctx: Context, paths: list[Path]) -> servers.Server:
    port = free_port()
    modules = [f"adapter{i}={p}" for i, p in enumerate(paths[:ADAPTERS])]
    cmd = python_cmd(
        "-m",
        "paraloop",
        "serve",
        "--model-path",
        str(ctx.model_q4),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--set",
        f"server.batch_size={STREAMS}",
        "--lora-modules",
        *modules,
    )
    child = ctx.spawn("paraloop_multilora", cmd)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if not child.alive():
            raise RuntimeError(f"paraloop serve exited with {child.proc.returncode} while starting:\n{child.tail()}")
        try:
            return servers.asyncio.run(servers._get_ok(f"{url}/health"))
        except (TimeoutError, servers.aiohttp.ClientError, OSError):
            return False

    wait_until(ready, timeout_s=servers.START_TIMEOUT_S, interval_s=0.5, what="paraloop serve to answer /health")
    return servers.Server("paraloop_multilora", url, servers.eos_ids(ctx.model_q4))


def over_http(ctx: Context, paths: list[Path], *, per_client: int, max_tokens: int) -> dict[str, servers.LoadResult]:
    ours = paraloop_server(ctx, paths)
    theirs = servers.server(ctx, "mlx_lm_f32")
    pick_ours = lambda c: {"model": f"adapter{c % ADAPTERS}"}  # noqa: E731
    pick_theirs = lambda c: {"model": str(ctx.model_f32), "adapters": str(paths[c % ADAPTERS])}  # noqa: E731
    servers.closed_loop(ours, clients=8, per_client=1, max_tokens=4, extra=pick_ours)  # warm-up
    out = {}
    for name, srv, pick in (("paraloop", ours, pick_ours), ("mlx_lm", theirs, pick_theirs)):
        out[name] = servers.closed_loop(
            srv, clients=STREAMS, per_client=per_client, max_tokens=max_tokens, first=5000, extra=pick
        )
    return out


def run(ctx: Context) -> list[Line]:
    max_tokens, rounds = (16, 2) if ctx.quick else (64, 4)
    with tempfile.TemporaryDirectory(prefix="paraloop-bench-multilora-") as tmp:
        paths, _ = write_adapters(ctx.model_q4, Path(tmp))
        local = in_process(ctx, paths, max_tokens=max_tokens, rounds=rounds)
        theirs_load = mlx_lm_load_time(ctx, paths[0], repeats=2 if ctx.quick else 4)
        http = over_http(ctx, paths, per_client=1 if ctx.quick else 2, max_tokens=8 if ctx.quick else 32)
    rate = local["tokens_per_s"]
    load, install = statistics.median(local["load_s"]), statistics.median(local["install_s"])
    ms = 1e3
    failed = http["paraloop"].failed + http["mlx_lm"].failed
    detail = {
        "in_process": local,
        "mlx_lm_load_adapters_s": theirs_load,
        "http": {k: vars(v) for k, v in http.items()},
        "max_tokens": max_tokens,
        "rounds": rounds,
    }
    return [
        Line(
            NAME,
            f"{STREAMS} streams over {ADAPTERS} adapters (gathered per row) over {STREAMS} on one adapter, tokens/s",
            rate["mixed"],
            rate["one"],
            "tok/s",
            ">= 0.8",
            detail=detail,
        ),
        Line(
            NAME,
            f"{STREAMS} streams on one adapter over the same with mlx-lm's plain LoRALinear layers",
            rate["one"],
            rate["plain"],
            "tok/s",
            ">= 0.95",
            note="the one-adapter fast path costs nothing",
        ),
        Line(
            NAME,
            f"HTTP, {STREAMS} clients naming {ADAPTERS} adapters: paraloop serve over mlx_lm.server "
            "loading them per request",
            http["paraloop"].tokens_per_s,
            http["mlx_lm"].tokens_per_s,
            "tok/s",
            note=f"{failed} failed requests" if failed else "mlx_lm.server reloads the model to change adapter",
        ),
        Line(
            NAME,
            f"adapter load from disk (rank {RANK}, 210 layers: read, check, install) over mlx-lm's load_adapters",
            load * ms,
            statistics.median(theirs_load) * ms,
            "ms",
            note=f"decode paused {install * ms:.2f} ms to install it",
        ),
    ]
