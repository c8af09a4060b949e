"""examples/arithmetic_task.py, the documented way to bring your own task: its rewards and held-out split, and a
`paraloop run` (the console script, from the examples directory, no PYTHONPATH) that trains and evaluates on it."""

import json
import os
import random
import sys
from pathlib import Path

import pytest

from support import procs
from support.runs import run_args
from paraloop.envs.tasks import Sample, load_task

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def test_the_example_task_scores_and_holds_out_its_eval_prompts():
    task = load_task(str(EXAMPLES / "arithmetic_task.py") + ":arithmetic")
    prompt = task.eval_prompts[0]
    a, b = (int(x.rstrip("?")) for x in prompt[-1]["content"].split()[2:5:2])
    right, stop = str(a + b), "stop"
    assert task.reward(Sample(prompt=prompt, text=right, finish_reason=stop)) == 1.0
    assert task.reward(Sample(prompt=prompt, text=f"It is {right}.", finish_reason=stop)) == 0.5
    assert task.reward(Sample(prompt=prompt, text=str(a + b + 1), finish_reason=stop)) == 0.1
    assert task.reward(Sample(prompt=prompt, text=right, finish_reason="length")) == 0.0
    rng = random.Random(0)
    trained = {task.prompt(rng)[-1]["content"] for _ in range(3000)}
    held_out = {p[-1]["content"] for p in task.eval_prompts}
    assert len(trained) == 80 and len(held_out) == 20 and trained.isdisjoint(held_out)


@pytest.mark.slow
def test_paraloop_run_trains_and_evaluates_a_task_from_the_current_directory(tiny_model_path, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PARALOOP_LOG="warning", PYTHONUNBUFFERED="1")
    script = Path(sys.executable).with_name("paraloop")  # the console script: its sys.path[0] is bin/, not cwd
    run_dir = tmp_path / "run"
    cmd = [
        str(script),
        "run",
        *run_args(tiny_model_path, run_dir, "--steps", "2", "--no-plot", "--task", "arithmetic_task:arithmetic"),
        *("--set", "eval.every_steps=2", "--set", "eval.prompts=4"),
    ]
    done = procs.run(cmd, timeout=180, cwd=EXAMPLES, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [line for line in lines if line.get("kind") == "eval"]
    assert [e["version"] for e in evals] == [0, 2] and {e["task"] for e in evals} == {"arithmetic"}
    assert [line["step"] for line in lines if "kind" not in line] == [1, 2]
