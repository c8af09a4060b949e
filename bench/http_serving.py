"""Engine over HTTP: paraloop serve vs mlx_lm.server, SmolLM2-135M, 1 / 8 / 32 concurrent clients.

Same chat prompts, same max_tokens, temperature 1.0, EOS off on both (see servers.py), generated tokens counted
from `usage`. mlx_lm.server runs twice: on the 4-bit model and on the float32 copy (its fastest form on this CPU);
paraloop serves the 4-bit model, which it dequantizes to float32 on the CPU (model.compute = auto). The three
servers run side by side and each concurrency level is measured on all three in turn, so load from other
processes falls on all of them alike. Before measuring, each server answers a greedy question (the sanity check,
recorded in the JSON) and a warm-up burst. paraloop and the float32 mlx_lm.server, whose race is close, are measured
three times per level (fresh prompts each round) and compared on summed tokens over summed time. Every prompt
starts with the same chat-template prefix (SmolLM2's default system prompt, then "Write a long story about"), which
both servers cache: at 32 clients paraloop must reach 1.2x mlx_lm.server with its prompt cache on. Diagnostic lines
say where the difference comes from: at 32 clients each server with its cache off (mlx_lm.server's
`--prompt-cache-size 0`, paraloop's `engine.prefix_cache_mb = 0`), and the engine in-process against mlx-lm's bare
BatchGenerator (same prompts, no HTTP on either side).
"""

import time

from bench import servers
from bench.harness import Context, Line

NAME = "http"
TITLE = "1. Engine over HTTP (tokens/s, SmolLM2-135M)"
BUDGET_S = 420
USES_SERVERS = True
QUESTION = "What is the capital of France?"


def levels(quick: bool) -> list[tuple[int, int, int]]:
    """(clients, requests per client, max_tokens) per concurrency level."""
    if quick:
        return [(1, 1, 8), (32, 1, 8)]
    return [(1, 2, 24), (8, 1, 32), (32, 1, 32)]


def rounds(kind: str, quick: bool) -> int:
    """Repeats per level: the close race (paraloop vs float32 mlx_lm) three times; the 4-bit server, ~10x slower
    on this CPU, once."""
    return 1 if quick or kind in ("mlx_lm_q4", "paraloop_nocache") else 3


def kinds_at(clients: int) -> list[str]:
    """The servers measured at a level; at 32 clients also both servers without their prompt cache (diagnostic)."""
    return list(servers.KINDS) + (list(servers.DIAGNOSTIC_KINDS) if clients == 32 else [])


def in_process(ctx: Context, *, prompts: int, max_tokens: int, repeats: int) -> dict[str, float]:
    """tokens/s of paraloop's Engine and of mlx-lm's bare BatchGenerator on the same model and prompts, no HTTP."""
    import anyio
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.sample_utils import make_sampler

    from paraloop.config import EngineConfig
    from paraloop.engine import Engine
    from paraloop.messages import GenerateRequest, SamplingParams
    from paraloop.model import load_model

    model, tokenizer, _, _ = load_model(ctx.model_q4)
    ids = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Write a long story about topic {i}."}], add_generation_prompt=True
        )
        for i in range(prompts)
    ]

    def bare() -> float:
        gen = BatchGenerator(model, completion_batch_size=prompts, prefill_batch_size=8)
        start, done = time.perf_counter(), 0
        gen.insert(ids, max_tokens=[max_tokens] * prompts, samplers=[make_sampler(temp=1.0)] * prompts)
        while done < prompts * max_tokens:  # no stop tokens: every row runs to max_tokens
            done += len(gen.next()[1])
        rate = done / (time.perf_counter() - start)
        gen.close()
        return rate

    def engine() -> float:
        eng = Engine(model, tokenizer, config=EngineConfig(), batch_size=prompts)
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)

        async def main() -> float:
            async with anyio.create_task_group() as tg:
                await tg.start(eng.run)
                start = time.perf_counter()
                async with anyio.create_task_group() as work:
                    for i, p in enumerate(ids):
                        work.start_soon(
                            eng.complete, GenerateRequest(request_id=str(i), prompt_tokens=p, params=params)
                        )
                rate = prompts * max_tokens / (time.perf_counter() - start)
                tg.cancel_scope.cancel()
            return rate

        return anyio.run(main)

    rates = {"engine": [], "batch_generator": []}
    for _ in range(repeats):
        rates["engine"].append(engine())
        rates["batch_generator"].append(bare())
    return {k: sum(v) / len(v) for k, v in rates.items()}


def run(ctx: Context) -> list[Line]:
    every = kinds_at(32)
    running = {kind: servers.server(ctx, kind) for kind in every}
    sanity = {}
    for kind, srv in running.items():
        answer = servers.ask(srv, QUESTION)
        sanity[kind] = {"answer": answer, "sane": "paris" in answer.lower()}
        servers.closed_loop(srv, clients=4, per_client=1, max_tokens=4)  # warm-up
    results: dict[int, dict[str, servers.LoadResult]] = {}
    for i, (clients, per_client, max_tokens) in enumerate(levels(ctx.quick)):
        results[clients] = {}
        kinds = kinds_at(clients)
        for r in range(max(rounds(k, ctx.quick) for k in kinds)):
            shift = (i + r) % len(kinds)
            for kind in kinds[shift:] + kinds[:shift]:  # rotate who goes first
                if r >= rounds(kind, ctx.quick):
                    continue
                # fresh prompts each round
                got = servers.closed_loop(
                    running[kind], clients=clients, per_client=per_client, max_tokens=max_tokens, first=1000 * (r + 1)
                )
                results[clients][kind] = results[clients][kind] + got if kind in results[clients] else got
    ctx.shared["http_tokens_per_s"] = {c: {k: r.tokens_per_s for k, r in rs.items()} for c, rs in results.items()}
    bare = in_process(ctx, prompts=32, max_tokens=8 if ctx.quick else 32, repeats=1 if ctx.quick else 2)

    insane = [k for k, s in sanity.items() if not s["sane"]]
    names = {**servers.KINDS, **servers.DIAGNOSTIC_KINDS}
    lines = []
    for clients, by_kind in results.items():
        ours = by_kind["paraloop"]
        best = max(("mlx_lm_q4", "mlx_lm_f32"), key=lambda k: by_kind[k].tokens_per_s)
        for kind in [k for k in kinds_at(clients) if k != "paraloop"]:
            theirs = by_kind[kind]
            target = ">= 1.2" if clients == 32 and kind == best else None
            failed = ours.failed + theirs.failed
            note = f"{failed} failed requests" if failed else ""
            if insane:
                note = (note + "; " if note else "") + f"answer not sane: {', '.join(insane)}"
            detail = {"sanity": sanity, "clients": clients, "paraloop": vars(ours), kind: vars(theirs)}
            lines.append(
                Line(
                    NAME,
                    f"{clients} client{'s' * (clients > 1)}: paraloop over {names[kind]}",
                    ours.tokens_per_s,
                    theirs.tokens_per_s,
                    "tok/s",
                    target,
                    note,
                    detail,
                )
            )
    lines.append(
        Line(
            NAME,
            "no HTTP: paraloop Engine over mlx-lm's bare BatchGenerator (32 prompts, in-process)",
            bare["engine"],
            bare["batch_generator"],
            "tok/s",
            detail=bare,
        )
    )
    return lines
