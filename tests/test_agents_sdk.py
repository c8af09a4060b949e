"""The real OpenAI Agents SDK (`openai-agents`, pinned in the test extras) against `paraloop serve` on the tiny model.

An agent with two function tools and tool_choice "required": the first turn must be a call (the grammar makes the
random weights write a well-formed one), the SDK runs the tool and sends its result back as a `tool` message; the
SDK then resets tool_choice to "auto" (its default), the model answers text, and the run finishes.
"""

import json

import anyio
from test_http_serve import Serve

from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from agents.items import ToolCallItem, ToolCallOutputItem
from openai import AsyncOpenAI

DEADLINE_S = 120


def test_an_agents_sdk_agent_calls_a_tool_gets_its_result_and_finishes(tiny_model_path):
    calls: list[tuple[str, dict]] = []

    @function_tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        calls.append(("add", {"a": a, "b": b}))
        return a + b

    @function_tool
    def shout(text: str) -> str:
        """Say text loudly."""
        calls.append(("shout", {"text": text}))
        return text.upper()

    set_tracing_disabled(True)
    with Serve("--model-path", str(tiny_model_path), "--served-model-name", "tiny") as server:
        async def run():
            client = AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none", max_retries=0)
            agent = Agent(
                name="calculator",
                instructions="Use the tools.",
                model=OpenAIChatCompletionsModel(model="tiny", openai_client=client),
                tools=[add, shout],
                model_settings=ModelSettings(tool_choice="required", max_tokens=400, temperature=0.8),
            )
            with anyio.fail_after(DEADLINE_S):
                result = await Runner.run(agent, "What is 2 + 3?", max_turns=4)
            await client.close()
            return result

        result = anyio.run(run)
    assert calls, "the SDK ran no tool"
    made = [item for item in result.new_items if isinstance(item, ToolCallItem)]
    outputs = [item for item in result.new_items if isinstance(item, ToolCallOutputItem)]
    assert len(made) == len(outputs) == len(calls)
    for (name, args), item in zip(calls, made, strict=True):  # the SDK ran each call with the arguments sent
        assert (item.raw_item.name, json.loads(item.raw_item.arguments)) == (name, args)
    assert isinstance(result.final_output, str)  # the second turn ("auto") answered text: the run finished
