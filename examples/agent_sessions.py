"""An OpenAI Agents SDK agent whose own traffic trains the model serving it (docs/agents.md, "Training from agent
traffic").

Start a run in sessions mode (`paraloop run configs/agent-sessions.toml`), then this script: for each arithmetic
question, `--group-size` agent runs (one session each, tagged by the X-Paraloop-Session header on every model call)
answer it with a calculator function tool; each session is rewarded 1 for the right number in the final answer,
0.25 for a calculator call whose result was right, else 0, and the question's sessions form one GRPO group. The run
trains on each complete group and serves the new adapter to the next sessions.

    python examples/agent_sessions.py --url http://127.0.0.1:8000 --questions 40 --group-size 4
"""

import argparse
import asyncio
import json
import random
import re
import urllib.request

from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled
from agents.exceptions import AgentsException
from openai import AsyncOpenAI

from paraloop.envs.calculator import SHAPES, CalculatorError, evaluate, show


def post(url: str, body: dict, token: str | None) -> dict:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


async def session(client: AsyncOpenAI, question: str, answer: float, session_id: str, max_turns: int) -> float:
    """One agent run as one session; its reward."""
    results: list[float] = []

    @function_tool
    def calculator(expression: str) -> str:
        """Evaluate an arithmetic expression (+ - * / and parentheses)."""
        try:
            value = evaluate(expression)
        except CalculatorError as e:
            return f"error: {e}"
        results.append(value)
        return show(value)

    agent = Agent(
        name="arithmetic",
        instructions="Use the calculator, then answer with the number alone.",
        tools=[calculator],
        model=OpenAIChatCompletionsModel(model="policy", openai_client=client),
        model_settings=ModelSettings(
            tool_choice="required", max_tokens=64, temperature=1.0, extra_headers={"X-Paraloop-Session": session_id}
        ),
    )
    try:
        result = await Runner.run(agent, f"What is {question}?", max_turns=max_turns)
        final = str(result.final_output)
    except AgentsException:  # too many turns, or a call the SDK could not run: its turns still train
        final = ""
    numbers = [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", final.replace(",", ""))]
    if answer in numbers:
        return 1.0
    return 0.25 if answer in results else 0.0


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the paraloop run's address")
    p.add_argument("--token", default=None, help="server.control_token, if the run has one")
    p.add_argument("--questions", type=int, default=40)
    p.add_argument("--group-size", type=int, default=4, help="rl_training.sessions.group_size of the run")
    p.add_argument("--max-turns", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    set_tracing_disabled(True)  # no traces sent to OpenAI
    client = AsyncOpenAI(base_url=f"{args.url}/v1", api_key=args.token or "none", max_retries=0, timeout=120)
    rng = random.Random(args.seed)
    for q in range(args.questions):
        question = rng.choice(SHAPES).format(a=rng.randint(2, 40), b=rng.randint(2, 40), c=rng.randint(2, 40))
        answer = evaluate(question)
        rewards = []
        for i in range(args.group_size):
            sid = f"q{args.seed}-{q}-{i}"
            rewards.append(await session(client, question, answer, sid, args.max_turns))
        for i, value in enumerate(rewards):  # the group's sessions, one reward each, under the question's key
            done = post(
                f"{args.url}/v1/sessions/q{args.seed}-{q}-{i}/reward", {"reward": value, "group": f"q{q}"}, args.token
            )
        print(f"{question} = {show(answer)}: rewards {rewards} (group complete: {done['group_complete']})", flush=True)
    await client.close()


if __name__ == "__main__":
    asyncio.run(main())
