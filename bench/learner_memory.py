"""Learner memory: chunked log-probs, block checkpointing and memory-aware micro-batches, on SmolLM2.

Measured in this process with MLX's own peak (mx.reset_peak_memory before each step; weights included):
- 8 completions of 1024 tokens after 64-token prompts (2 x 256 after 32 with --quick): paraloop's learner step with
  its defaults (LM head in chunks, blocks checkpointed from 1024 tokens) over mlx-lm's compiled LoRA SFT step on the
  same tokens and LoRA layers (full logits, no checkpointing). When the 8-row SFT step would need more than 60% of
  this machine's free memory, its peak is extrapolated linearly from its 1- and 2-row steps (the note says so).
- the same batch: tokens/s of the chunked step over the unchunked one (logits_chunk_tokens = 0), otherwise the same
  settings and the same max_memory_gb, after one calibration each, in ABBA order.
- the largest completion (one row, 64-token prompt) whose learner step stays within 4 GiB (1.25 GiB with --quick):
  now (max_memory_gb = 4: the planner refuses, before allocating, what it predicts would not fit) over before (the
  learner as it was: full logits, no checkpointing, each row its own micro-batch). Lengths double from 1024 up to
  16384 (128 up to 1024), then one bisection step between the last that fit and the first that did not.
The SFT step runs first, while only the model is held; every line's detail records the memory held before it.
"""

import time
from pathlib import Path

from bench.harness import Context, Line, median
from bench.learner import rollout_batch, sft_step, token_rows

NAME = "memory"
TITLE = "8. Learner memory: chunked log-probs, checkpointing, memory-aware micro-batches"
BUDGET_S = 1500
ROWS, PROMPT, COMPLETION = 8, 64, 1024
TARGET_GB = 4.0
LORA_LAYERS = 16  # the demo's
GiB, MiB = 2**30, 2**20


def free_memory_bytes() -> int:
    for text in Path("/proc/meminfo").read_text().splitlines():
        if text.startswith("MemAvailable:"):
            return int(text.split()[1]) * 1024
    return 0


def lora_model(path: Path):
    import mlx.core as mx

    from paraloop.config import LoraConfig
    from paraloop.lora import adapter_config, attach_lora
    from paraloop.model import load_model

    model, _, _, _ = load_model(path)
    lora = LoraConfig(rank=16, num_layers=LORA_LAYERS, dropout=0.0, scale=10.0, keys="all")
    cfg = adapter_config(lora, model)
    attach_lora(model, cfg, seed=0)
    mx.eval(model.parameters())
    return model, lora, cfg


def trainer(model, lora, cfg, **settings):
    from paraloop.config import RLTrainingConfig
    from paraloop.learn.trainer import Trainer
    from paraloop.model import twin

    learner = twin(model)  # own LoRA arrays (the same initial values), shared base weights
    rl = RLTrainingConfig(learning_rate=5e-5, kl_beta=0.0, lora=lora, **settings)
    return Trainer(learner, config=rl, adapter_config=cfg)


def peak_of(fn) -> tuple[float, int]:
    """(seconds, MLX peak bytes) of fn(), the peak including what was held before it."""
    import mlx.core as mx

    mx.clear_cache()
    mx.reset_peak_memory()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start, mx.get_peak_memory()


def held_bytes() -> int:
    import mlx.core as mx

    return mx.get_active_memory()


def sft_peak(model, vocab: int, *, rows: int, prompt: int, completion: int) -> dict:
    """mlx-lm's SFT step peak for `rows` rows, measured, or extrapolated from 1 and 2 rows when it would not fit."""
    import mlx.core as mx

    sft = sft_step(model, learning_rate=5e-5)
    length = prompt + completion

    def measured(n: int) -> int:
        ids = mx.array(token_rows(vocab, rows=n, length=length))
        lengths = mx.array([[prompt, length - 1]] * n)
        peak_of(lambda: sft(ids, lengths))  # compiles this shape
        return peak_of(lambda: sft(ids, lengths))[1]

    held = held_bytes()
    if rows <= 2:
        return {"peak": measured(rows), "extrapolated": False, "held": held}
    one, two = measured(1), measured(2)
    estimate = one + (rows - 1) * (two - one)
    if estimate > 0.6 * free_memory_bytes():
        return {"peak": estimate, "extrapolated": True, "one_row": one, "two_rows": two, "held": held}
    return {
        "peak": measured(rows),
        "extrapolated": False,
        "one_row": one,
        "two_rows": two,
        "estimate": estimate,
        "held": held,
    }


def chunked_vs_full(model, lora, cfg, batch, *, rows: int, length: int, steps: int, target_gb: float) -> dict:
    """ABBA steps of the default (chunked) learner and the unchunked one; peaks and times of each."""
    settings = {"max_memory_gb": target_gb}
    runs = {
        "chunked": trainer(model, lora, cfg, **settings),
        "full": trainer(model, lora, cfg, logits_chunk_tokens=0, **settings),
    }
    for t in runs.values():
        t.check_length(length)  # the memory model's probes, outside the timing
    times, peaks, metrics = {k: [] for k in runs}, dict.fromkeys(runs, 0), {}
    for i in range(steps):
        for name in ("chunked", "full") if i % 2 == 0 else ("full", "chunked"):
            result = {}
            seconds, peak = peak_of(lambda t=runs[name], r=result: r.update(m=t.step(batch).metrics))
            times[name].append(seconds)
            peaks[name] = max(peaks[name], peak)
            metrics[name] = result["m"]
    tokens = rows * length
    return {
        "held_bytes": held_bytes(),
        "tokens_per_step": tokens,
        "step_s": times,
        "tokens_per_s": {k: tokens / median(v) for k, v in times.items()},
        "mlx_peak_bytes": peaks,
        "micro_batches": {k: m["micro_batches"] for k, m in metrics.items()},
        "checkpointed_micro_batches": {k: m["checkpointed_micro_batches"] for k, m in metrics.items()},
    }


def largest_length(model, lora, cfg, vocab: int, *, target_gb: float, start: int, stop: int, after: bool) -> dict:
    """Largest completion length (one row, PROMPT-token prompt) whose learner step peaks within target_gb."""
    from paraloop.learn.memory import SequenceTooLong

    settings = (
        {"max_memory_gb": target_gb}
        if after
        else {
            "logits_chunk_tokens": 0,
            "activation_checkpointing": "never",
            "max_memory_fraction": None,
            "token_budget": 64,
        }
    )
    learner = trainer(model, lora, cfg, **settings)
    tried: dict[int, float | str] = {}

    def fits(completion: int) -> bool:
        batch = rollout_batch(token_rows(vocab, rows=1, length=PROMPT + completion), prompt=PROMPT)
        try:
            _, peak = peak_of(lambda: learner.step(batch))
        except SequenceTooLong:
            tried[completion] = "refused by the planner"
            return False
        tried[completion] = peak / GiB
        return peak <= target_gb * GiB

    good, bad = 0, None
    length = start
    while bad is None and length <= stop:
        if fits(length):
            good, length = length, length * 2
        else:
            bad = length
    if good and bad is not None and fits((good + bad) // 2):
        good = (good + bad) // 2
    return {"largest": good, "tried_peak_gib": tried, "held_bytes": held_bytes()}


def run(ctx: Context) -> list[Line]:
    rows, prompt, completion = (2, 32, 256) if ctx.quick else (ROWS, PROMPT, COMPLETION)
    target, start, stop = (1.25, 128, 1024) if ctx.quick else (TARGET_GB, 1024, 16384)
    model, lora, cfg = lora_model(ctx.model_q4)
    vocab = model.args.vocab_size
    length = prompt + completion
    batch = rollout_batch(token_rows(vocab, rows=rows, length=length), prompt=prompt)
    sft = sft_peak(model, vocab, rows=rows, prompt=prompt, completion=completion)  # first: nothing else held yet
    speed = chunked_vs_full(
        model, lora, cfg, batch, rows=rows, length=length, steps=2 if ctx.quick else 4, target_gb=2 * target
    )
    sizes = {"target_gb": target, "start": start, "stop": stop}
    before = largest_length(model, lora, cfg, vocab, after=False, **sizes)
    now = largest_length(model, lora, cfg, vocab, after=True, **sizes)
    ours = speed["mlx_peak_bytes"]["chunked"]
    sft_note = (
        f"SFT extrapolated from 1 and 2 rows ({sft['one_row'] / MiB:.0f}, {sft['two_rows'] / MiB:.0f} MiB): "
        f"{rows} rows would not fit this machine"
        if sft["extrapolated"]
        else ""
    )
    sft_note += f"{'; ' if sft_note else ''}weights and LoRA state held: {sft['held'] / MiB:.0f} MiB in both"
    shape = f"{rows} x {completion}-token completions"
    return [
        Line(
            NAME,
            f"SmolLM2, {shape}: learner step MLX peak over mlx-lm's LoRA SFT step",
            ours / MiB,
            sft["peak"] / MiB,
            "MiB",
            "<= 0.5",
            sft_note,
            {"sft": sft, "paraloop": speed},
        ),
        Line(
            NAME,
            f"SmolLM2, {shape}: tokens/s, LM head in chunks over full logits",
            speed["tokens_per_s"]["chunked"],
            speed["tokens_per_s"]["full"],
            "tok/s",
            ">= 0.9",
            f"same max_memory_gb = {2 * target:g}; micro-batches {speed['micro_batches']}",
            speed,
        ),
        Line(
            NAME,
            f"SmolLM2: largest completion that trains within {target:g} GiB (1 row), now over before",
            now["largest"],
            before["largest"],
            "tokens",
            note="before: full logits, no checkpointing, one row per micro-batch",
            detail={"now": now, "before": before},
        ),
    ]
