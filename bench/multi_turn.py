"""Multi-turn: what a conversation's later turns cost against its first, with paraloop's prefix cache on and off.

Four conversations at once (an environment's episodes), 6 turns each, driven the way Atropos's ManagedServer and
paraloop's mock environment drive them: POST /generate with token ids, each turn's prompt being the previous
turn's prompt + the ids the server returned + the ids of only the new user message
(`paraloop.envs.episodes.continuation_ids`: earlier text is never tokenised again). The first prompt carries
~300 tokens of context; every turn decodes 32 tokens (EOS off, temperature 1.0). A turn's time is the wall time of
its four requests. Without the cache each turn prefills the whole conversation so far; with it, only the new
message. Lines: turn 6 over turn 1 with the cache (target <= 1.3), turn 6 and the whole conversation with the
cache over without (lower is better).
"""

import asyncio
import time

import aiohttp

from bench import servers
from bench.harness import Context, Line

NAME = "turns"
TITLE = "8. Multi-turn conversation (prefix cache on vs off)"
BUDGET_S = 240
USES_SERVERS = True
CONVERSATIONS, TURNS, MAX_TOKENS, CONTEXT_WORDS = 4, 6, 32, 230
FOLLOW_UPS = ("Go on.", "What happens next?", "Make it shorter.", "Now add a twist.", "How does it end?")


async def conversation_turns(
    url: str, tokenizer, opening: list[list[dict]], *, turns: int, max_tokens: int
) -> list[float]:
    """Play `turns` turns of every conversation together; the wall time of each turn."""
    from paraloop.envs.episodes import continuation_ids
    from paraloop.envs.tasks import Sample

    eos = set(tokenizer.eos_token_ids)
    history = [list(m) for m in opening]
    prompts = [list(tokenizer.apply_chat_template(m, add_generation_prompt=True)) for m in opening]
    times = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:

        async def one(i: int) -> dict:
            body = {
                "prompt": {"prompt_token_ids": prompts[i]},
                "n": 1,
                "max_tokens": max_tokens,
                "temperature": 1.0,
                "ignore_eos": True,
            }
            return await servers.post(session, f"{url}/generate", body)

        for turn in range(turns):
            start = time.perf_counter()
            answers = await asyncio.gather(*(one(i) for i in range(len(prompts))))
            times.append(time.perf_counter() - start)
            for i, answer in enumerate(answers):
                done = Sample(
                    prompt=history[i],
                    text=answer["text"][0],
                    finish_reason=answer["finish_reasons"][0],
                    tokens=answer["token_ids"][0],
                )
                reply = [{"role": "user", "content": FOLLOW_UPS[turn % len(FOLLOW_UPS)]}]
                prompts[i] = prompts[i] + done.tokens + continuation_ids(tokenizer, history[i], done, reply, eos=eos)
                history[i] = [*history[i], {"role": "assistant", "content": done.text}, *reply]
    return times


def run(ctx: Context) -> list[Line]:
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(ctx.model_q4)
    running = {kind: servers.server(ctx, kind) for kind in ("paraloop", "paraloop_nocache")}
    context = servers.long_context(CONTEXT_WORDS)
    turns = 3 if ctx.quick else TURNS
    per_turn: dict[str, list[float]] = {}
    for r, kind in enumerate(["paraloop", "paraloop_nocache"] * (1 if ctx.quick else 2)):
        opening = [
            [{"role": "user", "content": f"Conversation {r}.{i}. {context}Tell me a story about {servers.TOPICS[i]}."}]
            for i in range(CONVERSATIONS)
        ]
        times = asyncio.run(
            conversation_turns(running[kind].url, tokenizer, opening, turns=turns, max_tokens=MAX_TOKENS)
        )
        per_turn[kind] = [a + b for a, b in zip(per_turn[kind], times, strict=True)] if kind in per_turn else times
    on, off = per_turn["paraloop"], per_turn["paraloop_nocache"]
    detail = {
        "conversations": CONVERSATIONS,
        "turns": turns,
        "max_tokens": MAX_TOKENS,
        "context_words": CONTEXT_WORDS,
        "seconds_per_turn_cache_on": on,
        "seconds_per_turn_cache_off": off,
    }
    last = f"turn {turns}"
    return [
        Line(NAME, f"{last} over turn 1, prefix cache on", on[-1], on[0], "s", "<= 1.3", detail=detail),
        Line(NAME, f"{last} over turn 1, prefix cache off", off[-1], off[0], "s"),
        Line(NAME, f"{last}, prefix cache on over off", on[-1], off[-1], "s"),
        Line(NAME, f"all {turns} turns, prefix cache on over off", sum(on), sum(off), "s"),
    ]
