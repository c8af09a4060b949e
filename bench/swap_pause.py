"""Swap pause: how long the engine stops decoding to take a new adapter, and whether any request notices.

SmolLM2 (float32 compute) with rank-16 LoRA on every linear layer (30 blocks x 7 = 210 layers, 420 arrays). The
engine decodes 32 streams (ignore_eos, so each runs to max_tokens) while `Engine.swap_adapter` applies a new
version once per decode step; then, while the streams still decode (same CPU load), the baselines run on a twin
of the model on the main thread: the predecessor's way (mx.save_safetensors of the adapter, then
model.load_weights from the file) and the generic `model.update(tree_unflatten(...))`. Lines: the median pause
(target <= 1 ms), its ratios to both baselines and to one decode step at batch 32 (the median time between
consecutive swaps), and the failed requests (target 0).
"""

import tempfile
import time
from pathlib import Path

from bench.harness import Context, Line, median

NAME = "swap"
TITLE = "3. Adapter swap pause (420 LoRA arrays)"
BUDGET_S = 150
STREAMS = 32


def random_adapters(names_shapes: dict[str, tuple[int, ...]], count: int) -> list[dict]:
    import mlx.core as mx

    versions = []
    for i in range(count):
        mx.random.seed(1000 + i)
        arrays = {k: 0.01 * mx.random.normal(shape) for k, shape in names_shapes.items()}
        mx.eval(list(arrays.values()))
        versions.append(arrays)
    return versions


def baselines(model, versions: list[dict], *, repeats: int) -> dict[str, list[float]]:
    """Seconds per swap the predecessor's way (disk round trip), the generic way, and with AdapterSlots."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    from paraloop.lora import AdapterSlots, adapter_arrays

    out = {"save_and_load_weights": [], "load_weights_only": [], "model_update": [], "adapter_slots": []}
    with tempfile.TemporaryDirectory(prefix="paraloop-bench-") as tmp:
        path = str(Path(tmp) / "adapters.safetensors")
        for i in range(repeats):
            arrays = versions[i % len(versions)]
            start = time.perf_counter()
            mx.save_safetensors(path, arrays)
            loaded = time.perf_counter()
            model.load_weights(path, strict=False)
            mx.eval(adapter_arrays(model))
            end = time.perf_counter()
            out["save_and_load_weights"].append(end - start)
            out["load_weights_only"].append(end - loaded)
    for i in range(repeats * 2):
        tree = tree_unflatten(list(versions[i % len(versions)].items()))
        start = time.perf_counter()
        model.update(tree)
        out["model_update"].append(time.perf_counter() - start)
    slots = AdapterSlots(model)
    for i in range(repeats * 10):
        out["adapter_slots"].append(slots.swap(versions[i % len(versions)]))
    return out


async def decode_and_swap(
    engine, tokenizer, versions: list[dict], *, swaps: int, max_tokens: int, twin_model, repeats: int
) -> dict:
    import anyio

    from paraloop.messages import GenerateRequest, SamplingParams

    params = SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True)
    results: dict[int, object] = {}
    pauses, done_at, base = [], [], {}

    async def stream(i: int) -> None:
        prompt = tokenizer.encode(f"Story {i}: once upon a time, in a land far away,")
        request = GenerateRequest(request_id=f"swap-{i}", prompt_tokens=prompt, params=params)
        try:
            results[i] = (await engine.complete(request))[0]
        except Exception as e:  # counted as a failed request
            results[i] = e

    async def swapper() -> None:
        while engine.stats()["active_rows"] < STREAMS:  # noqa: ASYNC110 (no event for "rows decoding")
            await anyio.sleep(0.02)
        for v in range(1, swaps + 1):
            swapped = await engine.swap_adapter(versions[v % len(versions)], v)
            pauses.append(swapped.pause_s)
            done_at.append(time.perf_counter())
        base.update(baselines(twin_model, versions, repeats=repeats))  # blocks the loop, not the engine thread

    async with anyio.create_task_group() as tg:
        await tg.start(engine.run)
        async with anyio.create_task_group() as work:
            for i in range(STREAMS):
                work.start_soon(stream, i)
            work.start_soon(swapper)
        tg.cancel_scope.cancel()

    failed, versions_seen = 0, set()
    for r in results.values():
        ok = not isinstance(r, Exception) and r.finish_reason == "length" and len(r.tokens) == max_tokens
        failed += not ok
        if not isinstance(r, Exception):
            versions_seen.update(r.versions)
    failed += STREAMS - len(results)
    intervals = [b - a for a, b in zip(done_at, done_at[1:], strict=False)]
    return {
        "pauses_s": pauses,
        "failed": failed,
        "versions_seen": len(versions_seen),
        "step_s": median(intervals),
        "stats": engine.stats(),
        "baselines": base,
    }


def run(ctx: Context) -> list[Line]:
    import anyio
    import mlx.core as mx

    from paraloop.config import EngineConfig, LoraConfig
    from paraloop.engine import Engine
    from paraloop.lora import AdapterSlots, adapter_arrays, adapter_config, attach_lora
    from paraloop.model import load_model, twin

    swaps = 20 if ctx.quick else 100
    model, tokenizer, _, _ = load_model(ctx.model_q4)
    cfg = adapter_config(LoraConfig(rank=16, num_layers=-1, dropout=0.0, keys="all"), model)
    attach_lora(model, cfg, seed=0)
    shapes = {k: v.shape for k, v in adapter_arrays(model).items()}
    mx.eval(model.parameters())
    versions = random_adapters(shapes, 4)
    other = twin(model)  # same base arrays, its own LoRA slots: the baselines never touch the engine's model

    engine = Engine(model, tokenizer, config=EngineConfig(), batch_size=STREAMS, adapter=AdapterSlots(model))
    r = anyio.run(
        lambda: decode_and_swap(
            engine,
            tokenizer,
            versions,
            swaps=swaps,
            max_tokens=swaps + 40,
            twin_model=other,
            repeats=5 if ctx.quick else 10,
        )
    )
    base = r["baselines"]
    pause = median(r["pauses_s"])
    detail = {
        "lora_arrays": len(shapes),
        "swaps": swaps,
        "pause_s": r["pauses_s"],
        "max_pause_s": max(r["pauses_s"]),
        "decode_step_s_batch32": r["step_s"],
        "versions_seen_in_completions": r["versions_seen"],
        "baselines_s": base,
        "engine_stats": r["stats"],
    }
    ms = 1e3
    lines = [
        Line(
            NAME,
            f"median pause, {swaps} swaps of {len(shapes)} arrays while {STREAMS} streams decode",
            pause * ms,
            None,
            "ms",
            "<= 1 ms",
            note=f"max {max(r['pauses_s']) * ms:.2f} ms",
            detail=detail,
        ),
        Line(
            NAME,
            "pause over the predecessor's swap (save_safetensors + load_weights)",
            pause * ms,
            median(base["save_and_load_weights"]) * ms,
            "ms",
            note=f"load_weights alone {median(base['load_weights_only']) * ms:.1f} ms",
        ),
        Line(
            NAME,
            "pause over model.update(tree_unflatten(...))",
            pause * ms,
            median(base["model_update"]) * ms,
            "ms",
            note="engine pause on its thread vs model.update on the main thread, same decode load",
        ),
        Line(
            NAME,
            "AdapterSlots.swap over model.update (main thread, same load)",
            median(base["adapter_slots"]) * ms,
            median(base["model_update"]) * ms,
            "ms",
        ),
        Line(NAME, "pause over one decode step (batch 32)", pause * ms, r["step_s"] * ms, "ms"),
        Line(
            NAME,
            f"failed requests during {swaps} swaps",
            float(r["failed"]),
            float(STREAMS),
            "requests",
            "<= 0 requests",
            note=f"completions saw {r['versions_seen']} adapter versions",
        ),
    ]
    return lines
