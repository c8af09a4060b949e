"""The real OpenAI Agents SDK (`openai-agents`, pinned in the test extras) against `paraloop serve` on the tiny model.

An agent with two function tools and tool_choice "required": the first turn must be a call (the grammar makes the
random weights write a well-formed one), the SDK runs the tool and sends its result back as a `tool` message; the
SDK then resets tool_choice to "auto" (its default), the model answers text, and the run finishes.
"""

import json

import anyio
from support.serving import Serve

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


def test_an_agent_with_an_output_type_gets_its_structured_answer_after_a_tool_call(tiny_model_path):
    """`output_type` beside tools: the SDK sends response_format (json_schema, strict) with the tools; the first turn
    is a call (tool_choice "required"), the next ("auto") may call again or answer JSON the SDK parses into the type."""
    from pydantic import BaseModel

    class Answer(BaseModel):
        value: int
        ok: bool

    ran: list[int] = []

    @function_tool
    def double(x: int) -> int:
        """Double an integer."""
        ran.append(x)
        return 2 * x

    set_tracing_disabled(True)
    with Serve("--model-path", str(tiny_model_path), "--served-model-name", "tiny") as server:

        async def run():
            client = AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none", max_retries=0)
            agent = Agent(
                name="doubler",
                instructions="Use the tool, then answer.",
                tools=[double],
                output_type=Answer,
                model=OpenAIChatCompletionsModel(model="tiny", openai_client=client),
                model_settings=ModelSettings(
                    tool_choice="required",
                    max_tokens=200,
                    temperature=0.8,
                    parallel_tool_calls=False,
                    extra_body={"seed": 4},
                ),
            )
            with anyio.fail_after(DEADLINE_S):
                result = await Runner.run(agent, "Double 21.", max_turns=12)
            await client.close()
            return result

        result = anyio.run(run)
    assert ran  # the required first turn called the tool
    assert isinstance(result.final_output, Answer)  # a later turn answered JSON valid under the SDK's schema
