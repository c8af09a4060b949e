"""A reward task of your own for paraloop's built-in environment: small sums, answered with the number alone.

    cd examples                                              # the task is found in the current directory
    paraloop run ../configs/demo.toml --task arithmetic_task:arithmetic --run-dir ../runs/arithmetic
    paraloop eval --model-path ../models/smollm2 --adapter ../runs/arithmetic --task arithmetic_task:arithmetic

`task = "arithmetic_task:arithmetic"` (in [rl_training.mock], or [eval] for evaluation only) imports this module
from the current directory even though the `paraloop` console script does not put it on sys.path; from anywhere
else give the file's path (`--task examples/arithmetic_task.py:arithmetic`; in a TOML file, relative to that file),
or install your package.

A Task is four things (paraloop.envs.tasks):
- `prompt(rng)`: one training prompt, a list of chat messages, drawn from the seeded `rng` (reproducible runs);
- `reward(sample)`: a number in [0, 1] for one completion (`sample.text`, `sample.finish_reason` "stop" or
  "length", `sample.tokens`, `sample.prompt`); an exception or a non-finite value stops the run with its message;
- `eval_prompts`: held-out prompts that `prompt` never draws, for [eval] and `paraloop eval`;
- `name` and `description`, for logs and tables.
The module-level function is called without arguments and returns the Task.
"""

import random
import re

from paraloop.envs.tasks import Messages, Sample, Task

HELD_OUT = {(a, b) for a in range(10) for b in range(10) if (a * 7 + b * 3) % 5 == 0}  # 20 of 100 sums
TRAIN = sorted({(a, b) for a in range(10) for b in range(10)} - HELD_OUT)


def question(a: int, b: int) -> Messages:
    return [{"role": "user", "content": f"What is {a} plus {b}? Reply with the number only."}]


def operands(prompt: Messages) -> tuple[int, int]:
    match = re.fullmatch(r"What is (\d+) plus (\d+)\? Reply with the number only\.", prompt[-1]["content"])
    if match is None:
        raise ValueError(f"not an arithmetic prompt: {prompt[-1]['content']!r}")
    return int(match[1]), int(match[2])


def reward(sample: Sample) -> float:
    """1 for exactly the right number and nothing else; 0.5 for the right number with other words; 0.1 for stopping
    by itself with a number at all (a format the model can find before it can add); else 0."""
    a, b = operands(sample.prompt)
    numbers = re.findall(r"-?\d+", sample.text)
    if sample.finish_reason != "stop" or not numbers:
        return 0.0
    if int(numbers[0]) != a + b:
        return 0.1
    return 1.0 if sample.text.strip().rstrip(".") == str(a + b) else 0.5


def arithmetic() -> Task:
    return Task(
        name="arithmetic",
        prompt=lambda rng: question(*rng.choice(TRAIN)),
        reward=reward,
        description="Add two digits and answer with the number only.",
        eval_prompts=tuple(question(a, b) for a, b in sorted(HELD_OUT)),
    )


if __name__ == "__main__":  # a quick look at what the task asks and how it scores
    task = arithmetic()
    print(task.prompt(random.Random(0))[-1]["content"])
    print(reward(Sample(prompt=question(2, 3), text="5", finish_reason="stop")))
