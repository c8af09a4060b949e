"""A tiny real Atropos environment for paraloop's tests: arithmetic prompts in code, scored by the reply's number.

Runs under the atropos venv (scripts/setup-atropos-venv.sh), never under paraloop's, and imports no paraloop code:

    .venv-atropos/bin/python tests/scripts/atropos_env.py serve \
        --env.rollout_server_url http://127.0.0.1:8001 --env.tokenizer_name MODEL_DIR \
        --openai.base_url http://127.0.0.1:8000/v1 --openai.tokenizer_name MODEL_DIR --openai.model_name paraloop

It is what a real environment does: chat prompts through atroposlib's ManagedServer with server type `vllm` (POST
{base_url without /v1}/generate with prompt token ids, GET /health), so tokens, masks (-100 on the prompt) and
inference_logprobs (1.0 on the prompt) come from the inference server's own tokens and logprobs, not re-tokenized
text. Scores vary within a group (ensure_scores_are_not_same is off so a random model's groups are kept anyway).
ATROPOS_TEST_SINGLE_SERVER_CONFIG=1 runs the variant whose config_init returns a bare server config, like GSM8K.
"""

import os
import re

from atroposlib.envs.base import APIServerConfig, BaseEnv, BaseEnvConfig, ScoredDataGroup

QUESTIONS = [(f"What is {a} plus {b}? Reply with the number only.", a + b) for a in range(2, 9) for b in range(1, 6)]


def score(reply: str, answer: int) -> float:
    """1 for the right number first, plus up to 0.1 for a short reply in characters (keeps a group's scores apart
    even when a random model's replies all run to max_tokens)."""
    numbers = re.findall(r"-?\d+", reply)
    correct = 1.0 if numbers and int(numbers[0]) == answer else 0.0
    return correct + 0.1 * (1.0 - min(len(reply), 200) / 200)


class ArithmeticEnv(BaseEnv):
    name = "paraloop_arithmetic"
    env_config_cls = BaseEnvConfig

    @classmethod
    def config_init(cls) -> tuple[BaseEnvConfig, list[APIServerConfig]]:
        env = BaseEnvConfig(
            group_size=2,
            max_token_length=256,
            use_wandb=False,
            wandb_name=cls.name,
            ensure_scores_are_not_same=False,
            steps_per_eval=1_000_000_000,  # evaluate() never runs
            max_num_workers_per_node=2,
            max_batches_offpolicy=2,
            total_steps=1_000_000,
            worker_timeout=120,
        )
        # A one-element list: a bare APIServerConfig makes atroposlib ignore base_url (it then probes :9004-9007).
        server = APIServerConfig(
            server_type="vllm",
            base_url="http://127.0.0.1:8000/v1",
            model_name="paraloop",
            api_key="x",
            timeout=120,
            num_max_requests_at_once=8,
        )
        return env, [server]

    async def setup(self) -> None:
        self.index = 0

    async def get_next_item(self) -> tuple[str, int]:
        question = QUESTIONS[self.index % len(QUESTIONS)]
        self.index += 1
        return question

    async def collect_trajectories(self, item: tuple[str, int]) -> tuple[ScoredDataGroup | None, list]:
        question, answer = item
        max_tokens = 16
        async with self.server.managed_server(tokenizer=self.tokenizer) as managed:
            completion = await managed.chat_completion(
                messages=[{"role": "user", "content": question}],
                n=self.config.group_size,
                max_tokens=max_tokens,
                temperature=1.0,
            )
            nodes = managed.get_state()["nodes"]
        group = ScoredDataGroup(
            tokens=[node.tokens for node in nodes],
            masks=[node.masked_tokens for node in nodes],
            inference_logprobs=[node.logprobs for node in nodes],
            scores=[score(choice.message.content or "", answer) for choice in completion.choices],
            advantages=None,
            ref_logprobs=None,
            messages=None,
            generation_params={"temperature": 1.0, "max_tokens": max_tokens},
            group_overrides={},  # base handle_send_to_api calls .get on it
            overrides=None,
            images=None,
        )
        return group, []

    async def evaluate(self, *args, **kwargs) -> None:
        return None


class SingleServerConfigEnv(ArithmeticEnv):
    """config_init returns one APIServerConfig, not a list, as GSM8K does: atroposlib then ignores
    --openai.base_url unless run through paraloop/atropos/env_shim.py."""

    @classmethod
    def config_init(cls) -> tuple[BaseEnvConfig, APIServerConfig]:
        env, servers = super().config_init()
        return env, servers[0]


if __name__ == "__main__":
    (SingleServerConfigEnv if os.environ.get("ATROPOS_TEST_SINGLE_SERVER_CONFIG") else ArithmeticEnv).cli()
