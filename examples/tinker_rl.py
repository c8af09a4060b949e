"""A Tinker SDK RL loop (the shape of tinker-cookbook's recipes/rl_loop.py) against a local `paraloop tinker`.

Only the official `tinker` SDK talks to the server; paraloop is imported for the reward task (the built-in
`one_word` task: "Name a {category}. Answer with one word only.") and its held-out scoring, and for the report at
the end, so the loop is what any Tinker program does: sample a group per prompt from the latest weights,
advantages = reward - group mean, `importance_sampling` forward_backward, `optim_step`, a new sampling client.
Each step prints one line and appends it to RUN_DIR/metrics.jsonl; the task's held-out prompts are scored before
training, every --eval-every steps and at the end (lines marked "kind": "eval"). At the end it prints the same
tables as `paraloop run` and writes RUN_DIR/metrics.png (`paraloop plot`'s picture). From the repository root, with
models/smollm2 built (`make demo` does it):

    paraloop tinker --model-path models/smollm2 --port 8000 &
    python examples/tinker_rl.py --url http://127.0.0.1:8000 --base-model models/smollm2 --steps 20

or, starting and stopping the server itself (what `make tinker-demo` runs):

    python examples/tinker_rl.py --serve models/smollm2 --run-dir runs/tinker-demo --steps 12

`--report RUN_DIR` prints the tables and writes the PNG of a finished run again, with no server.
"""

import argparse
import contextlib
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tinker
from tinker import types

from paraloop.config import Settings
from paraloop.envs.tasks import Sample, load_task
from paraloop.evaluation import EvalPlan, eval_plan, eval_requests, score
from paraloop.learn.loss import LOG_RATIO_BOUND, MISMATCH_BAND
from paraloop.learn.mismatch import mismatch_metrics
from paraloop.messages import Completion
from paraloop.plot import plot_run, read_evals, read_metrics
from paraloop.run.monitor import eval_table, summary_table

PORT_LINE = re.compile(r"Tinker API for .* on (http://\S+)")
# The server answers a poll of an unfinished future after tinker.poll_wait_s with try_again, and the SDK polls again
# (its polling, not an error); it logs a warning each time, which on a CPU would bury the step lines.
logging.getLogger("tinker.lib.api_future_impl").addFilter(lambda record: "because of try_again" not in str(record.msg))


def report(run_dir: Path) -> None:
    """`paraloop run`'s end of run: the per-step table, the held-out table, the PNG."""
    print("\n" + summary_table(read_metrics(run_dir)))
    evals = eval_table(read_evals(run_dir))
    if evals:
        print("\n" + evals)
    print(f"\nwrote {plot_run(run_dir)}")


@contextlib.contextmanager
def serving(model: str, run_dir: Path, key: str) -> Iterator[str]:
    """`paraloop tinker --port 0` as a child process in its own process group (its log: RUN_DIR/server.log),
    stopped on the way out; yields its URL once it serves."""
    log_path = run_dir / "server.log"
    cmd = [sys.executable, "-m", "paraloop", "tinker", "--model-path", model, "--port", "0"]
    cmd += ["--set", f"tinker.state_dir={run_dir / 'state'}", "--control-token", key]
    env = {**os.environ, "PARALOOP_LOG": os.environ.get("PARALOOP_LOG", "info")}
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 600  # a cold model load on a busy machine
        while (found := PORT_LINE.search(log_path.read_text())) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"paraloop tinker did not start (exit {proc.returncode}); see {log_path}")
            time.sleep(0.2)
        print(f"paraloop tinker serving {model} on {found[1]} (log: {log_path})", flush=True)
        yield found[1]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def evaluate(sampler: tinker.SamplingClient, tokenizer: Any, plan: EvalPlan, step: int) -> dict[str, Any]:
    """The task's held-out prompts through the SDK, scored as `paraloop run` scores them (same seeds)."""
    start = time.monotonic()
    requests = eval_requests(plan, tokenizer)
    futures = [
        sampler.sample(
            types.ModelInput.from_ints(r.prompt_tokens),
            num_samples=r.n,
            sampling_params=types.SamplingParams(
                max_tokens=r.params.max_tokens, temperature=r.params.temperature, seed=r.params.seed
            ),
        )
        for r in requests
    ]
    results = [
        [
            Completion(
                row=j,
                tokens=list(s.tokens),
                logprobs=list(s.logprobs or []),
                versions=[],
                text=tokenizer.decode(s.tokens, skip_special_tokens=True),
                finish_reason=s.stop_reason,
            )
            for j, s in enumerate(f.result().sequences)
        ]
        for f in futures
    ]
    metrics = score(plan, tokenizer, results, time.monotonic() - start).metrics
    record = {"kind": "eval", "time": time.time(), "step": step, "version": step, "task": plan.task.name, **metrics}
    print(f"eval at step {step}: reward {metrics['reward_mean']:.3f} pass@1 {metrics['pass@1']:.3f}", flush=True)
    return record


def agreement(sampled: list[tuple[int, list[float]]], learner: list[np.ndarray]) -> dict[str, float]:
    """`paraloop run`'s mismatch metrics: each completion's log-probs as the sampler gave them, (prompt length - 1,
    log-probs) per datum, against the learner's of the same tokens (this step's forward_backward, on the weights
    that sampled them: they differ by float rounding only)."""
    pairs = zip(sampled, learner, strict=True)
    diff = np.concatenate([(lp[pad:] - np.asarray(s)).astype(np.float64) for (pad, s), lp in pairs])
    ratio = np.exp(np.clip(diff, -LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    sums = {
        "mismatch_abs_sum": float(np.abs(diff).sum()),
        "mismatch_abs_max": float(np.abs(diff).max(initial=0.0)),
        "mismatch_tokens": float(diff.size),
        "rollout_ratio_sum": float(ratio.sum()),
        "rollout_ratio_min": float(ratio.min(initial=np.inf)),
        "rollout_ratio_max": float(ratio.max(initial=-np.inf)),
        "rollout_ratio_outside": float(((ratio < MISMATCH_BAND[0]) | (ratio > MISMATCH_BAND[1])).sum()),
        "rollout_tokens": float(diff.size),
    }
    return mismatch_metrics(sums)


def train(args: argparse.Namespace, url: str, key: str) -> None:
    task = load_task(args.task)
    service = tinker.ServiceClient(base_url=url, api_key=key)
    trainer = service.create_lora_training_client(base_model=args.base_model, rank=args.rank).result()
    tokenizer = trainer.get_tokenizer()
    params = types.SamplingParams(max_tokens=args.max_tokens, temperature=1.0)
    sampler = trainer.save_weights_and_get_sampling_client().result()
    plan = None
    if args.eval_every:
        settings = Settings.model_validate(
            {
                "rl_training": {"mock": {"task": args.task, "max_tokens": args.max_tokens}},
                "eval": {"prompts": args.eval_prompts, "samples": args.eval_samples, "temperature": 1.0},
            }
        )
        plan = eval_plan(settings)
    rng = random.Random(0)
    metrics_path = args.run_dir / "metrics.jsonl"

    def record(line: dict[str, Any]) -> None:
        with metrics_path.open("a") as f:
            f.write(json.dumps(line) + "\n")

    if plan is not None:
        record(evaluate(sampler, tokenizer, plan, 0))
    print(f"{'step':>4} {'reward':>7} {'loss':>9} {'s':>6}")
    for step in range(1, args.steps + 1):
        start = time.monotonic()
        chats = [task.prompt(rng) for _ in range(args.prompts)]
        texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
        prompts = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
        futures = [
            sampler.sample(types.ModelInput.from_ints(p), num_samples=args.group, sampling_params=params)
            for p in prompts
        ]
        data, rewards, sampled = [], [], []
        for chat, prompt, future in zip(chats, prompts, futures, strict=True):
            seqs = future.result().sequences
            group = [
                task.reward(
                    Sample(
                        prompt=chat,
                        text=tokenizer.decode(s.tokens, skip_special_tokens=True),
                        finish_reason=s.stop_reason,
                        tokens=s.tokens,
                    )
                )
                for s in seqs
            ]
            rewards += group
            for seq, reward in zip(seqs, group, strict=True):
                full, pad = prompt + seq.tokens, len(prompt) - 1
                advantage = reward - float(np.mean(group))
                sampled.append((pad, seq.logprobs))
                data.append(
                    types.Datum(
                        model_input=types.ModelInput.from_ints(full[:-1]),
                        loss_fn_inputs={
                            "target_tokens": full[1:],
                            "logprobs": [0.0] * pad + seq.logprobs,
                            "advantages": [0.0] * pad + [advantage] * len(seq.tokens),
                        },
                    )
                )
        learn_start = time.monotonic()
        out = trainer.forward_backward(data, "importance_sampling").result()
        trainer.optim_step(types.AdamParams(learning_rate=args.lr)).result()
        learn_s = time.monotonic() - learn_start
        sampler = trainer.save_weights_and_get_sampling_client().result()
        loss = out.metrics["loss:sum"]
        line = {
            "step": step,
            "version": step,
            "reward_mean": float(np.mean(rewards)),
            "reward_std": float(np.std(rewards)),
            "loss": loss,
            "step_time_s": time.monotonic() - start,
            "time": time.time(),  # when the line is written, as in `paraloop run`'s lines
            "completion_length_mean": float(np.mean([len(logprobs) for _, logprobs in sampled])),
            "tokens_per_s": sum(d.model_input.length for d in data) / learn_s,
            **agreement(sampled, [o["logprobs"].to_numpy() for o in out.loss_fn_outputs]),
        }
        print(f"{step:>4} {line['reward_mean']:>7.3f} {loss:>9.3f} {line['step_time_s']:>6.1f}", flush=True)
        record(line)
        if plan is not None and (step % args.eval_every == 0 or step == args.steps):
            record(evaluate(sampler, tokenizer, plan, step))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--serve", metavar="MODEL", help="start `paraloop tinker --model-path MODEL` (and stop it)")
    parser.add_argument("--base-model", help="the server's --model-path (default: --serve's MODEL)")
    parser.add_argument("--task", default="paraloop.envs.tasks:one_word")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--group", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2.5e-4, help="the rate of the recorded run (docs/tinker.md)")
    parser.add_argument("--eval-every", type=int, default=10, help="held-out evaluation every N steps (0: none)")
    parser.add_argument("--eval-prompts", type=int, default=8, help="held-out prompts (the task's eval split)")
    parser.add_argument("--eval-samples", type=int, default=4, help="samples per held-out prompt (pass@k)")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/tinker-rl"), help="metrics.jsonl, metrics.png")
    parser.add_argument("--report", action="store_true", help="only print the tables and write the PNG of --run-dir")
    args = parser.parse_args()
    if args.report:
        report(args.run_dir)
        return
    args.base_model = args.base_model or args.serve
    if not args.base_model:
        parser.error("--base-model (the server's --model-path) or --serve MODEL is required")
    args.run_dir.mkdir(parents=True, exist_ok=True)
    # the key: TINKER_API_KEY (any tml-... key; the server's control token when it has one)
    key = os.environ.get("TINKER_API_KEY", "tml-local")
    if args.serve:
        with serving(args.serve, args.run_dir, key) as url:
            train(args, url, key)
    else:
        train(args, args.url, key)
    report(args.run_dir)


if __name__ == "__main__":
    main()
