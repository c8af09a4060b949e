"""Multi-turn episodes of the mock environment, driven through the engine by token ids.

In: a group's first turn (its chat messages, prompt ids and the n completions sampled for it), a task with
`respond`, and `complete(requests) -> one Completion per request`. Out: per row an Episode holding one sequence:
the prompt, then each sampled turn followed by the environment's reply as the chat template renders it, up to the
next turn's generation prompt. Only sampled tokens are trained: masks hold PROMPT_MASK and inference logprobs the
placeholder PROMPT_LOGPROB at the prompt and at every token the environment inserted.

No turn tokenises earlier text again (BPE is not a bijection: re-tokenising what the model sampled can give other
ids than it sampled). A turn's prompt is the previous turn's prompt + its sampled ids + the ids of only the text
the environment adds (`continuation_ids`), so it starts with exactly the tokens the engine just decoded and the
engine's prefix cache holds their KV: each turn prefills only the environment's reply.
"""

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from paraloop.envs.tasks import Messages, Sample, Task
from paraloop.messages import PROMPT_MASK, Completion, GenerateRequest

PROMPT_LOGPROB = 1.0  # Atropos: inference_logprobs placeholder at positions that are not trained


class TemplateError(ValueError):
    """The chat template does not render a conversation as a prefix of its continuation (it rewrites earlier
    turns, or trims a message's content), so a turn cannot be appended by token ids."""


@dataclass
class Episode:
    """One row of a multi-turn group: the conversation so far and its token sequence."""

    messages: Messages  # the latest turn's prompt: every message before it
    sample: Sample  # the latest turn
    tokens: list[int]
    masks: list[int]
    logprobs: list[float]
    versions: list[int]  # adapter version of every sampled token
    kept: list[int]  # per position: the kept-set size a sampled token was drawn from (0: full vocabulary, prompt)
    done: bool = False

    @classmethod
    def first(cls, messages: Messages, prompt: Sequence[int], completion: Completion, sample: Sample) -> "Episode":
        return cls(
            messages=list(messages),
            sample=sample,
            tokens=[*prompt, *completion.tokens],
            masks=[PROMPT_MASK] * len(prompt) + list(completion.tokens),
            logprobs=[PROMPT_LOGPROB] * len(prompt) + list(completion.logprobs),
            versions=list(completion.versions),
            kept=[0] * len(prompt) + _kept(completion),
        )

    def add(self, messages: Messages, inserted: list[int], completion: Completion, sample: Sample) -> None:
        """The environment's `inserted` ids (not trained), then the model's next turn."""
        self.messages, self.sample = messages, sample
        self.tokens += inserted + completion.tokens
        self.masks += [PROMPT_MASK] * len(inserted) + completion.tokens
        self.logprobs += [PROMPT_LOGPROB] * len(inserted) + completion.logprobs
        self.versions += completion.versions
        self.kept += [0] * len(inserted) + _kept(completion)


def _kept(completion: Completion) -> list[int]:
    return list(completion.kept) or [0] * len(completion.tokens)


def render(tokenizer: Any, messages: Messages, *, generation_prompt: bool, **template_kwargs: Any) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt, **template_kwargs
    )


def continuation_ids(
    tokenizer: Any, messages: Messages, turn: Sample, reply: Messages, *, eos: set[int], **template_kwargs: Any
) -> list[int]:
    """The ids the environment appends after a sampled `turn` (whose prompt was `messages`): what the chat template
    puts after the assistant's content (its end-of-turn marker, unless the model sampled it as its EOS token), the
    `reply` messages, and the next generation prompt. Only this new text is tokenised. `template_kwargs` are the
    template's own variables, as for the first prompt (rl_training.mock.chat_template_kwargs)."""
    tokens = list(turn.tokens)
    sampled_eos = turn.finish_reason == "stop" and bool(tokens) and tokens[-1] in eos
    content = tokenizer.decode(tokens[:-1] if sampled_eos else tokens, skip_special_tokens=False)
    assistant = {"role": "assistant", "content": content}
    before = render(tokenizer, messages, generation_prompt=True, **template_kwargs)
    closed = render(tokenizer, [*messages, assistant], generation_prompt=False, **template_kwargs)
    after = render(tokenizer, [*messages, assistant, *reply], generation_prompt=True, **template_kwargs)
    if not closed.startswith(before + content) or not after.startswith(closed):
        raise TemplateError(
            "the chat template does not render a conversation as the prefix of its continuation (does it rewrite "
            "earlier turns or trim message content?): multi-turn episodes cannot be extended by token ids"
        )
    close = closed[len(before) + len(content) :]
    if sampled_eos:
        eos_text = tokenizer.decode([tokens[-1]], skip_special_tokens=False)
        if close.startswith(eos_text):
            close = close[len(eos_text) :]  # the model sampled the end-of-turn marker itself
    return list(tokenizer.encode(close + after[len(closed) :], add_special_tokens=False))


async def play(
    episodes: list[Episode],
    *,
    task: Task,
    tokenizer: Any,
    eos: set[int],
    complete: Callable[[list[GenerateRequest]], Awaitable[list[Completion]]],
    request_for: Callable[[Episode, list[int], int], GenerateRequest],
    sample_of: Callable[[Messages, Completion, int], Sample],
    max_turns: int,
    max_length: int,
    template_kwargs: dict[str, Any] | None = None,
) -> None:
    """Play turns 2..max_turns of every episode; all episodes' next turns go to `complete` together.

    An episode ends when the task's `respond` returns None (or no messages), after `max_turns` turns, or when its
    next turn could grow it past `max_length` tokens (prompt + inserted + the request's max_tokens)."""
    assert task.respond is not None
    for turn in range(2, max_turns + 1):
        pending: list[tuple[Episode, Messages, list[int]]] = []
        for episode in episodes:
            if episode.done:
                continue
            try:
                reply = task.respond(episode.sample)
            except Exception as e:
                raise RuntimeError(f"task {task.name!r}: respond raised {e!r}") from e
            if not reply:
                episode.done = True
                continue
            messages = [*episode.messages, {"role": "assistant", "content": episode.sample.text}, *reply]
            inserted = continuation_ids(
                tokenizer, episode.messages, episode.sample, reply, eos=eos, **(template_kwargs or {})
            )
            pending.append((episode, messages, inserted))
        requests = [request_for(e, e.tokens + inserted, turn) for e, _, inserted in pending]
        keep = [len(r.prompt_tokens) + r.params.max_tokens <= max_length for r in requests]
        for (episode, _, _), fits in zip(pending, keep, strict=True):
            episode.done = episode.done or not fits
        pending = [p for p, fits in zip(pending, keep, strict=True) if fits]
        if not pending:
            return
        completions = await complete([r for r, fits in zip(requests, keep, strict=True) if fits])
        for (episode, messages, inserted), completion in zip(pending, completions, strict=True):
            if completion.finish_reason == "abort":
                raise RuntimeError(f"the engine aborted turn {turn} of an episode (is it stopping?)")
            episode.add(messages, inserted, completion, sample_of(messages, completion, turn))
