"""`paraloop run` end to end: memory (benchmark 5) and RL steps/minute with generation overlap (benchmark 6).

Three short runs of SmolLM2 on the mock environment (the demo's task, LoRA and learning rate; 2 prompts x 8
completions of <= 24 tokens per step), each a child process in its own process group:
- sync (the default mode): peak RSS (VmHWM, polled from /proc) over the model's resident weights (float32, what
  the CPU computes with) + LoRA/AdamW state + a KV-cache estimate for one batch; target <= 1.5, i.e. no second copy
  of the base, reported with the defaults (the learner spends memory on speed). Also the RSS right after start-up
  over the same (the footprint before any training), and the peak of runs with rl_training.max_memory_gb set to
  the smallest value that trains (tried at 1.0, 1.1, 1.2, 1.3 and 1.5 x that footprint, the first whose run
  ends well; target <= 1.3x, and MLX's peak within the setting), with its training tokens/s beside the defaults'
  (median of the steps after the first): what a tight budget costs in speed for what it saves in memory.
- async (generation may overlap training): steps/minute over the sync run's, and the tokens generated per second
  while the learner steps over the engine's decode tokens/s while the learner waits (intervals with rows decoding),
  both from /control/status polled every 0.5 s.
"""

import json
import shutil
import statistics
import struct
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.harness import Context, Line, peak_rss_bytes, python_cmd

NAME = "run"
TITLE = "5./6. paraloop run: memory and end-to-end speed"
BUDGET_S = 600
GROUP, PROMPTS, MAX_TOKENS, PROMPT_TOKENS_EST = 8, 2, 24, 64
TIGHT_FACTORS = (1.0, 1.1, 1.2, 1.3, 1.5)  # max_memory_gb tried, as multiples of weights + LoRA state + KV

CONFIG = """
[server]
host = "127.0.0.1"
port = 0

[model]
base_path = "{model}"

[rl_training]
mode = "{mode}"
learning_rate = 5e-5
batch_size = {batch}
total_steps = {steps}
kl_beta = 0.0
token_budget = 65536
max_tokens = {max_tokens}
temperature = 1.0

[rl_training.lora]
rank = 16
num_layers = 16
dropout = 0.0
scale = 10.0
keys = "all"

[rl_training.mock]
task = "paraloop.envs.tasks:one_word"
group_size = {group}
concurrency = {prompts}

[checkpoint]
dir = "{run_dir}"
interval = 0
"""


def safetensors_bytes(path: Path) -> int:
    """Bytes of every tensor in a safetensors file (its header's offsets), without loading it."""
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")


def footprint(model_f32: Path) -> dict[str, int]:
    """What must be resident: float32 weights, LoRA + AdamW moments, one batch's KV cache (float32)."""
    config = json.loads((model_f32 / "config.json").read_text())
    weights = sum(safetensors_bytes(p) for p in model_f32.glob("*.safetensors"))
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv_dim = config["num_key_value_heads"] * config.get("head_dim", hidden // config["num_attention_heads"])
    per_layer = 16 * (2 * hidden + 2 * (hidden + kv_dim) + hidden + hidden + 2 * (hidden + inter) + (inter + hidden))
    lora = 16 * per_layer * 4 * 3  # 16 blocks, float32, parameters + two AdamW moments
    rows = GROUP * PROMPTS
    kv = rows * (PROMPT_TOKENS_EST + MAX_TOKENS) * config["num_hidden_layers"] * 2 * kv_dim * 4
    return {"weights": weights, "lora_and_adamw": lora, "kv_cache": kv, "total": weights + lora + kv}


def status(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/control/status", timeout=2) as r:
            return json.loads(r.read())
    except OSError:
        return None


def one_run(ctx: Context, mode: str, *, steps: int, max_memory_gb: float | None = None) -> dict:
    """One `paraloop run`; max_memory_gb: the learner's memory target (default: max_memory_fraction's)."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"paraloop-bench-run-{mode}-"))
    try:
        return _run(ctx, run_dir, mode, steps=steps, max_memory_gb=max_memory_gb)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _run(ctx: Context, run_dir: Path, mode: str, *, steps: int, max_memory_gb: float | None) -> dict:
    config = run_dir / "bench.toml"
    config.write_text(
        CONFIG.format(
            model=ctx.model_q4,
            mode=mode,
            batch=GROUP * PROMPTS,
            steps=steps,
            max_tokens=MAX_TOKENS,
            group=GROUP,
            prompts=PROMPTS,
            run_dir=run_dir / "run",
        )
    )
    bound = [] if max_memory_gb is None else ["--set", f"rl_training.max_memory_gb={max_memory_gb:.4f}"]
    start = time.perf_counter()
    child = ctx.spawn(
        f"run-{mode}{'' if max_memory_gb is None else f'-{max_memory_gb:.2f}gb'}",
        python_cmd("-m", "paraloop", "run", str(config), "--no-plot", *bound),
    )
    pid, port, ready_at, ready_epoch, ready_rss, peak, samples = child.proc.pid, None, None, None, None, 0, []
    server_json = run_dir / "run" / "server.json"
    while child.alive():
        peak = max(peak, peak_rss_bytes(pid) or 0)
        if port is None and server_json.is_file():
            try:
                port = json.loads(server_json.read_text())["port"]
                ready_at, ready_epoch, ready_rss = time.perf_counter(), time.time(), peak_rss_bytes(pid)
            except (ValueError, KeyError):
                pass
        if port is not None:
            s = status(port)
            if s is not None:
                e = s.get("engine", {})
                samples.append(
                    (
                        time.perf_counter(),
                        bool(s.get("learner_busy")),
                        e.get("generated_tokens", 0.0),
                        e.get("active_rows", 0.0),
                        s.get("step", 0),
                    )
                )
        time.sleep(0.5)
    end = time.perf_counter()
    ctx.stop(child)
    if child.proc.returncode != 0:
        raise RuntimeError(f"paraloop run ({mode}) exited with {child.proc.returncode}:\n{child.tail()}")
    metrics = [json.loads(x) for x in (run_dir / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    if not metrics or ready_epoch is None:
        raise RuntimeError(f"paraloop run ({mode}) wrote no metrics or never served:\n{child.tail()}")
    return {
        "mode": mode,
        "max_memory_gb": max_memory_gb,
        "steps": len(metrics),
        "wall_s": end - start,
        "startup_s": ready_at - start,
        "train_wall_s": metrics[-1]["time"] - ready_epoch,  # serving -> last step
        "peak_rss": peak,
        "ready_rss": ready_rss,
        "step_time_s": [m.get("step_time_s") for m in metrics],
        "train_tokens_per_s": statistics.median(m.get("tokens_per_s", 0.0) for m in metrics[1:] or metrics),
        "micro_batches": [m.get("micro_batches") for m in metrics],
        "checkpointed_micro_batches": [m.get("checkpointed_micro_batches") for m in metrics],
        "kept_logits_micro_batches": [m.get("kept_logits_micro_batches") for m in metrics],
        "mlx_peak_gb": max(m.get("peak_memory_gb", 0.0) for m in metrics),
        "reward_mean": [m.get("reward_mean") for m in metrics],
        "samples": samples,
    }


def decode_rates(samples: list[tuple]) -> dict[str, float]:
    """Tokens generated per second while the learner steps (whatever the engine was doing), and the engine's decode
    rate while the learner waits (over intervals with rows decoding at both ends)."""
    sums = {True: [0.0, 0.0], False: [0.0, 0.0]}
    for (t0, busy0, tok0, rows0, _), (t1, busy1, tok1, rows1, _) in zip(samples, samples[1:], strict=False):
        if busy0 != busy1 or tok1 < tok0:
            continue
        if busy0 or (rows0 > 0 and rows1 > 0):
            sums[busy0][0] += tok1 - tok0
            sums[busy0][1] += t1 - t0
    return {
        "training": sums[True][0] / sums[True][1] if sums[True][1] else 0.0,
        "idle": sums[False][0] / sums[False][1] if sums[False][1] else 0.0,
        "training_s": sums[True][1],
        "idle_s": sums[False][1],
    }


def tightest(ctx: Context, need_bytes: int, *, steps: int) -> tuple[dict, list[str]]:
    """The sync run with the smallest max_memory_gb (of a few multiples of the footprint) that trains."""
    failures = []
    for factor in TIGHT_FACTORS:
        gb = factor * need_bytes / 2**30
        try:
            return one_run(ctx, "sync", steps=steps, max_memory_gb=gb), failures
        except RuntimeError as e:
            failures.append(f"{gb:.3f} GiB: {str(e).splitlines()[-1][:200]}")
    raise RuntimeError("no max_memory_gb up to 1.5x the footprint trained: " + "; ".join(failures))


def run(ctx: Context) -> list[Line]:
    steps = 1 if ctx.quick else 5
    need = footprint(ctx.model_f32)
    sync = one_run(ctx, "sync", steps=steps)
    asyn = one_run(ctx, "async", steps=steps)
    tight, failures = tightest(ctx, need["total"], steps=steps)
    rates = decode_rates(asyn["samples"])
    sync_rate, tight_rate = (r["train_tokens_per_s"] for r in (sync, tight))
    per_min = {r["mode"]: r["steps"] / r["train_wall_s"] * 60 for r in (sync, asyn)}
    mib = 2**20
    detail = {
        "footprint_bytes": need,
        "sync": {k: v for k, v in sync.items() if k != "samples"},
        "async": {k: v for k, v in asyn.items() if k != "samples"},
        "sync_tight": {k: v for k, v in tight.items() if k != "samples"},
        "tight_failures": failures,
        "decode_rates": rates,
    }
    est = (
        f"weights {need['weights'] / mib:.0f} + LoRA/AdamW {need['lora_and_adamw'] / mib:.0f}"
        f" + KV {need['kv_cache'] / mib:.0f} MiB"
    )
    return [
        Line(
            NAME,
            "peak RSS of `paraloop run` (sync, defaults) over weights + LoRA state + KV estimate",
            sync["peak_rss"] / mib,
            need["total"] / mib,
            "MiB",
            note=f"{est}; train {sync_rate:.0f} tok/s, "
            f"micro-batches {sync['micro_batches']}, MLX peak {sync['mlx_peak_gb']:.2f} GiB",
            detail=detail,
        ),
        Line(
            NAME,
            "RSS after start-up (model loaded, engine up) over the same",
            (sync["ready_rss"] or 0) / mib,
            need["total"] / mib,
            "MiB",
        ),
        Line(
            NAME,
            f"peak RSS with max_memory_gb = {tight['max_memory_gb']:.2f} (the smallest tried that trains) "
            "over the same",
            tight["peak_rss"] / mib,
            need["total"] / mib,
            "MiB",
            "<= 1.3",
            note=f"MLX peak {tight['mlx_peak_gb']:.2f} GiB within the setting: "
            f"{'yes' if tight['mlx_peak_gb'] <= tight['max_memory_gb'] else 'NO'}; train {tight_rate:.0f} tok/s vs "
            f"{sync_rate:.0f} with the defaults; micro-batches {tight['micro_batches']}, checkpointed "
            f"{tight['checkpointed_micro_batches']}; smaller settings refused: {len(failures)}",
        ),
        Line(
            NAME,
            f"RL steps/minute, async over sync ({GROUP * PROMPTS} x <= {MAX_TOKENS} tokens per step)",
            per_min["async"],
            per_min["sync"],
            "steps/min",
            note="from serving to the last step's metrics, first generation included",
        ),
        Line(
            NAME,
            "tokens generated per s while the learner steps over decode tokens/s while it waits (async)",
            rates["training"],
            rates["idle"],
            "tok/s",
            note=f"{rates['training_s']:.0f} s training / {rates['idle_s']:.0f} s waiting sampled",
        ),
    ]
