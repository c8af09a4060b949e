"""The built-in mock environment: a reward task driven through the engine, producing Atropos-style groups.

In: an Engine (anything with `async complete(GenerateRequest) -> list[Completion]`), its tokenizer and a task
(`rl_training.mock.task`). Out: ScoredGroups exactly as an Atropos environment would send them, so the learner
cannot tell the two apart: for each prompt the chat template is applied once (those ids are the prompt), ONE
request with n = group_size samples the group, and each sequence is prompt ids + the engine's recorded completion
ids (the EOS token included when it stopped there) with masks -100 over the prompt, inference_logprobs 1.0 over the
prompt and the engine's log-probs over the completion. Completions are never decoded and re-tokenised (the
predecessor did, which trained on tokens the policy never sampled).

Multi-turn tasks (a Task with `respond`, e.g. `calculator`): the first turn is the same n=group_size request;
each row then plays its own later turns (episodes.py), every row's next turn of the whole batch admitted together,
and a sequence is the whole episode by token ids (prompt, turns, the environment's replies), trained only on the
sampled tokens.

Pacing belongs to the caller: `batch()` generates one learner batch when awaited and nothing in between, so a
sync-mode runtime (generate, train, swap, generate) stays strictly on-policy; `batches()` repeats it forever,
optionally waiting on a gate before each batch. Deterministic given the seed: group i's prompt and sampling seed
derive from (seed, i), and `state()` / `load_state()` carry i across a resume. One rank of a distributed run
(`share=(rank, size)`) generates only its contiguous part of each batch's groups; the ranks' parts in rank order
are the batch one process would generate.
"""

import math
import random
import statistics
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

import anyio
import msgspec

from paraloop.config import MockEnvConfig
from paraloop.distributed import chunk
from paraloop.envs.episodes import PROMPT_LOGPROB, Episode, play
from paraloop.envs.tasks import Messages, Sample, Task, load_task
from paraloop.messages import (
    PROMPT_MASK,
    Completion,
    GenerateRequest,
    RolloutBatch,
    SamplingParams,
    ScoredGroup,
)

__all__ = ["PROMPT_LOGPROB", "MockEnvironment", "make_sample", "prompt_ids", "scored_group"]


class Gate(Protocol):
    async def wait(self) -> Any: ...


def prompt_ids(tokenizer: Any, messages: Messages, **template_kwargs: Any) -> list[int]:
    """The chat template with the generation prompt, as token ids (what the engine prefills). `template_kwargs` are
    the template's own variables (rl_training.mock.chat_template_kwargs, e.g. enable_thinking=False for Qwen3)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **template_kwargs)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # a BatchEncoding from some tokenizers
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def eos_ids(tokenizer: Any) -> set[int]:
    ids = getattr(tokenizer, "eos_token_ids", None)  # mlx-lm's TokenizerWrapper: a set
    if ids is None or isinstance(ids, int):  # a transformers tokenizer (recent ones: eos_token_ids is one int)
        ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    return set(ids)


def make_sample(messages: Messages, completion: Completion, *, tokenizer: Any, eos: set[int], turn: int = 1) -> Sample:
    """A completion as the reward sees it; `pieces` leave out a final EOS token, as the text does."""
    text_tokens = completion.tokens
    if completion.finish_reason == "stop" and text_tokens and text_tokens[-1] in eos:
        text_tokens = text_tokens[:-1]
    return Sample(
        prompt=messages,
        text=completion.text,
        finish_reason=completion.finish_reason,
        tokens=list(completion.tokens),
        pieces=[tokenizer.decode([t]) for t in text_tokens],
        turn=turn,
    )


def scored_group(
    prompt: Sequence[int],
    completions: Sequence[Completion],
    scores: Sequence[float],
    *,
    temperature: float,
    serving_version: int = 0,
    max_tokens: int | None = None,
) -> ScoredGroup:
    """One Atropos ScoredDataGroup from a prompt's ids and its sampled completions (the engine's own ids).

    A row's version is the oldest among its tokens (`serving_version` for a row without tokens); its
    `overrides[i]["finish_reason"]` says why it ended, so the learner knows truncated rows for sure."""
    prompt = list(prompt)
    return ScoredGroup(
        tokens=[prompt + c.tokens for c in completions],
        masks=[[PROMPT_MASK] * len(prompt) + c.tokens for c in completions],
        scores=[float(s) for s in scores],
        inference_logprobs=[[PROMPT_LOGPROB] * len(prompt) + c.logprobs for c in completions],
        sampling_kept=(
            [[0] * len(prompt) + (list(c.kept) or [0] * len(c.tokens)) for c in completions]
            if any(any(c.kept) for c in completions)
            else None
        ),
        generation_params={"temperature": temperature} | ({"max_tokens": max_tokens} if max_tokens else {}),
        overrides=[{"finish_reason": c.finish_reason} for c in completions],
        versions=[min(c.versions, default=serving_version) for c in completions],
    )


class MockEnvironment:
    """Groups and learner batches from a reward task; see the module docstring."""

    def __init__(
        self,
        engine: Any,
        tokenizer: Any,
        *,
        config: MockEnvConfig,
        temperature: float,
        max_tokens: int,
        seed: int = 0,
        share: tuple[int, int] = (0, 1),
    ) -> None:
        if not temperature > 0:
            raise ValueError(f"rl_training.temperature must be > 0 for rollouts, got {temperature}")
        if max_tokens < 1:
            raise ValueError(f"rl_training.mock.max_tokens must be >= 1, got {max_tokens}")
        self.engine = engine
        self.tokenizer = tokenizer
        self.config = config
        try:
            self.task: Task = load_task(config.task)
        except ValueError as e:
            raise ValueError(f"rl_training.mock.task: {e}") from e
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.seed = seed
        self.share = share  # (rank, size): this rank generates its chunk of each batch's groups
        self._eos = eos_ids(tokenizer)
        # Index of the next group: its prompt and sampling seed derive from (seed, index).
        self._next_group = 0
        self._sequences = 0
        self._recent_rewards: deque[float] = deque(maxlen=256)
        self._recent_turns: deque[int] = deque(maxlen=256)

    # --- one group ------------------------------------------------------------------------------------------------

    async def group(self, index: int | None = None) -> ScoredGroup:
        """Sample and score one group of `group_size` completions of one prompt (the next one unless `index`)."""
        if index is None:
            index = self._next_group
            self._next_group += 1
        return (await self._rollout([self._request(index)]))[0]

    def _request(self, index: int) -> tuple[Messages, GenerateRequest]:
        rng = random.Random(f"{self.seed}/{index}")  # str seeds hash deterministically (not PYTHONHASHSEED)
        messages = self.task.prompt(rng)
        request = GenerateRequest(
            request_id=f"mock-{self.seed}-{index}",
            prompt_tokens=prompt_ids(self.tokenizer, messages, **self.config.chat_template_kwargs),
            n=self.config.group_size,
            params=SamplingParams(
                temperature=self.temperature,
                max_tokens=self.max_tokens,
                seed=rng.getrandbits(63),
                ignore_eos=self.config.ignore_eos,
                top_p=self.config.top_p,
                top_k=self.config.top_k,
                min_p=self.config.min_p,
            ),
        )
        return messages, request

    async def _rollout(self, built: list[tuple[Messages, GenerateRequest]]) -> list[ScoredGroup]:
        """Sample and score the groups of `built` (one request per group, in this order)."""
        results = await self._complete([request for _, request in built])
        for (_, request), completions in zip(built, results, strict=True):
            if any(c.finish_reason == "abort" for c in completions):
                raise RuntimeError(f"the engine aborted rollout request {request.request_id} (is it stopping?)")
        if self.task.respond is None:
            return [self._scored(m, r, c) for (m, r), c in zip(built, results, strict=True)]
        return await self._episodes(built, results)

    async def _complete(self, requests: list[GenerateRequest]) -> list[list[Completion]]:
        """Every request's rows. With an engine that has `complete_many`, all requests are admitted in the same
        decode step (a fixed arrangement: a seeded run repeats exactly); otherwise `concurrency` are in flight."""
        if hasattr(self.engine, "complete_many"):
            return await self.engine.complete_many(requests)
        out: list[list[Completion]] = [[] for _ in requests]
        limiter = anyio.CapacityLimiter(self.config.concurrency)

        async def fill(slot: int) -> None:
            async with limiter:
                out[slot] = await self.engine.complete(requests[slot])

        async with anyio.create_task_group() as tg:
            for slot in range(len(requests)):
                tg.start_soon(fill, slot)
        return out

    def _scored(self, messages: Messages, request: GenerateRequest, completions: list[Completion]) -> ScoredGroup:
        scores = [self._score(self._sample(messages, c, 1)) for c in completions]
        self._sequences += len(completions)
        self._recent_rewards.extend(scores)
        return scored_group(
            request.prompt_tokens,
            completions,
            scores,
            temperature=self.temperature,
            serving_version=self._serving_version(),
            max_tokens=self.max_tokens,
        )

    async def _episodes(
        self, built: list[tuple[Messages, GenerateRequest]], results: list[list[Completion]]
    ) -> list[ScoredGroup]:
        """Play every row's later turns (episodes.py); one group of whole episodes per request."""
        groups = [
            [Episode.first(m, r.prompt_tokens, c, self._sample(m, c, 1)) for c in completions]
            for (m, r), completions in zip(built, results, strict=True)
        ]
        origin = {id(e): (r, row) for (_, r), group in zip(built, groups, strict=True) for row, e in enumerate(group)}

        def request_for(episode: Episode, prompt: list[int], turn: int) -> GenerateRequest:
            first, row = origin[id(episode)]
            seed = random.Random(f"{first.params.seed}/{row}/{turn}").getrandbits(63)
            return GenerateRequest(
                request_id=f"{first.request_id}-{row}-turn{turn}",
                prompt_tokens=prompt,
                params=msgspec.structs.replace(first.params, seed=seed),
            )

        async def complete(requests: list[GenerateRequest]) -> list[Completion]:
            return [rows[0] for rows in await self._complete(requests)]

        await play(
            [e for group in groups for e in group],
            task=self.task,
            tokenizer=self.tokenizer,
            eos=self._eos,
            complete=complete,
            request_for=request_for,
            sample_of=self._sample,
            max_turns=self.config.max_turns,
            max_length=self.config.max_episode_tokens,
            template_kwargs=self.config.chat_template_kwargs,
        )
        out = []
        for episodes in groups:
            scores = [self._score(e.sample) for e in episodes]
            self._sequences += len(episodes)
            self._recent_rewards.extend(scores)
            self._recent_turns.extend(e.sample.turn for e in episodes)
            out.append(
                ScoredGroup(
                    tokens=[e.tokens for e in episodes],
                    masks=[e.masks for e in episodes],
                    scores=scores,
                    inference_logprobs=[e.logprobs for e in episodes],
                    sampling_kept=[e.kept for e in episodes] if any(any(e.kept) for e in episodes) else None,
                    generation_params={"temperature": self.temperature, "max_tokens": self.max_tokens},
                    overrides=[{"finish_reason": e.sample.finish_reason} for e in episodes],  # the last turn's
                    versions=[min(e.versions, default=self._serving_version()) for e in episodes],
                )
            )
        return out

    def _serving_version(self) -> int:
        return int(getattr(self.engine, "version", 0))

    def _sample(self, messages: Messages, completion: Completion, turn: int) -> Sample:
        return make_sample(messages, completion, tokenizer=self.tokenizer, eos=self._eos, turn=turn)

    def _score(self, sample: Sample) -> float:
        try:
            score = float(self.task.reward(sample))
        except Exception as e:
            raise RuntimeError(f"task {self.config.task!r}: the reward function raised {e!r}") from e
        if not math.isfinite(score):
            raise ValueError(f"task {self.config.task!r}: the reward function returned {score} for {sample.text!r}")
        return score

    # --- learner batches ------------------------------------------------------------------------------------------

    def groups_per_batch(self, batch_size: int) -> int:
        group_size = self.config.group_size
        if batch_size < 1 or batch_size % group_size:
            # Atropos never splits a group and sends exactly batch_size sequences; a remainder could never be filled.
            raise ValueError(
                f"rl_training.batch_size ({batch_size}) must be a positive multiple of "
                f"rl_training.mock.group_size ({group_size}): batches count sequences and groups are never split"
            )
        return batch_size // group_size

    async def batch(self, batch_size: int) -> RolloutBatch:
        """Generate one learner batch of `batch_size` sequences.

        With an engine that has `complete_many`, every group's request is admitted in the same decode step, so the
        batch's rows share their decode steps in a fixed arrangement and a seeded run repeats exactly (a resumed
        run included); otherwise `concurrency` groups are in flight at once.
        """
        count = self.groups_per_batch(batch_size)
        first = self._next_group  # indices fixed up front: prompts and seeds do not depend on scheduling
        self._next_group += count
        groups = await self._rollout([self._request(first + slot) for slot in chunk(count, *self.share)])
        return RolloutBatch(
            groups=groups,
            source="mock",
            source_state={**self.state(), "next_group": first + count},  # not later prefetches: exact resume
        )

    async def batches(self, batch_size: int, *, gate: Gate | None = None) -> AsyncIterator[RolloutBatch]:
        """Learner batches forever. With a gate, each batch waits on `await gate.wait()` before generating."""
        self.groups_per_batch(batch_size)  # fail at the first anext, before any generation
        while True:
            if gate is not None:
                await gate.wait()
            yield await self.batch(batch_size)

    # --- status and resume ----------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        rewards = list(self._recent_rewards)
        return {
            "source": "mock",
            "task": self.task.name,
            "groups": self._next_group,
            "sequences": self._sequences,
            "mean_reward_recent": statistics.fmean(rewards) if rewards else None,
            **({"mean_turns_recent": statistics.fmean(self._recent_turns)} if self._recent_turns else {}),
        }

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps so a resumed run continues with the next prompts, not the first ones again."""
        return {"next_group": self._next_group, "seed": self.seed, "task": self.config.task}

    def load_state(self, state: dict[str, Any]) -> None:
        next_group = state.get("next_group")
        if not isinstance(next_group, int) or next_group < 0:
            raise ValueError(f"mock environment state: next_group must be a non-negative int, got {next_group!r}")
        self._next_group = next_group
