"""Learner: paraloop's GRPO step against a plain mlx-lm LoRA SFT step on identical tokens.

Both steps train the same LoRA layers of the same model (the demo's: rank 16 on every linear layer of the last 16
blocks for SmolLM2, all blocks of the tiny model) on the same 8 x 128 and 8 x 1024 tokens (4 x 64 with --quick), the
last three quarters of each row trained. paraloop: `Trainer.step` with its default settings on a RolloutBatch
carrying the rollout log-probs (as engine rollouts do, so no extra old-policy forward) with kl_beta = 0 (the demo's
setting). mlx-lm: its own trainer's step, compiled the way `mlx_lm.tuner.trainer.train` compiles it
(`default_loss`, value_and_grad, AdamW update). After one SFT warm-up step (the compile) and the GRPO learner's
memory calibration (its one-row probes, once per run), steps alternate ABBA; the line is the ratio of median
tokens/s.
Breakdown (the line's detail): the GRPO step's phases from its own metrics (time_*_s: trim, plan, old-policy
forward, gradient passes, optimizer, other), its gradient passes split into forward (the same forward timed alone,
no gradient) and backward (the rest); beside it SFT's forward (`default_loss` alone, uncompiled) and the rest of its
compiled step (backward and optimizer). Medians over the timed steps.
Memory: MLX's peak per step (mx.reset_peak_memory before each), and this process's peak RSS for context.
"""

import itertools
import time
from functools import partial
from pathlib import Path

from bench.harness import ROOT, Context, Line, median, self_peak_rss_bytes

NAME = "learner"
TITLE = "4. Learner step: GRPO (paraloop Trainer) over LoRA SFT (mlx-lm)"
BUDGET_S = 900
ROWS, LENGTH = 8, 128  # the first quarter of each row is the prompt
LONG = 1024  # the second shape: 8 x 1024
TINY_DIR = ROOT / ".cache" / "bench-models" / "tiny"


def tiny_model() -> Path:
    if not (TINY_DIR / "config.json").is_file():
        from paraloop.builders.tiny import build_tiny_model

        TINY_DIR.parent.mkdir(parents=True, exist_ok=True)
        build_tiny_model(TINY_DIR)
    return TINY_DIR


def token_rows(vocab: int, *, rows: int, length: int, seed: int = 0) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(3, vocab, size=(rows, length)).tolist()  # skip the special ids at the start


def rollout_batch(tokens: list[list[int]], *, prompt: int):
    """One group in the Atropos convention: prompt positions masked, rewards that differ, rollout log-probs."""
    from paraloop.messages import RolloutBatch, ScoredGroup

    masks = [[-100] * prompt + row[prompt:] for row in tokens]
    logprobs = [[1.0] * prompt + [-2.0] * (len(row) - prompt) for row in tokens]
    scores = [float(i % 2) for i in range(len(tokens))]
    group = ScoredGroup(tokens=tokens, masks=masks, scores=scores, inference_logprobs=logprobs)
    return RolloutBatch(groups=[group], source="bench")


def sft_step(model, *, learning_rate: float):
    """mlx-lm's training step, as `mlx_lm.tuner.trainer.train` builds it (one batch, no accumulation)."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import default_loss

    optimizer = optim.AdamW(learning_rate=learning_rate, weight_decay=0.0)
    loss_value_and_grad = nn.value_and_grad(model, default_loss)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, lengths):
        (loss, ntoks), grad = loss_value_and_grad(model, batch, lengths)
        optimizer.update(model, grad)
        return loss, ntoks

    def run(batch, lengths):
        loss, ntoks = step(batch, lengths)
        mx.eval(state, loss, ntoks)
        return loss.item()

    return run


def measure(model_path: Path, *, lora_layers: int, steps: int, rows: int = ROWS, length: int = LENGTH) -> dict:
    import mlx.core as mx

    from paraloop.config import LoraConfig, RLTrainingConfig
    from paraloop.learn.trainer import Trainer
    from paraloop.lora import adapter_arrays, adapter_config, attach_lora
    from paraloop.model import load_model

    model, tokenizer, _, _ = load_model(model_path)
    lora = LoraConfig(rank=16, num_layers=lora_layers, dropout=0.0, scale=10.0, keys="all")
    cfg = adapter_config(lora, model)
    attach_lora(model, cfg, seed=0)
    mx.eval(model.parameters())
    rl = RLTrainingConfig(learning_rate=5e-5, kl_beta=0.0, batch_size=rows, lora=lora)
    trainer = Trainer(model, config=rl, adapter_config=cfg)  # freezes all but the LoRA arrays
    model.train()
    sft = sft_step(model, learning_rate=5e-5)

    prompt = length // 4
    tokens = token_rows(model.args.vocab_size, rows=rows, length=length)
    batch = rollout_batch(tokens, prompt=prompt)
    ids = mx.array(tokens)
    lengths = mx.array([[prompt, length - 1]] * rows)  # mlx-lm's (offset, length): the same trained targets

    def timed(fn):
        mx.reset_peak_memory()
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start, mx.get_peak_memory()

    metrics: list[dict] = []

    def grpo():
        metrics.append(trainer.step(batch).metrics)

    sft_run = lambda: sft(ids, lengths)  # noqa: E731
    warm = {
        "sft_s (compiles)": timed(sft_run)[0],
        "grpo_calibration_s": timed(lambda: trainer.check_length(length))[0],  # the memory planner's probes
    }  # paraloop's first step showed no other warm-up cost worth a step
    times = {"grpo": [], "sft": []}
    peaks = {"grpo": 0, "sft": 0}
    for i in range(steps):  # ABBA order, so a drift in machine load falls on both alike
        pair = (("grpo", grpo), ("sft", sft_run))
        for name, fn in pair if i % 2 == 0 else pair[::-1]:
            seconds, peak = timed(fn)
            times[name].append(seconds)
            peaks[name] = max(peaks[name], peak)
    forwards = forward_times(model, trainer, tokens, prompt=prompt, repeats=max(1, steps // 2))
    n_tokens = rows * length
    return {
        "tokens_per_step": n_tokens,
        "trained_tokens_per_step": rows * (length - prompt),
        "lora_arrays": len(adapter_arrays(model)),
        "grpo_step_s": times["grpo"],
        "sft_step_s": times["sft"],
        "warmup": warm,
        "grpo_tokens_per_s": n_tokens / median(times["grpo"]),
        "sft_tokens_per_s": n_tokens / median(times["sft"]),
        "grpo_mlx_peak_bytes": peaks["grpo"],
        "sft_mlx_peak_bytes": peaks["sft"],
        "grpo_split": {
            k: metrics[-1][k] for k in ("micro_batches", "checkpointed_micro_batches", "kept_logits_micro_batches")
        },
        "breakdown_s": breakdown(metrics, times, forwards),
        "process_peak_rss_bytes": self_peak_rss_bytes(),
    }


def forward_times(model, trainer, tokens: list[list[int]], *, prompt: int, repeats: int) -> dict[str, float]:
    """Median seconds of each step's forward alone, no gradient: GRPO's (the trainer's chunked log-probs of the
    trained positions, entropy included, as in its gradient pass) and SFT's (mlx-lm's default_loss); and SFT's
    loss and gradient without mx.compile, which shows what compiling buys mlx-lm's step."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.tuner.trainer import default_loss

    from paraloop.learn.logprobs import forward_logprobs

    ids = mx.array(tokens)
    rows, length = ids.shape
    inputs, targets = ids, mx.concatenate([ids[:, 1:], ids[:, -1:]], axis=1)
    mask = np.zeros((rows, length), bool)
    mask[:, prompt - 1 : length - 1] = True  # the trained targets, as the rollout batch's mask gives them
    lengths = mx.array([[prompt, length - 1]] * rows)

    def grpo():
        logp, entropy = forward_logprobs(
            model,
            inputs,
            targets,
            mx.ones((rows,)),
            head=trainer.head,
            positions=np.flatnonzero(mask),
            chunk_tokens=trainer.config.logits_chunk_tokens,
        )
        mx.eval(logp, entropy)

    def sft():
        mx.eval(default_loss(model, ids, lengths))

    import mlx.nn as nn

    sft_grad = nn.value_and_grad(model, default_loss)

    def sft_uncompiled():  # the same loss and gradient, not compiled (no optimizer: the adapter stays as it is)
        (loss, ntoks), grad = sft_grad(model, ids, lengths)
        mx.eval(loss, ntoks, grad)

    out = {}
    for name, fn in (("grpo_forward_s", grpo), ("sft_forward_s", sft), ("sft_uncompiled_gradient_s", sft_uncompiled)):
        fn()  # warm
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        out[name] = median(samples)
    return out


def breakdown(metrics: list[dict], times: dict[str, list[float]], forwards: dict[str, float]) -> dict[str, dict]:
    """Where each step's time goes (medians; see the module docstring)."""
    phase = {
        k[len("time_") : -len("_s")]: median([m[k] for m in metrics]) for k in metrics[-1] if k.startswith("time_")
    }
    grpo = {
        "step": median(times["grpo"]),
        "forward": forwards["grpo_forward_s"],
        "backward": max(0.0, phase.pop("gradient") - forwards["grpo_forward_s"]),
        "old_policy_forward": phase.pop("old_policy"),
        **phase,  # optimizer, trim (malloc_trim), plan, other (collation, advantages, host syncs of the metrics)
    }
    sft = {
        "step": median(times["sft"]),
        "forward": forwards["sft_forward_s"],
        "backward_and_optimizer": max(0.0, median(times["sft"]) - forwards["sft_forward_s"]),
        "uncompiled_gradient": forwards["sft_uncompiled_gradient_s"],
    }
    return {"grpo": grpo, "sft": sft}


def run(ctx: Context) -> list[Line]:
    lines = []
    shapes = [(4, 64, ">= 1.0")] if ctx.quick else [(ROWS, LENGTH, ">= 1.0"), (ROWS, LONG, ">= 0.9")]
    models = [("SmolLM2-135M", ctx.model_q4, 16), ("tiny", tiny_model(), -1)]
    for (rows, length, target), (label, path, layers) in itertools.product(shapes, models):
        steps = 1 if ctx.quick else 4 if length <= LENGTH else 2
        r = measure(path, lora_layers=layers, steps=steps, rows=rows, length=length)
        lines.append(
            Line(
                NAME,
                f"{label}: GRPO step tokens/s over SFT step ({rows}x{length} tokens)",
                r["grpo_tokens_per_s"],
                r["sft_tokens_per_s"],
                "tok/s",
                target,
                detail=r,
                note=step_note(r),
            )
        )
        lines.append(
            Line(
                NAME,
                f"{label}: MLX peak memory, GRPO step over SFT step ({rows}x{length} tokens)",
                r["grpo_mlx_peak_bytes"] / 2**20,
                r["sft_mlx_peak_bytes"] / 2**20,
                "MiB",
                note=f"this process's peak RSS so far {r['process_peak_rss_bytes'] / 2**20:.0f} MiB",
            )
        )
    return lines


def step_note(r: dict) -> str:
    split, parts = r["grpo_split"], r["breakdown_s"]
    times = lambda xs: ", ".join(f"{t:.2f}" for t in xs)  # noqa: E731
    grpo = ", ".join(f"{k} {v:.2f}" for k, v in parts["grpo"].items() if k != "step")
    sft = ", ".join(f"{k} {v:.2f}" for k, v in parts["sft"].items() if k != "step")
    sft = sft.replace("uncompiled_gradient", "(not compiled: forward + backward") + ")"
    return (
        f"steps GRPO {times(r['grpo_step_s'])} s, SFT {times(r['sft_step_s'])} s; GRPO in "
        f"{split['micro_batches']:.0f} micro-batch(es), {split['checkpointed_micro_batches']:.0f} checkpointed, "
        f"{split['kept_logits_micro_batches']:.0f} with kept logits; median seconds: GRPO {grpo}; SFT {sft}"
    )
