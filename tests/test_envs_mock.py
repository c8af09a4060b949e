"""The mock environment builds groups exactly as an Atropos environment would: the chat template applied once, one
n=group_size request per prompt, the engine's own token ids (EOS included) and log-probs, masks and placeholders
over the prompt, the oldest version per row; batches count sequences, generate only when asked, and are
reproducible from the seed."""

import math
import sys
import types
from collections.abc import Awaitable, Callable
from typing import Any

import paraloop  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import anyio
import pytest
from anyio import wait_all_tasks_blocked

from paraloop.config import EngineConfig, MockEnvConfig
from paraloop.engine import Engine
from paraloop.envs.mock import MockEnvironment
from paraloop.envs.tasks import TINY_PROMPTS, Task
from paraloop.messages import Completion, GenerateRequest

CAPITALS = "paraloop.envs.tasks:capitals"
EOS = 2  # the tiny model's <|im_end|>


@pytest.fixture(scope="module")
def tokenizer(tiny) -> Any:
    return tiny[1]


def chat_ids(tokenizer: Any, content: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def which_prompt(tokenizer: Any, prompt_tokens: list[int]) -> str:
    """The tiny task prompt whose chat template gives exactly these ids."""
    matches = [p for p in TINY_PROMPTS if chat_ids(tokenizer, p) == prompt_tokens]
    assert len(matches) == 1, "the prompt is not the chat template of a task prompt"
    return matches[0]


class FakeEngine:
    """Answers each row from `rows(request, row) -> (tokens, finish_reason)`; logprobs and versions are made up
    so that a test can tell them apart. Records every request and the most requests in flight at once."""

    def __init__(self, rows: Callable[[GenerateRequest, int], tuple[list[int], str]], *, version: int = 0) -> None:
        self.rows = rows
        self.version = version
        self.requests: list[GenerateRequest] = []
        self.in_flight = self.most_in_flight = 0

    async def complete(self, request: GenerateRequest) -> list[Completion]:
        self.requests.append(request)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await wait_all_tasks_blocked()  # every group that can start has started
        self.in_flight -= 1
        out = []
        for i in range(request.n):
            tokens, finish = self.rows(request, i)
            out.append(
                Completion(
                    row=i,
                    tokens=tokens,
                    logprobs=[-0.25 * (j + 1) for j in range(len(tokens))],
                    versions=[self.version + (j % 2) for j in range(len(tokens))],
                    text="",
                    finish_reason=finish,
                )
            )
        return out


def env_on(engine: Any, tokenizer: Any, *, task: str = CAPITALS, group_size: int = 4, **kwargs) -> MockEnvironment:
    filters = {k: kwargs.pop(k) for k in ("top_p", "top_k", "min_p") if k in kwargs}
    config = MockEnvConfig(task=task, group_size=group_size, concurrency=kwargs.pop("concurrency", 4), **filters)
    options = {"temperature": 0.7, "max_tokens": 6, "seed": 1, **kwargs}
    return MockEnvironment(engine, tokenizer, config=config, **options)


def run(fn: Callable[[], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        with anyio.fail_after(60):
            return await fn()

    return anyio.run(main)


def test_a_group_is_one_request_on_the_chat_template_and_keeps_the_engines_own_ids(tokenizer):
    t, he, cat = tokenizer.convert_tokens_to_ids(["T", "he", "Ġcat"])
    assert tokenizer.encode("The") != [t, he]  # so decoding and re-tokenising would change the ids
    completions = {
        0: ([t, he, EOS], "stop"),
        1: ([cat, cat, cat], "length"),
        2: ([t], "length"),
        3: ([EOS], "stop"),
    }
    engine = FakeEngine(lambda request, row: completions[row], version=3)
    env = env_on(engine, tokenizer)
    group = run(env.group)

    (request,) = engine.requests
    assert request.n == 4
    assert (request.params.temperature, request.params.max_tokens) == (0.7, 6)
    which_prompt(tokenizer, request.prompt_tokens)
    prompt = request.prompt_tokens
    for row, (tokens, _) in completions.items():
        assert group.tokens[row] == prompt + tokens  # EOS kept when the row stopped on it
        assert group.masks[row] == [-100] * len(prompt) + tokens
        assert group.inference_logprobs[row] == [1.0] * len(prompt) + [-0.25 * (j + 1) for j in range(len(tokens))]
    assert group.versions == [3, 3, 3, 3]  # the oldest version among each row's tokens (3, 4, 3, ...)
    assert group.generation_params == {"temperature": 0.7, "max_tokens": 6}
    assert [o["finish_reason"] for o in group.overrides] == ["stop", "length", "length", "stop"]
    # capitals: fraction of text tokens with a capital letter, the final EOS not being text
    assert group.scores == [0.5, 0.0, 1.0, 0.0]


def test_a_batch_counts_sequences_and_keeps_concurrency_prompts_in_flight(tokenizer):
    engine = FakeEngine(lambda request, row: ([5, 6], "length"))
    env = env_on(engine, tokenizer, group_size=4, concurrency=2)
    batch = run(lambda: env.batch(16))
    assert batch.source == "mock" and batch.dropped_stale == 0
    assert [len(g.tokens) for g in batch.groups] == [4, 4, 4, 4]
    assert engine.most_in_flight == 2
    assert sorted(r.request_id for r in engine.requests) == [f"mock-1-{i}" for i in range(4)]
    # groups come in index order whatever order their requests finished in
    assert [g.tokens[0][:-2] for g in batch.groups] == [
        next(r.prompt_tokens for r in engine.requests if r.request_id == f"mock-1-{i}") for i in range(4)
    ]
    status = env.status()
    assert (status["source"], status["task"], status["groups"], status["sequences"]) == (
        "mock",
        "capitals",
        4,
        16,
    )
    assert status["mean_reward_recent"] == 0.0  # "#" and "$" have no capital letter


def test_batch_size_must_be_a_multiple_of_the_group_size(tokenizer):
    env = env_on(FakeEngine(lambda request, row: ([5], "length")), tokenizer, group_size=4)
    with pytest.raises(ValueError, match=r"rl_training.batch_size \(6\).*rl_training.mock.group_size \(4\)"):
        run(lambda: env.batch(6))

    async def first_of_batches() -> None:
        await anext(env.batches(6))

    with pytest.raises(ValueError, match="batch_size"):
        run(first_of_batches)


def test_batches_generate_nothing_until_the_gate_opens(tokenizer):
    engine = FakeEngine(lambda request, row: ([5], "length"))
    env = env_on(engine, tokenizer, group_size=4)
    gate = anyio.Event()

    async def body() -> None:
        batches = env.batches(8, gate=gate)
        got = []

        async def consume() -> None:
            got.append(await anext(batches))

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await wait_all_tasks_blocked()
            assert engine.requests == [] and got == []
            gate.set()
        assert len(engine.requests) == 2 and len(got[0].groups) == 2
        await batches.aclose()

    run(body)


def test_batch_generates_only_when_awaited(tokenizer):
    engine = FakeEngine(lambda request, row: ([5], "length"))
    env = env_on(engine, tokenizer, group_size=4)

    async def body() -> None:
        batches = env.batches(8)
        await anext(batches)
        await wait_all_tasks_blocked()
        assert len(engine.requests) == 2  # nothing generated ahead while the learner would be training
        await anext(batches)
        assert len(engine.requests) == 4
        await batches.aclose()

    run(body)


def requests_of(env: MockEnvironment, groups: int) -> list[GenerateRequest]:
    for _ in range(groups):
        run(env.group)
    return env.engine.requests


def test_prompts_and_sampling_seeds_follow_the_seed_and_survive_a_resume(tokenizer):
    def make(seed: int) -> MockEnvironment:
        return env_on(FakeEngine(lambda request, row: ([5], "length")), tokenizer, seed=seed)

    def key(r: GenerateRequest) -> tuple:
        return (r.prompt_tokens, r.params.seed)

    four = [key(r) for r in requests_of(make(1), 4)]
    assert four == [key(r) for r in requests_of(make(1), 4)]
    assert four != [key(r) for r in requests_of(make(2), 4)]
    assert len({k[1] for k in four}) == 4  # every group samples with its own seed
    first = make(1)
    requests_of(first, 3)
    resumed = make(1)
    resumed.load_state(first.state())
    assert [key(r) for r in requests_of(resumed, 1)] == four[3:]
    with pytest.raises(ValueError, match="next_group"):
        resumed.load_state({"next_group": -1})


def test_an_aborted_row_fails_the_group(tokenizer):
    engine = FakeEngine(lambda request, row: ([], "abort") if row == 1 else ([5], "length"))
    with pytest.raises(RuntimeError, match="aborted rollout request mock-1-0"):
        run(env_on(engine, tokenizer).group)


def test_a_failing_or_non_finite_reward_names_the_task(tokenizer, monkeypatch):
    module = types.ModuleType("bad_rewards")
    prompt = lambda rng: [{"role": "user", "content": "Say something."}]  # noqa: E731
    module.raises = lambda: Task(name="raises", prompt=prompt, reward=lambda s: 1 / 0)
    module.nan = lambda: Task(name="nan", prompt=prompt, reward=lambda s: math.nan)
    monkeypatch.setitem(sys.modules, "bad_rewards", module)
    engine = FakeEngine(lambda request, row: ([5], "length"))
    with pytest.raises(RuntimeError, match="task 'bad_rewards:raises': the reward function raised ZeroDivisionError"):
        run(env_on(engine, tokenizer, task="bad_rewards:raises").group)
    with pytest.raises(ValueError, match="task 'bad_rewards:nan': the reward function returned nan"):
        run(env_on(engine, tokenizer, task="bad_rewards:nan").group)


def test_bad_arguments_are_rejected_up_front(tokenizer):
    engine = FakeEngine(lambda request, row: ([5], "length"))
    with pytest.raises(ValueError, match="temperature"):
        env_on(engine, tokenizer, temperature=0.0)
    with pytest.raises(ValueError, match="rl_training.mock.task: task 'nope'"):
        env_on(engine, tokenizer, task="nope")


# --- on the real engine ---------------------------------------------------------------------------------------------


def with_engine(tiny, body: Callable[[Engine], Awaitable[Any]], *, eos_ids: set[int] | None = None) -> Any:
    model, tokenizer = tiny
    saved = tokenizer.eos_token_ids
    if eos_ids is not None:
        tokenizer.eos_token_ids = eos_ids
    engine = Engine(model, tokenizer, config=EngineConfig(max_n=8), batch_size=32)

    async def main() -> Any:
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            with anyio.fail_after(120):
                result = await body(engine)
            tg.cancel_scope.cancel()
        return result

    try:
        return anyio.run(main)
    finally:
        tokenizer.eos_token_ids = saved


def test_real_engine_rows_are_prompt_plus_sampled_ids_ending_in_eos_when_stopped(tiny):
    tokenizer = tiny[1]
    stops = {EOS, *range(3, 250)}  # many "EOS" ids, so most rows stop early and some run to max_tokens

    async def body(engine: Engine) -> Any:
        return await env_on(engine, tokenizer, group_size=8, max_tokens=6).batch(16)

    batch = with_engine(tiny, body, eos_ids=stops)
    stopped = ran_out = 0
    for group in batch.groups:
        prompt_len = group.masks[0].count(-100)
        which_prompt(tokenizer, group.tokens[0][:prompt_len])
        assert group.versions == [0] * 8
        for tokens, masks, logprobs in zip(group.tokens, group.masks, group.inference_logprobs, strict=True):
            completion = tokens[prompt_len:]
            assert masks == [-100] * prompt_len + completion
            assert logprobs[:prompt_len] == [1.0] * prompt_len
            assert all(lp <= 0 and math.isfinite(lp) for lp in logprobs[prompt_len:])
            assert not any(t in stops for t in completion[:-1])  # generation ends at the first stop id
            if completion[-1] in stops:
                stopped += 1
            else:
                assert len(completion) == 6
                ran_out += 1
    assert stopped > 0 and ran_out > 0


def test_filtered_rollouts_carry_each_tokens_kept_set_size(tiny):
    """mock.top_k / top_p reach the engine; every sampled token records its kept-set size (0 at the prompt), and
    unfiltered groups carry none."""

    async def body(engine: Engine) -> tuple[Any, Any]:
        return (await env_on(engine, tiny[1], top_k=5, top_p=0.9).group(), await env_on(engine, tiny[1]).group())

    filtered, plain = with_engine(tiny, body)
    assert plain.sampling_kept is None and filtered.sampling_kept is not None
    for kept, masks in zip(filtered.sampling_kept, filtered.masks, strict=True):
        assert len(kept) == len(masks)
        assert all((k == 0) if m == -100 else (1 <= k <= 5) for k, m in zip(kept, masks, strict=True))


def test_real_engine_groups_are_reproducible_from_the_seed(tiny):
    async def body(engine: Engine) -> tuple[Any, Any]:
        first = await env_on(engine, tiny[1], seed=5).group()
        again = await env_on(engine, tiny[1], seed=5).group()
        return first, again

    first, again = with_engine(tiny, body)
    assert first.tokens == again.tokens and first.scores == again.scores


@pytest.mark.parametrize("temperature", [1.0, 0.25])
def test_a_random_policy_scores_about_a_tenth_on_capitals(tiny, temperature):
    async def body(engine: Engine) -> Any:
        env = env_on(engine, tiny[1], group_size=8, max_tokens=16, temperature=temperature, seed=0)
        return await env.batch(64)

    batch = with_engine(tiny, body)
    scores = [s for g in batch.groups for s in g.scores]
    assert 0.05 <= sum(scores) / len(scores) <= 0.3
    assert sum(len(set(g.scores)) > 1 for g in batch.groups) >= 6  # most groups carry GRPO signal
