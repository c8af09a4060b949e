"""Multi-turn episodes of the mock environment: each later turn extends the sequence by token ids (only the
environment's new text is tokenised), the environment's tokens are masked out of the loss, and the calculator task
answers tool calls. On the tiny model: the learner's log-probs of every sampled token equal the engine's (masked
spans in the middle included), and each later turn prefills only what the environment added."""

from typing import Any

import paraloop  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import anyio
import mlx.core as mx
import numpy as np
import pytest

from paraloop.config import EngineConfig, LoraConfig, MockEnvConfig, RLTrainingConfig
from paraloop.engine import Engine
from paraloop.envs import calculator
from paraloop.envs.episodes import TemplateError, continuation_ids, render
from paraloop.envs.mock import MockEnvironment, make_sample, prompt_ids
from paraloop.envs.tasks import Sample
from paraloop.learn.batch import collate
from paraloop.learn.logprobs import forward_logprobs
from paraloop.learn.trainer import Trainer
from paraloop.lora import AdapterSlots, adapter_config, attach_lora
from paraloop.messages import PROMPT_MASK, RolloutBatch
from paraloop.model import twin
from support.episodes import EOS, ScriptedEngine, call, turn

CALCULATOR = "paraloop.envs.calculator:calculator"


# --- continuation ids ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eos", [True, False])
def test_the_environment_appends_only_the_new_text_as_the_template_renders_it(tiny, eos):
    tokenizer = tiny[1]
    messages = [{"role": "system", "content": calculator.SYSTEM}, {"role": "user", "content": "What is 2 * 21?"}]
    prompt = prompt_ids(tokenizer, messages)
    sampled = turn(tokenizer, 'Let me see. <tool_call>{"name": "calculator"', eos=eos)
    reply = [{"role": "tool", "content": "42"}]
    sample = make_sample(messages, sampled, tokenizer=tokenizer, eos={EOS})
    inserted = continuation_ids(tokenizer, messages, sample, reply, eos={EOS})

    # The sequence (earlier ids untouched) reads exactly as the chat template renders the whole conversation.
    whole = [*messages, {"role": "assistant", "content": sample.text}, *reply]
    text = tokenizer.decode(prompt + sampled.tokens + inserted, skip_special_tokens=False)
    assert text == render(tokenizer, whole, generation_prompt=True)
    # The end-of-turn marker is the model's own EOS when it stopped on it, else the environment closes the turn.
    assert (inserted[0] == EOS) is (not eos)
    assert tokenizer.decode(inserted, skip_special_tokens=False).endswith("<|im_start|>assistant\n")


class Trimming:
    """The tiny tokenizer with a template that strips message content (not prefix-stable)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    def encode(self, *args: Any, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(*args, **kwargs)

    def apply_chat_template(self, messages: list, *, tokenize: bool, add_generation_prompt: bool) -> str:
        text = "".join(f"<|im_start|>{m['role']}\n{m['content'].strip()}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def test_a_template_that_rewrites_earlier_text_is_refused(tiny):
    tokenizer = Trimming(tiny[1])
    messages = [{"role": "user", "content": "What is 2 * 21?"}]
    sample = make_sample(messages, turn(tiny[1], " 42 ", eos=True), tokenizer=tiny[1], eos={EOS})
    with pytest.raises(TemplateError, match="prefix"):
        continuation_ids(tokenizer, messages, sample, [{"role": "user", "content": "Sure?"}], eos={EOS})


# --- the calculator task --------------------------------------------------------------------------------------------


def calc_sample(text: str, *, question: str = "What is 37 * 48 + 15?") -> Sample:
    prompt = [{"role": "system", "content": calculator.SYSTEM}, {"role": "user", "content": question}]
    return Sample(prompt=prompt, text=text, finish_reason="stop")


def test_the_calculator_evaluates_arithmetic_and_nothing_else():
    assert calculator.evaluate("37 * 48 + 15") == 1791 and calculator.evaluate("-(3 + 4) / 2") == -3.5
    for bad, why in [
        ("2 ** 64", "only numbers"),
        ("__import__('os')", "only numbers"),
        ("1 / 0", "division"),
        ("9" * 13 + " * 10", "too large"),
        ("1 +", "cannot parse"),
        ("1+" * 40 + "1", "longer"),
    ]:
        with pytest.raises(calculator.CalculatorError, match=why):
            calculator.evaluate(bad)


def test_the_environment_answers_tool_calls_reminds_the_format_and_stops_at_an_answer():
    assert calculator.respond(calc_sample(f"Let me compute. {call('37 * 48 + 15')}")) == [
        {"role": "tool", "content": "1791"}
    ]
    replies = calculator.respond(
        calc_sample(call("1 / 0") + '<tool_call>{"name": "search"}</tool_call>' + "<tool_call>not json</tool_call>")
    )
    assert [r["content"] for r in replies] == [
        "error: division by zero",
        "error: unknown tool 'search'",
        'error: expected {"name": "calculator", "arguments": {"expression": "..."}}',
    ]
    assert calculator.respond(calc_sample("I do not know.")) == [{"role": "user", "content": calculator.REMINDER}]
    assert calculator.respond(calc_sample("Answer: 1791")) is None


def test_the_reward_pays_for_the_right_final_answer():
    assert calculator.reward(calc_sample("So the total is... Answer: 1,791")) == 1.0
    assert calculator.reward(calc_sample("Answer: 1790")) == 0.25
    assert calculator.reward(calc_sample(call("37 * 48 + 15"))) == 0.0
    with pytest.raises(ValueError, match="not a calculator prompt"):
        calculator.reward(calc_sample("Answer: 1", question="Name a fruit."))


# --- episodes in the mock environment -------------------------------------------------------------------------------


def test_an_episode_is_one_sequence_trained_only_on_the_sampled_turns(tiny):
    tokenizer = tiny[1]
    script = [[f"I will use the tool. {call('{q}')}", "Answer: {a}"], ["Answer: 5"]]
    env = MockEnvironment(
        ScriptedEngine(tokenizer, script),
        tokenizer,
        temperature=1.0,
        max_tokens=40,
        seed=3,
        config=MockEnvConfig(task=CALCULATOR, group_size=2, max_turns=4),
    )
    messages, first = env._request(0)
    question = messages[1]["content"].removeprefix("What is ").removesuffix("?")
    script[0] = [script[0][0].replace("{q}", question), f"Answer: {calculator.show(calculator.evaluate(question))}"]

    group = anyio.run(env.group)
    requests = env.engine.requests
    assert [r.n for r in requests] == [2, 1]  # row 1 answered at once; row 0 called the tool, then answered
    later = requests[1]
    t1, t2 = (turn(tokenizer, text, eos=True).tokens for text in script[0])
    prompt = first.prompt_tokens
    assert later.prompt_tokens[: len(prompt) + len(t1)] == prompt + t1  # the earlier ids, untouched
    inserted = later.prompt_tokens[len(prompt) + len(t1) :]
    tool_result = calculator.show(calculator.evaluate(question))
    assert tokenizer.decode(inserted, skip_special_tokens=False) == (
        f"\n<|im_start|>tool\n{tool_result}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert later.params.seed != first.params.seed and later.params.max_tokens == 40

    tokens, masks, logprobs = group.tokens[0], group.masks[0], group.inference_logprobs[0]
    assert tokens == later.prompt_tokens + t2
    assert masks == [PROMPT_MASK] * len(prompt) + t1 + [PROMPT_MASK] * len(inserted) + t2
    assert logprobs == [1.0] * len(prompt) + [-0.1] * len(t1) + [1.0] * len(inserted) + [-0.2] * len(t2)
    assert group.tokens[1] == prompt + turn(tokenizer, "Answer: 5", eos=True).tokens
    assert group.scores == [1.0, 0.25] and group.versions == [3, 3]
    assert env.status()["mean_turns_recent"] == 1.5

    batch = collate(RolloutBatch(groups=[group], source="mock"))  # the masked span sits mid-sequence
    trained = batch.mask[0, : len(tokens) - 1]
    assert trained.tolist() == [m != PROMPT_MASK for m in masks[1:]]


def test_episodes_end_at_max_turns_or_before_passing_max_episode_tokens(tiny):
    tokenizer = tiny[1]
    script = [["Hmm."] * 5, ["Hmm."] * 5]
    for max_turns, max_length, turns in [(3, 4096, [3, 3]), (5, 140, [1, 1])]:
        engine = ScriptedEngine(tokenizer, script)
        env = MockEnvironment(
            engine,
            tokenizer,
            temperature=1.0,
            max_tokens=40,
            seed=3,
            config=MockEnvConfig(task=CALCULATOR, group_size=2, max_turns=max_turns, max_episode_tokens=max_length),
        )
        group = anyio.run(env.group)
        assert [len(turn_ends(m)) + 1 for m in group.masks] == turns
        later = engine.requests[1:]  # the first turn is always played
        assert len(later) == 2 * (turns[0] - 1)
        assert all(len(r.prompt_tokens) + r.params.max_tokens <= max_length for r in later)


# --- on the tiny model ----------------------------------------------------------------------------------------------


def turn_ends(masks: list[int]) -> list[int]:
    """Positions where a sampled turn ends and the environment's text begins."""
    return [i for i in range(1, len(masks)) if masks[i - 1] != PROMPT_MASK and masks[i] == PROMPT_MASK]


def test_on_the_engine_later_turns_prefill_only_the_new_text_and_logprobs_match_the_learner(tiny):
    model, tokenizer = tiny
    cfg = adapter_config(LoraConfig(rank=4, num_layers=-1, dropout=0.0, keys="all"), model)
    attach_lora(model, cfg, seed=0)
    mx.eval(model.parameters())
    engine_model = twin(model)
    engine_model.eval()
    engine = Engine(engine_model, tokenizer, config=EngineConfig(), batch_size=16, adapter=AdapterSlots(engine_model))
    env = MockEnvironment(
        engine,
        tokenizer,
        temperature=1.0,
        max_tokens=8,
        seed=0,
        config=MockEnvConfig(task=CALCULATOR, group_size=2, max_turns=3),
    )

    async def main() -> tuple[RolloutBatch, dict]:
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            with anyio.fail_after(120):
                batch = await env.batch(4)
            tg.cancel_scope.cancel()
        return batch, engine.stats()

    batch, stats = anyio.run(main, backend="asyncio")
    masks = [m for g in batch.groups for m in g.masks]
    assert all(len(turn_ends(m)) == 2 for m in masks)  # a random policy never answers: three turns each
    # Turn 1: the second prompt starts from the first one's shared part; every later turn from the whole
    # sequence so far (the previous turn's cached prompt + completion): only the environment's text is prefilled.
    prompt_lengths = [next(i for i, m in enumerate(g.masks[0]) if m != PROMPT_MASK) for g in batch.groups]
    heads = [g.tokens[0][: n - 1] for g, n in zip(batch.groups, prompt_lengths, strict=True)]
    shared = next((i for i, (a, b) in enumerate(zip(*heads, strict=False)) if a != b), min(map(len, heads)))
    assert stats["prefix_cache_tokens_saved"] == shared + sum(sum(turn_ends(m)) for m in masks)

    collated = collate(batch)
    trainer = Trainer(model, config=RLTrainingConfig(kl_beta=0.0), adapter_config=cfg)
    trainer.model.eval()
    logp, _ = forward_logprobs(
        trainer.model,
        mx.array(collated.input_ids),
        mx.array(collated.targets),
        mx.array(collated.temperature),
        with_entropy=False,
    )
    mask = collated.mask
    assert mask.sum() == sum(m != PROMPT_MASK for row in masks for m in row) and (~mask).any()
    diff = np.abs(np.array(logp)[mask] - collated.inference_logprobs[mask])
    assert diff.max() < 2e-4, f"max |learner - engine| = {diff.max():.2e}"
