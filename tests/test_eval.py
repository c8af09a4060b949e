"""Held-out evaluation: pass@k, plans from the config, the evaluator actor's schedule on the credit path, and a
`paraloop run` whose in-training evaluations equal a standalone `paraloop eval` of its checkpoints."""

import json
import sys
from pathlib import Path

import anyio
import pytest

from support import procs
from support.runs import RUN_ENV, TINY_CONFIG, read_metrics, run_to_end

from paraloop.config import ConfigError, load_config
from paraloop.dashboard.sources import RunFiles
from paraloop.evaluation import eval_plan, pass_at_k
from paraloop.messages import EvalFinished
from paraloop.run.evaluator import Evaluator
from paraloop.run.preflight import settings_problems
from paraloop.run.status import RunStatus

EVAL_FLAGS = ("--set", "eval.every_steps=2", "--set", "eval.samples=2", "--set", "eval.temperature=0.15")


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(5, 3, 3) == 1.0  # fewer failures than k: every draw of k holds a pass


def test_the_plan_comes_from_the_eval_section():
    settings = load_config(TINY_CONFIG, {"eval": {"every_steps": 5, "prompts": 3, "samples": 4, "temperature": 0.5}})
    plan = eval_plan(settings)
    assert plan.task.name == "capitals" and len(plan.prompts) == 3 and plan.max_tokens == 8  # rl_training's cap
    with pytest.raises(ValueError, match="samples > 1 needs temperature > 0"):
        load_config(TINY_CONFIG, {"eval": {"samples": 4}})
    no_split = load_config(TINY_CONFIG, {"eval": {"every_steps": 2, "task": "test_envs_tasks:no_eval_split"}})
    with pytest.raises(ConfigError, match="has no eval split"):
        eval_plan(no_split)
    assert any("has no eval split" in p for p in settings_problems(no_split)), "paraloop run --dry-run says so"
    assert not any("eval" in p for p in settings_problems(load_config(TINY_CONFIG)))


def test_the_evaluator_evaluates_due_versions_forwards_credits_and_ends_with_the_last(monkeypatch):
    """Versions 1..5 arrive (every 2): 2 and 4 are due; 5 is the last step, so its credit is held back and it
    is evaluated once the stream ends. Every other credit goes on to the fetcher only after the evaluation."""
    events = []

    async def fake_evaluate(engine, tokenizer, plan):
        events.append(("eval", engine.version))

        class Result:
            metrics = {"reward_mean": 0.5, "pass@1": 0.25}

        return Result()

    monkeypatch.setattr("paraloop.run.evaluator.evaluate", fake_evaluate)

    class Engine:
        version = 0

    class Plan:
        class task:
            name = "t"

    async def main():
        engine, steps = Engine(), {"n": 0}
        results_send, results_recv = anyio.create_memory_object_stream[EvalFinished](10)
        versions_send, versions_recv = anyio.create_memory_object_stream[int](1)
        credits_send, credits_recv = anyio.create_memory_object_stream[int](1)
        evaluator = Evaluator(
            engine,
            None,
            Plan,
            every=2,
            status=RunStatus(total_steps=5, mode="sync", run_dir="."),
            step=lambda: steps["n"],
            total_steps=5,
            results=results_send,
        )
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(evaluator.run, versions_recv, credits_send)
                async with versions_send:
                    for version in range(1, 6):
                        engine.version, steps["n"] = version, version
                        await versions_send.send(version)
                        if version < 5:
                            assert await credits_recv.receive() == version
                            events.append(("credit", version))
                with pytest.raises(anyio.EndOfStream):
                    await credits_recv.receive()  # closed after the final evaluation, no credit for step 5
                done = [r async for r in results_recv]
        return events, done

    events, done = anyio.run(main, backend="asyncio")
    assert events == [("credit", 1), ("eval", 2), ("credit", 2), ("credit", 3), ("eval", 4), ("credit", 4), ("eval", 5)]
    assert [(d.step, d.version) for d in done] == [(2, 2), (4, 4), (5, 5)]


def eval_cli(model: Path, adapter: Path, *extra: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "paraloop",
        "eval",
        "--config",
        str(TINY_CONFIG),
        "--model-path",
        str(model),
        "--adapter",
        str(adapter),
        "--json",
        *extra,
    ]
    proc = procs.run(cmd, timeout=180, env=RUN_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_evaluation_during_a_run_matches_a_standalone_paraloop_eval(tiny_model_path, tmp_path):
    run_dir = tmp_path / "run"
    done = run_to_end(
        tiny_model_path,
        run_dir,
        "--steps",
        "4",
        "--checkpoint-interval",
        "2",
        "--set",
        "rl_training.dynamic_sampling=true",
        *EVAL_FLAGS,
    )
    err = done.stderr
    assert done.returncode == 0, err[-3000:]
    lines = read_metrics(run_dir)
    evals = {r["version"]: r for r in lines if r.get("kind") == "eval"}
    steps = [r for r in lines if r.get("kind") != "eval"]
    assert sorted(evals) == [0, 2, 4], "the start, every 2 versions, and the end"
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for row in steps:  # the live mismatch check: the engine's rollouts rescored by the learner
        assert row["mismatch_abs_mean"] < 1e-4 and row["mismatch_tokens"] > 0 and row["staleness_max"] == 0
        assert row["sampling_draws"] >= 1 and "zero_signal_groups" in row
    assert evals[0]["prompts"] == 8 and evals[0]["samples"] == 2 and "pass@2" in evals[0]
    assert "held-out eval (capitals, 8 prompts x 2 samples)" in err
    shown = RunFiles([run_dir]).evals(0)["evals"]  # what `paraloop dashboard RUN_DIR` charts
    assert [(e["step"], e["reward_mean"]) for e in shown] == [(v, evals[v]["reward_mean"]) for v in (0, 2, 4)]

    flags = [flag for pair in zip(EVAL_FLAGS[::2], EVAL_FLAGS[1::2], strict=True) for flag in pair]
    standalone = eval_cli(tiny_model_path, run_dir / "checkpoints" / "step_000004", *flags)
    for name, version in (("adapter", 4), ("base", 0)):
        ours = {k: v for k, v in standalone[name].items() if k != "time_s"}
        assert ours == {k: evals[version][k] for k in ours}, name
    assert standalone["adapter"] != standalone["base"]
    mid = eval_cli(tiny_model_path, run_dir / "checkpoints" / "step_000002", "--no-base", *flags)
    assert mid["adapter"]["reward_mean"] == evals[2]["reward_mean"] and "base" not in mid


def test_a_multi_turn_task_is_evaluated_on_whole_episodes(tiny_model_path):
    """The calculator task's held-out questions: each sample plays its episode (tool result, then its answer) and
    the last turn is scored; a sample that answers at once is one turn."""
    from support.episodes import ScriptedEngine, call

    from paraloop.envs import calculator
    from paraloop.evaluation import evaluate
    from paraloop.model import load_model

    _, tokenizer, _, _ = load_model(tiny_model_path)
    settings = load_config(
        TINY_CONFIG,
        {
            "eval": {
                "every_steps": 1,
                "task": "paraloop.envs.calculator:calculator",
                "prompts": 2,
                "samples": 2,
                "temperature": 1.0,
            }
        },
    )
    plan = eval_plan(settings)
    question = calculator._QUESTION.match(plan.prompts[0][-1]["content"]).group(1)
    right = calculator.show(calculator.evaluate(question))
    script = [[f"Let me compute. {call(question)}", f"Answer: {right}"], ["Answer: 1"]]  # by sample
    result = anyio.run(evaluate, ScriptedEngine(tokenizer, script), tokenizer, plan)
    first = [s for s in result.samples if s["prompt"] == 0]
    assert [(s["turns"], s["reward"]) for s in first] == [(2, 1.0), (1, 0.25)]
    assert result.metrics["turns_mean"] == 1.5 and result.metrics["prompts"] == 2
