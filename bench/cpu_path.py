"""CPU path: what the OpenBLAS preload and the dequantized compute are worth.

Three configurations of SmolLM2 (4-bit file), each probed in a fresh child process (the BLAS is fixed when MLX is
first imported): paraloop's CPU default (OpenBLAS preloaded, base dequantized to float32), PARALOOP_OPENBLAS=0
(MLX's bundled reference BLAS, still dequantized), and model.compute = "quantized" (4-bit kernels, OpenBLAS on).
A probe measures decode tokens/s of the Engine at batch 8 (one n=8 request, EOS off; rate between the first and
the last decode step, so prefill is left out) and one GRPO Trainer step on 2 x 32 tokens (small, because the
slow configurations take ~100x longer). Lines: the default over each alternative, for decode and for training.

`python -m bench.cpu_path --probe --compute dequantized` runs one probe and prints its JSON on the last line.
"""

import argparse
import json
import sys
import time

from bench.harness import Context, Line, python_cmd, wait_until

NAME = "cpu"
TITLE = "7. CPU path: OpenBLAS preload and dequantized compute"
BUDGET_S = 240
CONFIGS = {  # name -> (PARALOOP_OPENBLAS, model.compute)
    "default": ("1", "dequantized"),
    "no_openblas": ("0", "dequantized"),
    "quantized": ("1", "quantized"),
}
DECODE_ROWS, TRAIN_ROWS, TRAIN_LENGTH = 8, 2, 32
PROBE_TIMEOUT_S = 300


def probe(model_path: str, compute: str, *, max_tokens: int) -> dict:
    import paraloop  # noqa: F401, I001  (the preload, unless PARALOOP_OPENBLAS=0: before mlx.core)
    import anyio
    import mlx.core as mx
    from bench import learner
    from paraloop.blas import openblas_path
    from paraloop.config import EngineConfig, LoraConfig, RLTrainingConfig
    from paraloop.engine import Engine
    from paraloop.learn.trainer import Trainer
    from paraloop.lora import AdapterSlots, adapter_config, attach_lora
    from paraloop.messages import GenerateRequest, SamplingParams
    from paraloop.model import load_model, twin

    model, tokenizer, _, _ = load_model(model_path, compute=compute)
    lora = LoraConfig(rank=16, num_layers=16, dropout=0.0, keys="all")
    cfg = adapter_config(lora, model)
    attach_lora(model, cfg, seed=0)
    mx.eval(model.parameters())
    engine_model = twin(model)
    engine = Engine(
        engine_model, tokenizer, config=EngineConfig(), batch_size=DECODE_ROWS, adapter=AdapterSlots(engine_model)
    )
    request = GenerateRequest(
        request_id="cpu",
        prompt_tokens=tokenizer.encode("Once upon a time, in a quiet town,"),
        n=DECODE_ROWS,
        params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
    )
    step_times: list[float] = []

    async def decode() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            seen = 0
            async for _ in engine.generate(request):
                seen += 1
                if seen % DECODE_ROWS == 0:  # one decode step delivered all rows
                    step_times.append(time.perf_counter())
            tg.cancel_scope.cancel()

    anyio.run(decode)
    decode_tps = DECODE_ROWS * (len(step_times) - 1) / (step_times[-1] - step_times[0])

    trainer = Trainer(model, config=RLTrainingConfig(kl_beta=0.0, lora=lora), adapter_config=cfg)
    batch = learner.rollout_batch(
        learner.token_rows(model.args.vocab_size, rows=TRAIN_ROWS, length=TRAIN_LENGTH), prompt=TRAIN_LENGTH // 2
    )
    train_s = []
    while len(train_s) < 3 and sum(train_s) < 3.0:  # a few steps when fast, one when slow
        start = time.perf_counter()
        trainer.step(batch)
        train_s.append(time.perf_counter() - start)
    best = min(train_s[1:]) if len(train_s) > 1 else train_s[0]
    return {
        "blas": openblas_path() or "MLX bundled BLAS",
        "compute": compute,
        "decode_tokens_per_s": decode_tps,
        "decode_steps": len(step_times),
        "train_step_s": train_s,
        "train_tokens_per_s": TRAIN_ROWS * TRAIN_LENGTH / best,
    }


def run_probe(ctx: Context, name: str, *, max_tokens: int) -> dict:
    openblas, compute = CONFIGS[name]
    child = ctx.spawn(
        f"cpu-{name}",
        python_cmd(
            "-m",
            "bench.cpu_path",
            "--probe",
            "--model",
            str(ctx.model_q4),
            "--compute",
            compute,
            "--max-tokens",
            str(max_tokens),
        ),
        env={"PARALOOP_OPENBLAS": openblas},
    )
    wait_until(lambda: not child.alive(), timeout_s=PROBE_TIMEOUT_S, interval_s=0.5, what=f"the {name} probe")
    ctx.stop(child)
    if child.proc.returncode != 0:
        raise RuntimeError(f"cpu probe {name} failed ({child.proc.returncode}):\n{child.tail()}")
    last = [x for x in child.tail(20000).splitlines() if x.startswith("{")][-1]
    return json.loads(last)


def run(ctx: Context) -> list[Line]:
    max_tokens = 4 if ctx.quick else 12
    r = {name: run_probe(ctx, name, max_tokens=max_tokens) for name in CONFIGS}
    lines = []
    for other, label in (
        ("no_openblas", "OpenBLAS preload on over off (PARALOOP_OPENBLAS=0)"),
        ("quantized", "dequantized float32 compute over 4-bit kernels"),
    ):
        lines.append(
            Line(
                NAME,
                f"{label}: decode tokens/s, batch {DECODE_ROWS}",
                r["default"]["decode_tokens_per_s"],
                r[other]["decode_tokens_per_s"],
                "tok/s",
                detail=r,
            )
        )
        lines.append(
            Line(
                NAME,
                f"{label}: train step tokens/s ({TRAIN_ROWS}x{TRAIN_LENGTH})",
                r["default"]["train_tokens_per_s"],
                r[other]["train_tokens_per_s"],
                "tok/s",
            )
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe", action="store_true", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--compute", choices=("dequantized", "quantized"), required=True)
    parser.add_argument("--max-tokens", type=int, default=12)
    args = parser.parse_args()
    print(json.dumps(probe(args.model, args.compute, max_tokens=args.max_tokens)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
