"""A multi-turn conversation through atroposlib's ManagedServer (server type vllm), for paraloop's tests.

Runs under the atropos venv, never under paraloop's, and imports no paraloop code:

    .venv-atropos/bin/python tests/scripts/atropos_multiturn.py MODEL_DIR PORT TURNS

Plays TURNS turns against the /generate of the server on 127.0.0.1:PORT exactly as a multi-turn environment does
(the conversation grows by the assistant's reply and a user message each turn) and prints, as one JSON line, the
ManagedServer node after each turn: tokens, masked_tokens, logprobs.
"""

import asyncio
import json
import sys

from atroposlib.envs.server_handling.server_baseline import APIServerConfig
from atroposlib.envs.server_handling.server_manager import ServerManager
from transformers import AutoTokenizer

FOLLOW_UPS = ["Are you sure?", "Say it again, shorter.", "Thanks. One more time?"]


async def main(model_dir: str, port: int, turns: int) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = APIServerConfig(
        server_type="vllm",
        base_url=f"http://127.0.0.1:{port}/v1",
        model_name="paraloop",
        tokenizer_name=model_dir,
        api_key="x",
        timeout=60,
        health_check=False,
    )
    messages = [{"role": "user", "content": "What is 2 plus 3?"}]
    nodes = []
    async with ServerManager([config]).managed_server(tokenizer=tokenizer) as managed:
        for turn in range(turns):
            completion = await managed.chat_completion(messages=messages, n=1, max_tokens=12, temperature=1.0)
            (node,) = managed.get_state()["nodes"]
            nodes.append({"tokens": node.tokens, "masks": node.masked_tokens, "logprobs": node.logprobs})
            messages += [
                {"role": "assistant", "content": completion.choices[0].message.content},
                {"role": "user", "content": FOLLOW_UPS[turn % len(FOLLOW_UPS)]},
            ]
    print(json.dumps(nodes))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
