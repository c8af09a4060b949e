"""A multi-turn tool-use task: arithmetic with a calculator that the model calls in a `<tool_call>` block.

The prompt is a system message describing the tool and a question ("What is 37 * 48 + 15?"). The model calls
    <tool_call>{"name": "calculator", "arguments": {"expression": "37 * 48 + 15"}}</tool_call>
(the Hermes / Qwen tool-call format, which ChatML templates render as plain assistant text) and ends with
"Answer: <number>". After each turn the environment replies (`respond`): a `tool` message with the result of each
call (or why it failed); a reminder of the format when the turn had neither a call nor an answer; nothing once the
turn answers, which ends the episode. The reward scores the last turn: 1 for the right answer, 0.25 for a wrong
answer in the format, 0 otherwise. Small models seldom call the tool by themselves; the reminders make every
episode multi-turn anyway, which is what the tests need from the tiny random model.
"""

import ast
import json
import operator
import random
import re

from paraloop.envs.tasks import Messages, Sample, Task

SYSTEM = (
    "You can use a calculator. To call it, write "
    '<tool_call>{"name": "calculator", "arguments": {"expression": "2 * (3 + 4)"}}</tool_call> '
    "and stop: its result comes back in a tool message. When you know the result, write Answer: <number>."
)
REMINDER = 'Call the calculator with <tool_call>...</tool_call> or give your final answer as "Answer: <number>".'
SHAPES = ("{a} * {b} + {c}", "{a} * {b} - {c}", "({a} + {b}) * {c}", "{a} * {c} + {b} * {c}")
EVAL_SHAPE = "{a} * ({b} - {c})"  # held out: the eval split's questions only
MAX_EXPRESSION = 64  # characters: a call with a longer expression is answered with an error
MAX_VALUE = 1e12

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_ANSWER = re.compile(r"Answer:\s*(-?\d[\d,]*(?:\.\d+)?)")
_QUESTION = re.compile(r"What is (.+)\?$")
_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}


class CalculatorError(ValueError):
    pass


def evaluate(expression: str) -> float:
    """+ - * / // % and parentheses over numbers; CalculatorError for anything else (no names, no powers)."""
    if len(expression) > MAX_EXPRESSION:
        raise CalculatorError(f"the expression is longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise CalculatorError(f"cannot parse {expression!r}") from None

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -value(node.operand) if isinstance(node.op, ast.USub) else value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            try:
                out = _OPS[type(node.op)](value(node.left), value(node.right))
            except ZeroDivisionError:
                raise CalculatorError("division by zero") from None
            if abs(out) > MAX_VALUE:
                raise CalculatorError("the result is too large")
            return out
        raise CalculatorError(f"only numbers, + - * / // % and parentheses are allowed in {expression!r}")

    return value(tree.body)


def show(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else f"{number:.6g}"


def tool_calls(text: str) -> list[str]:
    """The expressions of the calculator calls in a turn (a malformed call yields an error text instead)."""
    out = []
    for body in _CALL.findall(text):
        try:
            call = json.loads(body)
            if call.get("name") != "calculator":
                raise CalculatorError(f"unknown tool {call.get('name')!r}")
            expression = call["arguments"]["expression"]
            out.append(show(evaluate(str(expression))))
        except (json.JSONDecodeError, AttributeError, KeyError, TypeError):
            out.append('error: expected {"name": "calculator", "arguments": {"expression": "..."}}')
        except CalculatorError as e:
            out.append(f"error: {e}")
    return out


def final_answer(text: str) -> float | None:
    found = _ANSWER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def _prompt(rng: random.Random) -> Messages:
    shape = rng.choice(SHAPES)
    question = shape.format(a=rng.randint(11, 99), b=rng.randint(11, 99), c=rng.randint(2, 99))
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"What is {question}?"}]


def respond(sample: Sample) -> Messages | None:
    if final_answer(sample.text) is not None:
        return None
    results = tool_calls(sample.text)
    if results:
        return [{"role": "tool", "content": result} for result in results]
    return [{"role": "user", "content": REMINDER}]


def reward(sample: Sample) -> float:
    question = next(m["content"] for m in sample.prompt if m["role"] == "user")
    found = _QUESTION.match(question)
    if found is None:
        raise ValueError(f"not a calculator prompt: {question!r}")
    answer = final_answer(sample.text)
    if answer is None:
        return 0.0
    return 1.0 if abs(answer - evaluate(found.group(1))) < 1e-6 else 0.25


def _held_out() -> list[Messages]:
    """16 questions of a shape training never draws (a product of a difference), fixed numbers."""
    rng = random.Random("calculator/eval")
    questions = [
        EVAL_SHAPE.format(a=rng.randint(11, 99), b=rng.randint(50, 99), c=rng.randint(2, 49)) for _ in range(16)
    ]
    return [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"What is {q}?"}] for q in questions]


def calculator() -> Task:
    return Task(
        name="calculator",
        prompt=_prompt,
        reward=reward,
        respond=respond,
        eval_prompts=_held_out(),
        description="Multi-turn: arithmetic with a calculator tool; full reward only for the right final answer.",
    )
