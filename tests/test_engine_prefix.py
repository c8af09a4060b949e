"""The engine's prefix cache on the tiny model: versions never mix across adapter swaps, outputs do not depend on
what was cached, requests for one prompt prefill it once, a conversation's next turn reuses the previous one, and
requests waiting for another's prefill survive its cancellation, a drain swap and a stop."""

import threading
from typing import Any

import paraloop  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import anyio
import mlx.core as mx
import mlx.nn as nn
from support.compute_paths import PREFIX_TOL, assert_within, max_gap
from support import until
from support.engines import ForwardLog, changed_adapter, reference_logprobs, request, serve

from paraloop.config import EngineConfig, LoraConfig
from paraloop.engine import Engine
from paraloop.lora import AdapterSlots, adapter_config, attach_lora
from paraloop.messages import Completion
from paraloop.model import load_model
from paraloop.server.metrics import Metrics, engine_families

GREEDY = dict(temperature=0, max_tokens=10, ignore_eos=True)


class Gate(ForwardLog):
    """The served model, recording every forward's shape; once armed, the next prompt forward of `block_at` tokens
    or more waits until the test releases it (at most 60 s), so a test can act while a prefill is under way."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__(inner)
        self.block_at = 2
        self._next: tuple[threading.Event, threading.Event] | None = None

    def arm(self) -> tuple[threading.Event, threading.Event]:
        """(reached, release) of the next blocking forward."""
        self._next = (threading.Event(), threading.Event())
        return self._next

    def __call__(self, inputs: mx.array, cache: Any = None) -> mx.array:
        self.shapes.append(tuple(inputs.shape))
        block = self._next
        if block is not None and inputs.shape[1] >= self.block_at:
            self._next = None
            block[0].set()
            block[1].wait(timeout=60)
        return self.inner(inputs, cache=cache)


def make(path, *, cache_mb: int = 64, step: int = 2048) -> tuple[Engine, nn.Module, Gate]:
    model, tokenizer, _, _ = load_model(path)
    attach_lora(model, adapter_config(LoraConfig(rank=4, keys="all", num_layers=-1), model), seed=0)
    gate = Gate(model)
    config = EngineConfig(max_n=8, max_tokens_limit=512, prefix_cache_mb=cache_mb, prefill_step_size=step)
    return Engine(gate, tokenizer, config=config, adapter=AdapterSlots(model)), model, gate


def conversation(tokenizer) -> tuple[list[int], list[list[int]]]:
    system = tokenizer.encode("You are a careful assistant. Every answer is about rivers, markets and weather.")
    questions = [
        "Where is Paris?",
        "What did the children count at the market?",
        "Rain?",
        "Tell me about the river that runs through the old town.",
    ]
    return system, [system + tokenizer.encode(" " + q) for q in questions]


def prompt_forwards(gate: Gate) -> list[tuple[int, ...]]:
    return [s for s in gate.shapes if s[1] > 1]


async def complete_all(engine: Engine, specs: list) -> list[Completion]:
    out: list[Completion] = [None] * len(specs)  # type: ignore[list-item]

    async def one(i: int) -> None:
        out[i] = (await engine.complete(specs[i]))[0]

    async with anyio.create_task_group() as tg:
        for i in range(len(specs)):
            tg.start_soon(one, i)
    return out


def test_an_entry_made_under_one_adapter_version_never_serves_the_next(tiny_model_path):
    """The same prompt before and after a swap: exactly the tokens and logprobs of an uncached engine."""

    def run(cache_mb: int, repeats: int) -> tuple[list[Completion], dict]:
        engine, model, _ = make(tiny_model_path, cache_mb=cache_mb)
        new = changed_adapter(model, seed=7)
        prompt = conversation(engine.tokenizer)[1][0]
        spec = request(prompt, top_logprobs=3, **GREEDY)

        async def body(engine: Engine) -> tuple[list[Completion], dict]:
            out = [(await engine.complete(spec))[0] for _ in range(repeats)]
            await engine.swap_adapter(new, version=1)
            out += [(await engine.complete(spec))[0] for _ in range(repeats)]
            return out, engine.stats()

        return serve(engine, body)

    cached, stats = run(64, repeats=2)
    uncached, off = run(0, repeats=1)
    assert off["prefix_cache_max_bytes"] == 0 and off["prefix_cache_tokens_saved"] == 0
    before, after = uncached
    for got, want in zip(cached, [before, before, after, after], strict=True):
        # Bitwise by construction: a hit's KV entries are the arrays an identical earlier prefill of this very
        # prompt produced, and the last prompt token is the first decode step's input either way (same shapes, order).
        assert got.tokens == want.tokens and got.logprobs == want.logprobs
        assert got.top_logprobs == want.top_logprobs
    assert before.logprobs != after.logprobs  # the swap does change them
    prompt_len = len(conversation(make(tiny_model_path)[0].tokenizer)[1][0]) - 1
    # The second request of each version hit; the first after the swap did not.
    assert stats["prefix_cache_lookups"] == 4 and stats["prefix_cache_hits"] == 2
    assert stats["prefix_cache_tokens_saved"] == 2 * prompt_len


def test_greedy_output_is_the_same_alone_batched_and_from_a_cached_prefix(tiny_model_path):
    engine, model, _ = make(tiny_model_path, cache_mb=0)
    system, prompts = conversation(engine.tokenizer)

    async def alone(engine: Engine) -> list[Completion]:
        return [(await engine.complete(request(p, **GREEDY)))[0] for p in prompts]

    reference = serve(engine, alone)
    engine, _, gate = make(tiny_model_path)

    async def body(engine: Engine) -> tuple[list[Completion], list[Completion], list[Completion], dict]:
        await engine.complete(request(system + [5, 6, 7], **GREEDY))  # caches the system part
        partial = await alone(engine)  # each from the cached system part, then its own cached prompt
        together = await complete_all(engine, [request(p, **GREEDY) for p in prompts])  # batched, full hits
        fresh = [p + [9, 10, 11] for p in prompts]  # batched, each prefilling two tokens after its cached prompt
        batched = await complete_all(engine, [request(p, **GREEDY) for p in fresh])
        return partial, together, batched, engine.stats()

    partial, together, batched, stats = serve(engine, body)
    for got, want in [*zip(partial, reference, strict=True), *zip(together, reference, strict=True)]:
        assert got.tokens == want.tokens
        assert_within("cached prefix vs fresh prefill", max_gap(got.logprobs, want.logprobs), PREFIX_TOL)
    for p, got in zip(prompts, batched, strict=True):  # against one full forward pass of the model
        ref = reference_logprobs(model, p + [9, 10, 11], got.tokens, 1.0)
        assert_within("engine vs one full forward", max_gap(got.logprobs, ref), 1e-4)
    assert stats["prefix_cache_lookups"] == 13 and stats["prefix_cache_hits"] == 12
    # The system part, then the whole prompt but its last token, then the prompt (a finished row's first part).
    saved = sum(len(system) + (len(p) - 1) + len(p) for p in prompts)
    assert stats["prefix_cache_tokens_saved"] == saved
    assert [s for s in prompt_forwards(gate) if s[1] == 2] == [(len(prompts), 2)]  # the fresh ones, batched


def test_requests_for_one_prompt_prefill_it_once_and_report_it(tiny_model_path):
    engine, model, gate = make(tiny_model_path)
    prompt = conversation(engine.tokenizer)[1][3]
    specs = [request(prompt, temperature=1.0, max_tokens=6, ignore_eos=True, seed=i) for i in range(6)]
    specs.append(request(prompt, n=3, temperature=1.0, max_tokens=6, ignore_eos=True, seed=9))

    async def body(engine: Engine) -> tuple[list[list[Completion]], dict]:
        out = await engine.complete_many(specs)  # admitted together: one leader, six waiting for its prompt
        return out, engine.stats()

    results, stats = serve(engine, body)
    assert prompt_forwards(gate) == [(1, len(prompt) - 1)]
    assert stats["prefix_cache_lookups"] == 7 and stats["prefix_cache_hits"] == 6
    assert stats["prefix_cache_tokens_saved"] == 6 * (len(prompt) - 1)
    assert 0 < stats["prefix_cache_hit_rate"] < 1 and stats["prefix_cache_bytes"] > 0
    rows = [c for group in results for c in group]
    assert len({tuple(c.tokens) for c in rows}) == len(rows)  # every row samples on its own
    for c in rows:
        ref = reference_logprobs(model, prompt, c.tokens, 1.0)
        assert_within("engine vs one full forward", max_gap(c.logprobs, ref), 1e-4)

    metrics = Metrics()  # what GET /metrics serves, in paraloop run and paraloop serve
    metrics.add_collector(lambda: engine_families(stats))
    text = metrics.text().decode()
    assert f"paraloop_prefix_cache_hit_rate {stats['prefix_cache_hit_rate']}" in text
    assert f"paraloop_prefix_cache_tokens_saved_total {6 * (len(prompt) - 1)}.0" in text


def test_the_next_turn_of_a_conversation_prefills_only_what_was_added(tiny_model_path):
    engine, model, gate = make(tiny_model_path)
    tok = engine.tokenizer
    prompt = conversation(tok)[1][1]

    async def body(engine: Engine) -> tuple[list[Completion], list[list[int]], dict]:
        turns, prompts = [(await engine.complete(request(prompt, **GREEDY)))[0]], [prompt]
        for stop in ([turns[0].text[3:6]], []):  # turn 2 ends on a stop string its greedy text contains
            prompts.append(prompts[-1] + turns[-1].tokens + tok.encode(" and then?"))
            turns.append((await engine.complete(request(prompts[-1], stop=stop, **GREEDY)))[0])
        return turns, prompts, engine.stats()

    turns, prompts, stats = serve(engine, body)
    assert turns[1].finish_reason == "stop" and len(turns[1].tokens) < 10
    added = len(tok.encode(" and then?"))
    # Turns 2 and 3 prefill only the new user text: their prompt's previous part is the cached earlier turn.
    assert prompt_forwards(gate) == [(1, len(prompt) - 1), (1, added - 1), (1, added - 1)]
    assert stats["prefix_cache_tokens_saved"] == sum(len(p) - added for p in prompts[1:])
    for p, turn in zip(prompts, turns, strict=True):
        ref = reference_logprobs(model, p, turn.tokens, 1.0)
        assert_within("engine vs one full forward", max_gap(turn.logprobs, ref), 1e-4)


def test_memory_stays_within_the_configured_bound(tiny_model_path):
    engine, _, _ = make(tiny_model_path, cache_mb=1)  # ~500 tokens of the tiny model's KV
    tok = engine.tokenizer
    specs = [
        request(
            tok.encode(f"Conversation {i}: tell me about the market by the river."),
            temperature=0,
            max_tokens=60,
            ignore_eos=True,
        )
        for i in range(10)
    ]
    seen: list[dict] = []

    async def body(engine: Engine) -> None:
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                while True:
                    seen.append(engine.stats())
                    await anyio.sleep(0.002)

            tg.start_soon(watch)
            await complete_all(engine, specs[:5])
            await complete_all(engine, specs[5:])
            tg.cancel_scope.cancel()
        seen.append(engine.stats())

    serve(engine, body)
    assert all(s["prefix_cache_bytes"] <= s["prefix_cache_max_bytes"] == 2**20 for s in seen)
    assert seen[-1]["prefix_cache_evictions"] > 0 and seen[-1]["prefix_cache_bytes"] > 2**19


def gated(tiny_model_path) -> tuple[Engine, nn.Module, Gate, list[int]]:
    """An engine prefilling 16 tokens per step and a 60-token prompt: its prefill takes four steps."""
    engine, model, gate = make(tiny_model_path, step=16)
    return engine, model, gate, (conversation(engine.tokenizer)[1][3] * 3)[:60]


def inbox(engine: Engine) -> int:
    """Commands posted to the engine thread and not taken yet (it is blocked in a gated forward)."""
    return engine._worker._inbox.qsize()


async def leader_prefilling_with_one_held(engine: Engine, gate: Gate, start) -> threading.Event:
    """Start a leader (start(0)) and, while its prefill runs, a request for the same prompt (start(1)), which the
    engine takes and holds. Returns the release of the leader's second prefill step, where the engine now waits."""
    reached, release = gate.arm()
    start(0)
    await until(reached.is_set, "the leader's first prefill step")
    start(1)
    await until(lambda: inbox(engine) == 1, "one message in the engine's inbox")
    reached, release_first = gate.arm(), release
    release_first.set()
    await until(reached[0].is_set, "the second step: the engine took the second request in between")
    return reached[1]


def test_cancelling_a_leader_during_its_prefill_lets_the_requests_held_for_it_run(tiny_model_path):
    engine, model, gate, prompt = gated(tiny_model_path)
    held: list[Completion] = []

    async def main(engine: Engine) -> dict:
        scope = anyio.CancelScope()

        async def leader() -> None:
            with scope:
                await engine.complete(request(prompt, **GREEDY))

        async def second() -> None:
            held.extend(await engine.complete(request(prompt, **GREEDY)))

        async with anyio.create_task_group() as tg:
            release = await leader_prefilling_with_one_held(
                engine, gate, lambda i: tg.start_soon(leader if i == 0 else second)
            )
            scope.cancel()
            await until(lambda: inbox(engine) == 1, "the leader's Cancel, before its prefill step ends")
            release.set()
        return engine.stats()

    stats = serve(engine, main)
    assert len(held) == 1 and held[0].finish_reason == "length" and len(held[0].tokens) == 10
    ref = reference_logprobs(model, prompt, held[0].tokens, 1.0)
    assert_within("engine vs one full forward", max_gap(held[0].logprobs, ref), 1e-4)
    # The leader's half-done prefill was dropped: the held request prefilled the prompt itself, nothing cached.
    assert stats["prefix_cache_lookups"] == 2 and stats["prefix_cache_tokens_saved"] == 0
    assert [s[1] for s in prompt_forwards(gate)] == [16, 16, 16, 16, 16, 11]


def test_requests_held_for_a_leader_start_on_the_new_version_after_a_drain_swap(tiny_model_path):
    engine, model, gate, prompt = gated(tiny_model_path)
    new = changed_adapter(model, seed=3)
    out: dict[str, Any] = {}

    async def main(engine: Engine) -> dict:
        async def one(i: int) -> None:
            out[i] = (await engine.complete(request(prompt, **GREEDY)))[0]

        async def swap() -> None:
            out["swap"] = await engine.swap_adapter(new, version=1, drain=True)

        async with anyio.create_task_group() as tg:
            release = await leader_prefilling_with_one_held(engine, gate, lambda i: tg.start_soon(one, i))
            tg.start_soon(swap)
            await until(lambda: inbox(engine) == 1, "one message in the engine's inbox")
            release.set()
        return engine.stats()

    stats = serve(engine, main)
    assert set(out[0].versions) == {0} and set(out[1].versions) == {1} and out["swap"].version == 1
    assert stats["prefix_cache_tokens_saved"] == 0  # the held request did not start from version 0's entry
    AdapterSlots(model).swap(new)
    ref = reference_logprobs(model, prompt, out[1].tokens, 1.0)
    assert_within("engine vs one full forward", max_gap(out[1].logprobs, ref), 1e-4)


def test_stopping_the_engine_aborts_rows_waiting_for_a_leader_and_held_requests(tiny_model_path):
    engine, _, gate, prompt = gated(tiny_model_path)
    got: dict[int, list[Completion]] = {}

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            engine_scope = anyio.CancelScope()

            async def run_engine(*, task_status: anyio.abc.TaskStatus[None]) -> None:
                with engine_scope:
                    await engine.run(task_status=task_status)

            async def one(i: int) -> None:
                got[i] = await engine.complete(request(prompt, n=3 - i, **GREEDY))

            await tg.start(run_engine)
            with anyio.fail_after(60):
                release = await leader_prefilling_with_one_held(engine, gate, lambda i: tg.start_soon(one, i))
                engine_scope.cancel()  # the engine stops: its rows end with "abort"
                await until(lambda: inbox(engine) == 1, "the Stop in the engine's inbox")
                release.set()

    anyio.run(main)
    assert [len(got[0]), len(got[1])] == [3, 2]  # a leader with two rows waiting, and a held request
    assert all(c.finish_reason == "abort" and not c.tokens for group in got.values() for c in group)


def test_a_drain_swap_waiting_for_the_last_row_applies_when_it_finishes(tiny_model_path):
    """The swap must not wait for another command once the rows it waited for are done (an idle engine would
    sleep on its inbox with the swap parked)."""
    engine, model, _ = make(tiny_model_path)
    prompt = conversation(engine.tokenizer)[1][0]

    async def body(engine: Engine) -> Any:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: engine.complete(request(prompt, **GREEDY)))
            await until(lambda: engine.stats()["active_rows"] > 0, "a row decoding")
            swapped = await engine.swap_adapter(changed_adapter(model, seed=5), version=1, drain=True)
        return swapped

    assert serve(engine, body, deadline=60).version == 1
