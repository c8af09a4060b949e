"""Distillation teacher scoring: a batch of the student's sequences under a co-served teacher adapter, SmolLM2-135M.

In process (no HTTP): the engine serves the policy (a rank-16 LoRA on every linear layer) and a teacher adapter of
the same shape (random weights), loaded by name as run/teacher.py loads one. A batch of 16 sequences (random ids,
seeded: the cost does not depend on the text) is scored under the teacher two ways: `Engine.score_many` (the batch
in batched routed forwards, engine/scoring.py) and one `Engine.score` per sequence, 8 in flight (what the teacher
did before: one sequence's forward at a time between decode steps). Two batches: lengths of 160-176 tokens (a
group's completions near the length cap: one forward) and ragged lengths of 128-256 (cut where padding costs more
than a forward). One round, each kind once (the quick run is the same). Sequences/s over wall time; a second line
over the process's CPU time (all threads), steadier than wall time on a shared machine. The detail keeps the times
and the forward groups the batched path ran.
"""

import time
from pathlib import Path

from bench.harness import Context, Line

NAME = "teacher"
TITLE = "16. Teacher scoring: a batch in batched routed forwards over one sequence at a time (SmolLM2-135M)"
BUDGET_S = 600  # two rounds took over 15 minutes under a shared load of 8-10 on 2 cores
RANK = 16
ROWS = 16
BATCHES = {"160-176 tokens": (160, 176), "128-256 tokens (ragged)": (128, 256)}
IN_FLIGHT = 8  # run/teacher.py's concurrency before batched scoring


def write_adapters(model_path: Path, out: Path) -> tuple[Path, Path]:
    """The policy's and the teacher's adapters: random rank-16 LoRA on every linear layer (mlx-lm's format)."""
    import mlx.core as mx

    from paraloop.config import LoraConfig
    from paraloop.lora import adapter_arrays, adapter_config, attach_lora, save_adapter
    from paraloop.model import load_model

    model, _, _, _ = load_model(model_path)
    config = adapter_config(LoraConfig(rank=RANK, keys="all", num_layers=-1, dropout=0.0), model)
    attach_lora(model, config, seed=0)
    paths = []
    for i, name in enumerate(("policy", "teacher")):
        mx.random.seed(200 + i)
        arrays = {k: 0.02 * mx.random.normal(v.shape) for k, v in adapter_arrays(model).items()}
        paths.append(out / name)
        save_adapter(paths[-1], arrays, config)
    return paths[0], paths[1]


def measure(model_path: Path, policy: Path, teacher: Path, *, rounds: int) -> dict:
    import anyio
    import numpy as np

    from paraloop.config import EngineConfig
    from paraloop.engine import Engine
    from paraloop.lora import AdapterSlots, apply_adapter
    from paraloop.messages import GenerateRequest, SamplingParams
    from paraloop.model import load_model

    model, tokenizer, _, _ = load_model(model_path)
    apply_adapter(model, policy)
    engine = Engine(model, tokenizer, config=EngineConfig(prefix_cache_mb=0), adapter=AdapterSlots(model))
    rng = np.random.default_rng(0)
    vocab = len(tokenizer)
    results: dict = {}

    def batch(size: int, lo: int = 128, hi: int = 256) -> list[GenerateRequest]:
        return [
            GenerateRequest(
                request_id=f"t{size}-{i}",
                prompt_tokens=rng.integers(0, vocab, int(rng.integers(lo, hi + 1))).tolist(),
                params=SamplingParams(max_tokens=1),
                adapter="teacher",
            )
            for i in range(size)
        ]

    async def one_by_one(requests: list[GenerateRequest]) -> None:
        limit = anyio.Semaphore(IN_FLIGHT)

        async def one(r: GenerateRequest) -> None:
            async with limit:
                await engine.score(r)

        async with anyio.create_task_group() as tg:
            for r in requests:
                tg.start_soon(one, r)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            await engine.adapters.load("teacher", teacher)
            await engine.score_many(batch(2))  # warm-up (not counted): the head probe, kernels touched
            await engine.score(batch(1)[0])
            for name, (lo, hi) in BATCHES.items():
                times: dict[str, list[float]] = {"batched": [], "one_by_one": []}
                cpu: dict[str, list[float]] = {"batched": [], "one_by_one": []}
                groups = []
                tokens = 0
                for r in range(rounds):
                    requests = batch(ROWS, lo, hi)
                    tokens += sum(len(q.prompt_tokens) for q in requests)
                    order = ["batched", "one_by_one"] if r % 2 == 0 else ["one_by_one", "batched"]
                    for kind in order:
                        before = engine._worker.score_groups
                        start, start_cpu = time.perf_counter(), time.process_time()
                        if kind == "batched":
                            await engine.score_many(requests)
                            groups.append(engine._worker.score_groups - before)
                        else:
                            await one_by_one(requests)
                        times[kind].append(time.perf_counter() - start)
                        cpu[kind].append(time.process_time() - start_cpu)
                results[name] = {"times_s": times, "cpu_s": cpu, "groups": groups, "tokens": tokens, "rounds": rounds}
            tg.cancel_scope.cancel()

    anyio.run(main)
    return results


def run(ctx: Context) -> list[Line]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="paraloop-bench-teacher-") as tmp:
        policy, teacher = write_adapters(ctx.model_q4, Path(tmp))
        results = measure(ctx.model_q4, policy, teacher, rounds=1)
    lines = []
    for name, r in results.items():
        n = ROWS * r["rounds"]
        what = f"{ROWS} sequences of {name} under a teacher adapter: score_many over one sequence per forward"
        note = f"{r['tokens'] // r['rounds']} tokens per batch; forward groups per batch: {r['groups']}"
        wall = (sum(r["times_s"]["batched"]), sum(r["times_s"]["one_by_one"]))
        cpu = (sum(r["cpu_s"]["batched"]), sum(r["cpu_s"]["one_by_one"]))
        lines.append(Line(NAME, what, n / wall[0], n / wall[1], "seq/s", note=note, detail=r))
        lines.append(Line(NAME, f"{what}, CPU time", n / cpu[0], n / cpu[1], "seq/CPU-s", note=note))
    return lines
