"""Benchmark 15's RL-step line: the Tinker SDK's RL loop (examples/tinker_rl.py) against a fresh `paraloop tinker`,
and `paraloop run` on configs/demo.toml, the same steps, one after the other with nothing else of the benchmark's up.

The SDK loop gets demo.toml's step shape as flags (task, prompts = batch_size / group_size, group_size, max_tokens,
LoRA rank; temperature 1.0 in both); `paraloop run` gets LoRA on every block (`--lora-layers -1`), since a Tinker
training client has no num_layers: its adapter is on every linear layer of every block. A Tinker adapter's scale is
32 / rank (2 at rank 16), demo.toml's 10, so the SDK loop's learning rate is demo.toml's times 10 / 2 (2.5e-4,
examples/tinker_rl.py's default): with Adam a step moves the output by about scale x rate, and both policies must
learn at the same pace, since what they learn (to answer in one word) sets the completions' lengths and with them
generation's share of a step. Held-out evaluation is off in both and nothing is checkpointed between steps.

A step is the wall time between two consecutive step lines of a run's metrics.jsonl (their `time`): in both it
spans the whole step, generation of the batch, the learner's step and the new weights reaching the sampler
(`step_time_s` would not do: `paraloop run`'s is the learner's part alone). The first step (warm-ups, the learner's
memory probes) has no line before it, so it is left out. What cannot be the same: the prompts (each run draws its
own from the task, with its own seed), hence the completions and their lengths (recorded; both capped at
max_tokens), and the loss (the SDK's `importance_sampling` on reward - group mean, `paraloop run`'s GRPO loss on
advantages scaled by the group's std; the same forward and backward work per token, and Adam's step does not
depend on the gradient's scale).
"""

import json
import statistics
import tempfile
import tomllib
from pathlib import Path

from bench.harness import ROOT, Child, Context, python_cmd

DEMO = ROOT / "configs" / "demo.toml"
EXAMPLE = ROOT / "examples" / "tinker_rl.py"
RUN_TIMEOUT_S = 1200.0


def demo_shape() -> dict:
    """demo.toml's step: the flags examples/tinker_rl.py takes for it."""
    from paraloop.tinker.learner import lora_scale

    rl = tomllib.loads(DEMO.read_text())["rl_training"]
    if rl["temperature"] != 1.0:
        raise ValueError(f"{DEMO} samples at temperature {rl['temperature']}; examples/tinker_rl.py at 1.0")
    group = rl["mock"]["group_size"]
    return {
        "task": rl["mock"]["task"],
        "prompts": rl["batch_size"] // group,
        "group": group,
        "max-tokens": rl["mock"].get("max_tokens", rl["max_tokens"]),
        "rank": rl["lora"]["rank"],
        "lr": rl["learning_rate"] * rl["lora"]["scale"] / lora_scale(rl["lora"]["rank"]),
    }


def step_gaps(metrics: list[dict]) -> list[float]:
    """Seconds between consecutive training-step lines (evaluation lines have a `kind`): one per step after the
    first."""
    times = [m["time"] for m in metrics if "kind" not in m]
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def finish(ctx: Context, child: Child, what: str, run_dir: Path) -> dict:
    """Wait for a child run to end; its step lines, their gaps and completion lengths."""
    try:
        child.proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        ctx.stop(child)
    metrics = [m for m in read_metrics(run_dir) if "kind" not in m]
    if child.proc.returncode != 0 or len(metrics) < 2:
        raise RuntimeError(f"{what} exited with {child.proc.returncode}, {len(metrics)} step lines:\n{child.tail()}")
    gaps = step_gaps(metrics)
    return {
        "steps": len(metrics),
        "step_s": gaps,
        "median_s": statistics.median(gaps),
        "completion_length_mean": [m.get("completion_length_mean") for m in metrics],
        "reward_mean": [m.get("reward_mean") for m in metrics],
    }


def sdk_loop(ctx: Context, url: str, model: Path, steps: int) -> dict:
    """examples/tinker_rl.py against the `paraloop tinker` at `url` (serving nothing else)."""
    run_dir = Path(tempfile.mkdtemp(prefix="paraloop-bench-tinker-rl-", dir=ctx.log_dir))
    flags = [f"--{k}={v}" for k, v in demo_shape().items()]
    cmd = python_cmd(str(EXAMPLE), "--url", url, "--base-model", str(model), *flags)
    cmd += ["--steps", str(steps), "--eval-every", "0", "--run-dir", str(run_dir)]
    child = ctx.spawn("tinker-rl-sdk", cmd, env={"TINKER_API_KEY": "tml-bench"})
    return finish(ctx, child, "examples/tinker_rl.py", run_dir)


def paraloop_run(ctx: Context, model: Path, steps: int) -> dict:
    """`paraloop run configs/demo.toml` with LoRA on every block, no evaluation, no checkpoints between steps."""
    run_dir = Path(tempfile.mkdtemp(prefix="paraloop-bench-tinker-run-", dir=ctx.log_dir))
    cmd = python_cmd("-m", "paraloop", "run", str(DEMO), "--no-plot", "--model-path", str(model))
    cmd += ["--steps", str(steps), "--lora-layers", "-1", "--port", "0", "--run-dir", str(run_dir)]
    cmd += ["--checkpoint-interval", "0", "--set", "eval.every_steps=0"]
    child = ctx.spawn("tinker-rl-run", cmd)
    return finish(ctx, child, "paraloop run", run_dir)
