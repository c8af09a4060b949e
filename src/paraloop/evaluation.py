"""Held-out evaluation: a task's eval prompts through an engine, scored by the task's reward; `paraloop eval`.

In: an Engine serving some adapter, its tokenizer and an EvalPlan (`eval_plan(settings)`: the task's eval split, k
samples per prompt, temperature, max_tokens, pass threshold, seed). Out: an EvalResult with reward_mean, pass@1
(the mean over every sample of reward >= pass_threshold) and pass@k for k = 2, 4, ... samples (the unbiased
estimator of Chen et al. 2021, arXiv 2107.03374), plus every sample for inspection. A multi-turn task (one with
`respond`) plays each sample's episode as training does (envs/episodes.py, rl_training.mock.max_turns and
max_episode_tokens) and scores its last turn; `turns_mean` says how long the episodes were.

Every prompt's request is seeded from (seed, prompt index) and all of them are admitted in one decode step
(`Engine.complete_many`), so the same adapter, engine settings and plan give the same completions: `paraloop run`'s
in-training evaluation and a standalone `paraloop eval` of the checkpoint agree exactly (when nothing else is
generating at the time).

    paraloop eval --model-path M [--adapter A] [--task T] [--config C] [--prompts N] [--samples K] ...

evaluates the base model and the adapter (a run dir, a checkpoint dir or an adapter dir) side by side.
"""

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from paraloop.config import ConfigError, Settings
from paraloop.envs.episodes import Episode, play
from paraloop.envs.mock import eos_ids, make_sample, prompt_ids
from paraloop.envs.tasks import Messages, Sample, Task, load_task
from paraloop.messages import Completion, GenerateRequest, SamplingParams


@dataclass(frozen=True)
class EvalPlan:
    task_spec: str
    task: Task
    prompts: list[Messages]
    samples: int
    temperature: float
    max_tokens: int
    pass_threshold: float
    seed: int
    max_turns: int = 1  # a multi-turn task's episodes (rl_training.mock.max_turns)
    max_episode_tokens: int = 2048
    template_kwargs: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        sampling = "greedy" if self.temperature == 0 else f"temperature {self.temperature:g}"
        return (
            f"{self.task.name}: {len(self.prompts)} held-out prompts x {self.samples} sample(s), {sampling}, "
            f"at most {self.max_tokens} tokens, pass = reward >= {self.pass_threshold:g}"
        )


@dataclass
class EvalResult:
    metrics: dict[str, float]
    samples: list[dict[str, Any]] = field(default_factory=list)  # prompt, sample index, text, reward, finish


def eval_plan(settings: Settings) -> EvalPlan:
    """The evaluation `settings.eval` asks for; ConfigError naming the key when it cannot be made."""
    ev, rl = settings.eval, settings.rl_training
    spec = ev.task or rl.mock.task
    try:
        task = load_task(spec)
    except ValueError as e:
        raise ConfigError(f"eval.task: {e}") from None
    prompts = list(task.eval_prompts)
    if not prompts:
        raise ConfigError(
            f"eval.task: task {spec!r} has no eval split (give its Task eval_prompts: held-out prompts its "
            "prompt() never draws)"
        )
    prompts = prompts[: ev.prompts] if ev.prompts else prompts
    if len(prompts) > settings.server.max_concurrent_requests:
        raise ConfigError(
            f"eval.prompts: {len(prompts)} prompts are more requests than server.max_concurrent_requests "
            f"({settings.server.max_concurrent_requests}) admits at once"
        )
    max_tokens = ev.max_tokens or rl.mock.max_tokens or rl.max_tokens
    if max_tokens > settings.engine.max_tokens_limit:
        raise ConfigError(f"eval.max_tokens: {max_tokens} is above engine.max_tokens_limit")
    return EvalPlan(
        spec,
        task,
        prompts,
        ev.samples,
        ev.temperature,
        max_tokens,
        ev.pass_threshold,
        ev.seed,
        max_turns=rl.mock.max_turns,
        max_episode_tokens=rl.mock.max_episode_tokens,
        template_kwargs=dict(rl.mock.chat_template_kwargs),
    )


def eval_requests(plan: EvalPlan, tokenizer: Any) -> list[GenerateRequest]:
    """One request per prompt (n = samples), each seeded from (seed, prompt index)."""
    requests = []
    for i, messages in enumerate(plan.prompts):
        rng = random.Random(f"eval/{plan.seed}/{i}")
        params = SamplingParams(temperature=plan.temperature, max_tokens=plan.max_tokens, seed=rng.getrandbits(63))
        requests.append(
            GenerateRequest(
                request_id=f"eval-{plan.seed}-{i}",
                prompt_tokens=prompt_ids(tokenizer, messages),
                n=plan.samples,
                params=params,
            )
        )
    return requests


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass: 1 - C(n - c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def score(
    plan: EvalPlan,
    tokenizer: Any,
    results: list[list[Completion]],
    elapsed: float,
    finals: list[list[Sample]] | None = None,
) -> EvalResult:
    """Metrics of every prompt's completions; `finals`: a multi-turn task's last turn of each (what is scored)."""
    eos = eos_ids(tokenizer)
    samples, passed, rewards, turns = [], [], [], []
    for i, (messages, completions) in enumerate(zip(plan.prompts, results, strict=True)):
        row = []
        for j, completion in enumerate(completions):
            if completion.finish_reason == "abort":
                raise RuntimeError("the engine aborted an evaluation request (is it stopping?)")
            final = (
                finals[i][j] if finals is not None else make_sample(messages, completion, tokenizer=tokenizer, eos=eos)
            )
            turns.append(final.turn)
            reward = float(plan.task.reward(final))
            if not math.isfinite(reward):
                raise ValueError(f"task {plan.task_spec!r}: the reward function returned {reward}")
            rewards.append(reward)
            row.append(reward >= plan.pass_threshold)
            samples.append(
                {
                    "prompt": i,
                    "sample": j,
                    "content": messages[-1]["content"],
                    "text": final.text,
                    "reward": reward,
                    "finish_reason": final.finish_reason,
                    "turns": final.turn,
                    "tokens": len(completion.tokens),
                }
            )
        passed.append(sum(row))
    n = plan.samples
    metrics = {
        "reward_mean": sum(rewards) / len(rewards),
        "pass@1": sum(passed) / (n * len(passed)),
    }
    k = 2
    while k <= n:
        metrics[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in passed) / len(passed)
        k *= 2
    if n > 1 and f"pass@{n}" not in metrics:
        metrics[f"pass@{n}"] = sum(pass_at_k(n, c, n) for c in passed) / len(passed)
    metrics.update(
        truncated=sum(s["finish_reason"] == "length" for s in samples) / len(samples),
        completion_tokens_mean=sum(s["tokens"] for s in samples) / len(samples),
        prompts=float(len(plan.prompts)),
        samples=float(n),
        **({"turns_mean": sum(turns) / len(turns)} if plan.task.respond is not None else {}),
        time_s=elapsed,
    )
    return EvalResult(metrics, samples)


async def evaluate(engine: Any, tokenizer: Any, plan: EvalPlan) -> EvalResult:
    """Run the plan through `engine` (every request admitted together) and score it."""
    start = time.perf_counter()
    requests = eval_requests(plan, tokenizer)
    results = await engine.complete_many(requests)
    finals = None
    if plan.task.respond is not None:
        finals = await play_episodes(engine, tokenizer, plan, requests, results)
    return score(plan, tokenizer, results, time.perf_counter() - start, finals)


async def play_episodes(
    engine: Any, tokenizer: Any, plan: EvalPlan, requests: list[GenerateRequest], results: list[list[Completion]]
) -> list[list[Sample]]:
    """A multi-turn task's later turns for every sample (seeded from the sample and the turn); the last turns."""
    eos = eos_ids(tokenizer)

    def sample_of(messages: Messages, completion: Completion, turn: int) -> Sample:
        return make_sample(messages, completion, tokenizer=tokenizer, eos=eos, turn=turn)

    groups = [
        [Episode.first(m, r.prompt_tokens, c, sample_of(m, c, 1)) for c in completions]
        for m, r, completions in zip(plan.prompts, requests, results, strict=True)
    ]
    origin = {id(e): (i, j) for i, group in enumerate(groups) for j, e in enumerate(group)}

    def request_for(episode: Episode, prompt: list[int], turn: int) -> GenerateRequest:
        i, j = origin[id(episode)]
        seed = random.Random(f"eval/{plan.seed}/{i}/{j}/{turn}").getrandbits(63)
        params = SamplingParams(temperature=plan.temperature, max_tokens=plan.max_tokens, seed=seed)
        return GenerateRequest(request_id=f"eval-{plan.seed}-{i}-{j}-turn{turn}", prompt_tokens=prompt, params=params)

    async def complete(batch: list[GenerateRequest]) -> list[Completion]:
        return [rows[0] for rows in await engine.complete_many(batch)]

    await play(
        [e for group in groups for e in group],
        task=plan.task,
        tokenizer=tokenizer,
        eos=eos,
        complete=complete,
        request_for=request_for,
        sample_of=sample_of,
        max_turns=plan.max_turns,
        max_length=plan.max_episode_tokens,
        template_kwargs=plan.template_kwargs,
    )
    return [[e.sample for e in group] for group in groups]


HEADLINE = ("reward_mean", "pass@1")


def headline_keys(metrics: dict[str, float]) -> list[str]:
    """reward_mean, pass@1 and the largest pass@k."""
    keys = [k for k in metrics if k.startswith("pass@") and k != "pass@1"]
    return [*HEADLINE, *keys[-1:]]


def side_by_side(columns: dict[str, dict[str, float]]) -> str:
    """A plain-text table: one row per metric, one column per evaluated adapter."""
    first = next(iter(columns.values()))
    keys = [k for k in first if k not in ("prompts", "samples")]
    width = max(12, *(len(c) for c in columns))
    lines = [" " * 24 + "".join(f"{name:>{width + 2}}" for name in columns)]
    for key in keys:
        lines.append(
            f"{key:<24}" + "".join(f"{col.get(key, float('nan')):>{width + 2}.4f}" for col in columns.values())
        )
    return "\n".join(lines)


# --- paraloop eval ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from paraloop.flags import add_config_flags

    p = argparse.ArgumentParser(
        prog="paraloop eval",
        description="Evaluate a model and an adapter on a task's held-out prompts, side by side.",
    )
    p.add_argument(
        "--adapter",
        "--adapter-path",
        "--lora-path",
        dest="adapter",
        help="adapter to evaluate: a run dir (latest checkpoint), a checkpoint dir, or an adapter dir / adapter.npz",
    )
    # dest eval_*: never mistaken for the run flags of the same name (--task is rl_training.mock.task there)
    from paraloop.flags import flag_help

    p.add_argument(
        "--task",
        dest="eval_task",
        metavar="TASK",
        help=flag_help("eval.task", "task as module:function or file.py:function (unset: rl_training.mock.task)"),
    )
    p.add_argument(
        "--prompts",
        dest="eval_prompts",
        metavar="N",
        type=int,
        help=flag_help("eval.prompts", "first N prompts of the eval split (unset: all)"),
    )
    p.add_argument(
        "--samples",
        dest="eval_samples",
        metavar="K",
        type=int,
        help=flag_help("eval.samples", "completions per prompt"),
    )
    p.add_argument(
        "--temperature",
        dest="eval_temperature",
        metavar="T",
        type=float,
        help=flag_help("eval.temperature", "0: greedy"),
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        dest="eval_max_tokens",
        metavar="N",
        help=flag_help("eval.max_tokens", "generation cap (unset: the rollouts' cap)"),
    )
    p.add_argument("--no-base", action="store_true", help="evaluate only the adapter, not the base model too")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--output", help="directory for every sample, as base.jsonl and adapter.jsonl")
    add_config_flags(p, only=("--model-path", "--compute", "--seed"))
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    from paraloop.config import set_dotted
    from paraloop.flags import overrides_from_args

    tree = overrides_from_args(args)
    for key in ("task", "prompts", "samples", "temperature", "max_tokens"):
        value = getattr(args, f"eval_{key}")
        if value is not None:
            tree = set_dotted(tree, f"eval.{key}", value)
    from paraloop.config import load_config

    settings = load_config(args.config, tree)
    if not settings.model.base_path:
        raise ConfigError("model.base_path: no model given (use --model-path)")
    return settings


def adapter_path(path: str) -> Path:
    """`--adapter` as run and serve read it (checkpoint.adapter_location: an adapter as given, a run or checkpoints
    dir as its newest checkpoint), refused here before the model loads where that leaves the loader to refuse it."""
    from paraloop import checkpoint

    found = checkpoint.adapter_location(path)
    if checkpoint.holds_adapter(found):
        return found
    reason = "no such file or directory" if not found.exists() else "no adapter weights and no complete checkpoint"
    raise ValueError(f"--adapter {path}: neither an adapter nor a run or checkpoint dir ({reason})")


async def compare(settings: Settings, adapter: str | None, *, base: bool) -> tuple[EvalPlan, dict[str, EvalResult]]:
    """Load the model (and adapter), then evaluate the adapter and, when asked, the base model (zero LoRA)."""
    import anyio
    import mlx.core as mx

    from paraloop.engine import Engine
    from paraloop.lora import AdapterSlots, adapter_arrays, apply_adapter
    from paraloop.model import load_model

    plan = eval_plan(settings)
    model, tokenizer, _, _ = load_model(
        settings.model.base_path, compute=settings.model.compute, trust_remote_code=settings.model.trust_remote_code
    )
    slots = None
    if adapter is not None:
        apply_adapter(model, adapter_path(adapter), seed=settings.rl_training.seed)
        slots = AdapterSlots(model)
    engine = Engine.from_settings(model, tokenizer, settings, adapter=slots, version=0)
    results: dict[str, EvalResult] = {}
    async with anyio.create_task_group() as tg:
        await tg.start(engine.run)
        if adapter is not None:
            results["adapter"] = await evaluate(engine, tokenizer, plan)
        if base or adapter is None:
            if slots is not None:  # x @ 0 @ 0 adds exact zeros: the base model's own outputs
                zeros = {k: mx.zeros_like(v) for k, v in adapter_arrays(model).items()}
                mx.eval(zeros)
                await engine.swap_adapter(zeros, 1)
            results["base"] = await evaluate(engine, tokenizer, plan)
        tg.cancel_scope.cancel()
    return plan, {name: results[name] for name in ("base", "adapter") if name in results}


def main(argv: list[str] | None = None) -> int:
    import anyio

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = settings_from(args)
        plan, results = anyio.run(partial(compare, settings, args.adapter, base=not args.no_base))
    except (ConfigError, ValueError, OSError) as e:
        print(f"paraloop: error: {e}", file=sys.stderr)
        return 2
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        for name, result in results.items():
            (out / f"{name}.jsonl").write_text("".join(json.dumps(s) + "\n" for s in result.samples))
    if args.json:
        print(json.dumps({"task": plan.task_spec, **{k: r.metrics for k, r in results.items()}}))
    else:
        print(f"held-out eval of {plan.describe()}")
        print(side_by_side({name: r.metrics for name, r in results.items()}))
    return 0
