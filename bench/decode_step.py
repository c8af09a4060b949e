"""Decode step: paraloop's batch-32 decode step of SmolLM2 against what its matrix multiplications cost alone.

In this process: the Engine (the 4-bit model dequantized to float32, as paraloop serves it on the CPU, no adapter)
decodes 32 rows past ~40-token chat prompts (EOS off, temperature 1.0); a step is the median time between two
consecutive tokens of one row, over the steps after the prefill. Its matmuls, timed alone at the same shapes:
every linear layer at 32 rows, the tied lm_head, and the attention's q.k^T and p.v at the context length the
rows reached, all evaluated as one MLX graph (one eval: no per-op dispatch in the count). The engine runs with
`engine.decode = "cpu"` (the CPU default: sampling and log-probs in NumPy, the MLP's swiglu from a vectorised exp)
and `"mlx-lm"` (mlx-lm's own step, the path before), alternating; each run is followed by the matmul timing, and
a round's ratio is its step over those matmuls. Lines: the step over its matmuls (median of the rounds' ratios;
target <= 1.4), and the CPU path's step over mlx-lm's.
"""

import statistics
import time

from bench.harness import Context, Line

NAME = "decode"
TITLE = "9. Decode step at batch 32 over its matmuls alone"
BUDGET_S = 150
ROWS = 32


def engine_steps(
    model, tokenizer, *, decode: str, steps: int, grammar=None, prompt: str = "Write a long story about topic {i}."
) -> tuple[list[float], int]:
    """Seconds between consecutive tokens of row 0 (after the prefill) and the context length reached. Each row
    asks `prompt` (formatted with its index) at temperature 1.0; EOS is off, unless every row samples within
    `grammar` (a compiled engine/grammar.py grammar: constrained.py), which must not let a row end early."""
    import anyio

    from paraloop.config import EngineConfig
    from paraloop.engine import Engine
    from paraloop.messages import GenerateRequest, SamplingParams

    engine = Engine(model, tokenizer, config=EngineConfig(decode=decode, prefix_cache_mb=0), batch_size=ROWS)
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": prompt.format(i=i)}], add_generation_prompt=True)
        for i in range(ROWS)
    ]
    stamps: list[float] = []

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)

            async def row(i: int) -> None:
                params = SamplingParams(temperature=1.0, max_tokens=steps, ignore_eos=grammar is None, grammar=grammar)
                async for _ in engine.generate(
                    GenerateRequest(request_id=str(i), prompt_tokens=prompts[i], params=params)
                ):
                    if i == 0:
                        stamps.append(time.perf_counter())

            async with anyio.create_task_group() as rows:
                for i in range(ROWS):
                    rows.start_soon(row, i)
            tg.cancel_scope.cancel()

    anyio.run(main)
    skip = steps // 4  # the rows joined over the first steps (prefill): measure the rest
    return [b - a for a, b in zip(stamps[skip:], stamps[skip + 1 :], strict=False)], max(map(len, prompts)) + steps


def matmul_seconds(model, *, context: int, repeats: int) -> dict[str, float]:
    """The step's matmuls at batch 32, timed alone: all in one graph (median of `repeats`), and one by one."""
    import mlx.core as mx
    import mlx.nn as nn

    args = model.args
    heads = args.num_attention_heads  # GQA shares k/v between heads, but q.k^T and p.v run per query head
    head_dim = args.hidden_size // heads
    weights = [m.weight for _, m in model.named_modules() if isinstance(m, nn.Linear)]
    weights.append(model.model.embed_tokens.weight)  # tied lm_head
    xs = [mx.random.normal((ROWS, w.shape[1])) for w in weights]
    layers = len(model.layers)
    q = [mx.random.normal((ROWS, heads, 1, head_dim)) for _ in range(layers)]
    k = [mx.random.normal((ROWS, heads, context, head_dim)) for _ in range(layers)]
    p = [mx.random.normal((ROWS, heads, 1, context)) for _ in range(layers)]
    mx.eval(weights, xs, q, k, p)
    ops = [lambda x=x, w=w: x @ w.T for x, w in zip(xs, weights, strict=True)]
    ops += [lambda a=a, b=b: a @ b.swapaxes(-1, -2) for a, b in zip(q, k, strict=True)]
    ops += [lambda a=a, b=b: a @ b for a, b in zip(p, k, strict=True)]  # p.v (v has k's shape)

    def together() -> float:
        start = time.perf_counter()
        mx.eval([op() for op in ops])
        return time.perf_counter() - start

    together()
    joint = statistics.median(together() for _ in range(repeats))
    alone = 0.0
    for op in ops:
        mx.eval(op())
        times = []
        for _ in range(3):
            start = time.perf_counter()
            mx.eval(op())
            times.append(time.perf_counter() - start)
        alone += min(times)
    return {"together_s": joint, "one_by_one_s": alone, "matmuls": len(ops)}


def run(ctx: Context) -> list[Line]:
    from paraloop.model import load_model

    model, tokenizer, _, _ = load_model(ctx.model_q4)
    steps = 12 if ctx.quick else 48
    rounds = 1 if ctx.quick else 3
    step: dict[str, list[float]] = {"cpu": [], "mlx-lm": []}
    matmuls: dict[str, list[float]] = {"cpu": [], "mlx-lm": []}
    for _ in range(rounds):
        for decode in step:
            # Each engine run is followed by the matmul timing at its context: the pair's ratio holds up even when
            # other processes slow the machine down between pairs.
            got, context = engine_steps(model, tokenizer, decode=decode, steps=steps)
            step[decode].append(statistics.median(got))
            mm = matmul_seconds(model, context=context - steps // 2, repeats=3 if ctx.quick else 6)
            matmuls[decode].append(mm["together_s"])
    ratio = {k: statistics.median(s / m for s, m in zip(step[k], matmuls[k], strict=True)) for k in step}
    best = {k: statistics.median(v) for k, v in step.items()}
    detail = {
        "step_s": step,
        "matmuls_s": matmuls,
        "ratio": ratio,
        "rows": ROWS,
        "steps": steps,
        "matmuls_one_by_one_s": mm["one_by_one_s"],
    }
    mm_cpu = statistics.median(matmuls["cpu"])
    return [
        Line(
            NAME,
            f"decode step (batch {ROWS}) over its matmuls timed alone",
            mm_cpu * ratio["cpu"] * 1e3,
            mm_cpu * 1e3,
            "ms",
            "<= 1.4",
            "median of per-round ratios",
            detail,
        ),
        Line(
            NAME,
            "decode step, engine.decode = cpu over mlx-lm's step",
            best["cpu"] * 1e3,
            best["mlx-lm"] * 1e3,
            "ms",
            note=f"mlx-lm's step over its matmuls: {ratio['mlx-lm']:.2f}x",
        ),
    ]
