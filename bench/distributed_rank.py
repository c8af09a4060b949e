"""One process of the `distributed` benchmark: `python -m bench.distributed_rank MODEL OUT.json ROWS LENGTH STEPS`.

Under MLX_RANK / MLX_HOSTFILE (two ranks, ring backend) it is one rank of a data-parallel learner; without them it is
the single-process baseline. Either way: SmolLM2 with the demo's LoRA (rank 16 on every linear layer of the last 16
blocks), one demo-shaped batch (ROWS rows of LENGTH tokens, the last 24 trained, like the demo's 32 completions of at
most 24 tokens), one warm-up step, then STEPS timed `Trainer.step`s. Per step: the wall time, the time and bytes
inside the gradient all-reduce (`Ranks.reduce_s` / `reduce_bytes`: the wait for the slower rank included), and the
same all-reduce alone after a barrier (the transfer). It also times the rollout exchange of a
demo-sized batch both ways (Ranks.gather: lengths then one all_gather; and send/recv between the two ranks).
Rank 0 (or the single process) writes OUT.json."""

import json
import sys
import time

import paraloop  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import mlx.core as mx
import msgspec
import numpy as np

from paraloop.config import LoraConfig, RLTrainingConfig
from paraloop.distributed import Ranks, launched
from paraloop.learn.trainer import Trainer
from paraloop.lora import adapter_arrays, adapter_config, attach_lora
from paraloop.messages import RolloutBatch, ScoredGroup
from paraloop.model import load_model

COMPLETION = 24


def demo_batch(vocab: int, rows: int, length: int) -> RolloutBatch:
    rng = np.random.default_rng(0)
    prompt = length - COMPLETION
    groups = []
    for _ in range(rows // 8):
        tokens = rng.integers(3, vocab, size=(8, length)).tolist()
        groups.append(
            ScoredGroup(
                tokens=tokens,
                masks=[[-100] * prompt + t[prompt:] for t in tokens],
                scores=rng.random(8).tolist(),
                inference_logprobs=[[1.0] * prompt + rng.uniform(-3, -1, COMPLETION).tolist() for _ in tokens],
            )
        )
    return RolloutBatch(groups=groups, source="bench")


def exchange_times(ranks: Ranks, blob: bytes, repeats: int = 5) -> dict:
    ranks.gather(blob, "bench.warmup")  # the first all_gather of a size costs a few ms more
    start = time.perf_counter()
    for _ in range(repeats):
        ranks.gather(blob if ranks.is_root else b"", "bench.gather")
    gather_s = (time.perf_counter() - start) / repeats
    data = mx.array(np.frombuffer(blob, np.uint8))
    start = time.perf_counter()
    for _ in range(repeats):
        if ranks.is_root:
            mx.eval(mx.distributed.send(data, 1, group=ranks.group))
        else:
            mx.eval(mx.distributed.recv_like(data, 0, group=ranks.group))
    send_s = (time.perf_counter() - start) / repeats
    return {"gather_s": gather_s, "send_recv_s": send_s, "bytes": len(blob)}


def transfer_times(ranks: Ranks, floats: int, repeats: int = 3) -> list[float]:
    """The all-reduce of the step's float32 vector alone, after a barrier: the transfer without the wait for the
    slower rank that the in-step time includes."""
    vector = mx.ones((floats,), mx.float32)
    out = []
    for _ in range(repeats):
        ranks.table(np.zeros(1), "bench.barrier")
        start = time.perf_counter()
        mx.eval(mx.distributed.all_sum(vector, group=ranks.group))
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    model_path, out, rows, length, steps = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    ranks = Ranks.connect("ring") if launched() else None
    model, _, _, _ = load_model(model_path)
    lora = LoraConfig(rank=16, num_layers=16, dropout=0.0, scale=10.0, keys="all")
    cfg = adapter_config(lora, model)
    attach_lora(model, cfg, seed=0)
    mx.eval(model.parameters())
    trainer = Trainer(
        model, config=RLTrainingConfig(learning_rate=5e-5, kl_beta=0.0, batch_size=rows, lora=lora), adapter_config=cfg
    )
    if ranks is not None:
        trainer.reducer = ranks
    batch = demo_batch(model.args.vocab_size, rows, length)
    trainer.step(batch)  # warm-up
    step_s, reduce_s, reduce_bytes = [], [], []
    for _ in range(steps):
        before_s, before_b = (ranks.reduce_s, ranks.reduce_bytes) if ranks else (0.0, 0)
        start = time.perf_counter()
        trainer.step(batch)
        step_s.append(time.perf_counter() - start)
        if ranks is not None:
            reduce_s.append(ranks.reduce_s - before_s)
            reduce_bytes.append(ranks.reduce_bytes - before_b)
    result = {
        "ranks": ranks.size if ranks else 1,
        "rows": rows,
        "length": length,
        "step_s": step_s,
        "reduce_s": reduce_s,
        "reduce_bytes": reduce_bytes,
        "lora_parameters": int(sum(a.size for a in adapter_arrays(model).values())),
        "batch_msgpack_bytes": len(msgspec.msgpack.encode(batch)),
    }
    if ranks is not None:
        result["exchange"] = exchange_times(ranks, msgspec.msgpack.encode(batch))
        result["transfer_s"] = transfer_times(ranks, reduce_bytes[-1] // 4)
    if ranks is None or ranks.is_root:
        with open(out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
