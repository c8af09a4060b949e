"""The engine actor on the tiny model: per-request sampling inside one batch, exact logprobs and versions,
n > 1 from one prefill, live adapter swaps, cancellation, admission and validation.

What depends on how the base computes (batching, n, logprobs, swaps) runs on the tiny 4-bit model once per
`compute` path (support/compute_paths.py); the rest (admission, cancellation, validation) on the float32 model."""

from typing import Any

import paraloop  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import anyio
import mlx.core as mx
import pytest
from support import until

from paraloop.config import EngineConfig
from paraloop.engine import NO_TOKEN, Engine, EngineBusy, RequestError
from paraloop.lora import AdapterSlots, adapter_arrays
from paraloop.messages import Completion, GenerateRequest, SamplingParams
from paraloop.model import load_model
from support.compute_paths import LOGPROB_TOL, assert_within, max_gap
from support.engines import ForwardLog, changed_adapter, make_engine, prompts, reference_logprobs, request, serve


def test_concurrent_requests_each_keep_their_own_sampling(tiny_q4_model_path, compute):
    engine, _ = make_engine(tiny_q4_model_path, compute=compute)
    prompt_a, prompt_b, *_ = prompts(engine.tokenizer)

    async def body(engine: Engine) -> None:
        alone = (await engine.complete(request(prompt_a, temperature=0, max_tokens=24, ignore_eos=True)))[0]
        stop = alone.text[6:9]  # a stop string the greedy text is known to contain
        cut = alone.text[: alone.text.index(stop)]

        specs = []
        for i in range(32):
            kind = ("greedy", "stop", "sampled", "short")[i % 4]
            if kind == "greedy":
                specs.append(request(prompt_a, temperature=0, max_tokens=24, ignore_eos=True))
            elif kind == "stop":
                specs.append(request(prompt_a, temperature=0, max_tokens=24, ignore_eos=True, stop=["zzz", stop]))
            elif kind == "sampled":
                specs.append(request(prompt_b, temperature=0.5 + i / 32, top_p=0.9, max_tokens=5 + i, ignore_eos=True))
            else:
                specs.append(request(prompt_b, temperature=1.0, top_k=5, max_tokens=1 + i % 3, ignore_eos=True))
        results: dict[int, Completion] = {}

        async def one(i: int) -> None:
            results[i] = (await engine.complete(specs[i]))[0]

        async with anyio.create_task_group() as tg:
            for i in range(32):
                tg.start_soon(one, i)
        for i, spec in enumerate(specs):
            got, p = results[i], spec.params
            if p.stop:
                assert (got.text, got.finish_reason) == (cut, "stop")
                assert got.tokens == alone.tokens[: len(got.tokens)]
            else:
                assert (len(got.tokens), got.finish_reason) == (p.max_tokens, "length")
            if p.temperature == 0 and not p.stop:
                assert got.tokens == alone.tokens and got.text == alone.text
        assert engine.stats()["requests_served"] == 33

    serve(engine, body)


def test_logprobs_equal_a_full_forward_pass_at_the_request_temperature(tiny_q4_model_path, compute):
    engine, model = make_engine(tiny_q4_model_path, compute=compute)
    prompt_a, prompt_b, *_ = prompts(engine.tokenizer)
    cases = [(prompt_a, 0.0, 1), (prompt_a, 0.7, 2), (prompt_b, 1.3, 1)]

    async def body(engine: Engine) -> list[list[Completion]]:
        out: list[list[Completion]] = [[] for _ in cases]

        async def one(i: int, prompt: list[int], temperature: float, n: int) -> None:
            out[i] = await engine.complete(
                request(prompt, n=n, temperature=temperature, max_tokens=12, ignore_eos=True, top_logprobs=3)
            )

        async with anyio.create_task_group() as tg:
            for i, case in enumerate(cases):
                tg.start_soon(one, i, *case)
        return out

    results = serve(engine, body)
    for (prompt, temperature, _), completions in zip(cases, results, strict=True):
        for c in completions:
            expected = reference_logprobs(model, prompt, c.tokens, temperature)
            assert_within("engine vs one full forward", max_gap(c.logprobs, expected), LOGPROB_TOL[compute])
            if temperature == 0:  # greedy picks the argmax and reports its T = 1 logprob
                logits = model(mx.array(prompt + c.tokens)[None])[0, len(prompt) - 1 : -1]
                assert c.tokens == mx.argmax(logits, axis=-1).tolist()


def test_top_logprobs_are_the_most_likely_alternatives_of_the_same_distribution(tiny_q4_model_path, compute):
    engine, model = make_engine(tiny_q4_model_path, compute=compute)
    prompt = prompts(engine.tokenizer)[0]

    async def body(engine: Engine) -> list:
        spec = request(prompt, temperature=0.8, max_tokens=4, ignore_eos=True, top_logprobs=5, seed=3)
        return [event async for event in engine.generate(spec)]

    events = serve(engine, body)
    tokens = [e.token for e in events]
    logits = model(mx.array(prompt + tokens)[None])[0, len(prompt) - 1 : -1] / 0.8
    logprobs = (logits - mx.logsumexp(logits, axis=-1, keepdims=True)).tolist()
    for event, row in zip(events, logprobs, strict=True):
        best = sorted(range(len(row)), key=lambda t: -row[t])[:5]
        assert [t for t, _ in event.top_logprobs] == best
        assert max(abs(lp - row[t]) for t, lp in event.top_logprobs) < LOGPROB_TOL[compute]


def test_greedy_output_is_the_same_alone_and_batched_with_prompts_of_other_lengths(tiny_q4_model_path, compute):
    engine, _ = make_engine(tiny_q4_model_path, compute=compute)
    all_prompts = prompts(engine.tokenizer)
    greedy = dict(temperature=0, max_tokens=16, ignore_eos=True)

    async def body(engine: Engine) -> tuple[list[list[int]], list[list[int]]]:
        alone = [(await engine.complete(request(p, **greedy)))[0].tokens for p in all_prompts]
        together: list[list[int]] = [[] for _ in all_prompts]

        async def one(i: int) -> None:
            together[i] = (await engine.complete(request(all_prompts[i], **greedy)))[0].tokens

        async with anyio.create_task_group() as tg:
            for i in range(len(all_prompts)):
                tg.start_soon(one, i)
        return alone, together

    alone, together = serve(engine, body)
    assert len({len(p) for p in all_prompts}) == len(all_prompts)  # really different lengths (left padding)
    assert together == alone


def test_a_seed_makes_samples_reproducible_whatever_shares_the_batch(tiny_q4_model_path, compute):
    engine, _ = make_engine(tiny_q4_model_path, compute=compute)
    prompt_a, prompt_b, *_ = prompts(engine.tokenizer)
    seeded = request(prompt_a, n=2, temperature=1.0, top_p=0.95, max_tokens=20, ignore_eos=True, seed=1234)

    async def body(engine: Engine) -> tuple[list[Completion], list[Completion], list[Completion]]:
        alone = await engine.complete(seeded)
        busy: list[Completion] = []

        async def other() -> None:
            await engine.complete(request(prompt_b, n=3, temperature=1.0, max_tokens=30, ignore_eos=True))

        async def mine() -> None:
            busy.extend(await engine.complete(seeded))

        async with anyio.create_task_group() as tg:
            tg.start_soon(other)
            tg.start_soon(mine)
        unseeded: list[Completion] = []

        async def no_seed() -> None:
            spec = request(prompt_a, temperature=1.0, max_tokens=20, ignore_eos=True)
            unseeded.extend(await engine.complete(spec))

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(no_seed)
        return alone, busy, unseeded

    alone, busy, unseeded = serve(engine, body)
    assert [c.tokens for c in busy] == [c.tokens for c in alone]
    assert alone[0].tokens != alone[1].tokens  # rows of one request sample independently
    # Requests without a seed get keys of their own, even when they arrive together with the same prompt.
    assert len({tuple(c.tokens) for c in unseeded}) == 3


def test_n_rows_share_one_prefill_and_sample_independently(tiny_q4_model_path, compute):
    engine, model = make_engine(tiny_q4_model_path, compute=compute, wrap=ForwardLog)
    log = engine._worker.model  # the ForwardLog the engine serves
    prompt = prompts(engine.tokenizer)[3]

    async def body(engine: Engine) -> list[Completion]:
        return await engine.complete(request(prompt, n=4, temperature=1.0, max_tokens=10, ignore_eos=True))

    rows = serve(engine, body)
    multi_token = [s for s in log.shapes if s[1] > 1]
    assert multi_token == [(1, len(prompt) - 1)]  # the prompt went through the model once
    assert all(s[1] == 1 and s[0] <= 4 for s in log.shapes if s[1] == 1)
    assert len({tuple(r.tokens) for r in rows}) == 4
    for r in rows:
        assert (
            max(abs(a - b) for a, b in zip(r.logprobs, reference_logprobs(model, prompt, r.tokens, 1.0), strict=True))
            < LOGPROB_TOL[compute]
        )


def test_more_rows_than_the_batch_width_wait_for_a_free_slot(tiny_q4_model_path, compute):
    engine, model = make_engine(tiny_q4_model_path, compute=compute, batch_size=2)
    prompt_a, prompt_b, *_ = prompts(engine.tokenizer)
    specs = [
        request(prompt_a, n=5, temperature=1.0, max_tokens=6, ignore_eos=True),
        *[request(prompt_b, temperature=0, max_tokens=3 + i, ignore_eos=True) for i in range(3)],
    ]

    async def body(engine: Engine) -> list[list[Completion]]:
        out: list[list[Completion]] = [[] for _ in specs]

        async def one(i: int) -> None:
            out[i] = await engine.complete(specs[i])

        async with anyio.create_task_group() as tg:
            for i in range(len(specs)):
                tg.start_soon(one, i)
        return out

    results = serve(engine, body)
    for spec, rows in zip(specs, results, strict=True):
        assert [len(r.tokens) for r in rows] == [spec.params.max_tokens] * spec.n
        for r in rows:
            expected = reference_logprobs(model, spec.prompt_tokens, r.tokens, spec.params.temperature)
            assert_within("engine vs one full forward", max_gap(r.logprobs, expected), LOGPROB_TOL[compute])


def test_an_adapter_swap_applies_between_steps_and_versions_the_tokens(tiny_q4_model_path, compute):
    engine, model = make_engine(tiny_q4_model_path, compute=compute)
    prompt = prompts(engine.tokenizer)[0]
    old = dict(adapter_arrays(model))
    new = changed_adapter(model, seed=7)

    async def body(engine: Engine) -> tuple[list, Any]:
        events: list = []
        swapped = None
        spec = request(prompt, n=2, temperature=0, max_tokens=40, ignore_eos=True)
        async for event in engine.generate(spec):
            events.append(event)
            if len(events) == 10:
                swapped = await engine.swap_adapter(new, version=1)
        with pytest.raises(ValueError, match="older"):
            await engine.swap_adapter(old, version=0)
        return events, swapped

    events, swapped = serve(engine, body)
    assert swapped.version == 1 and swapped.pause_s >= 0 and engine.stats()["version"] == 1
    for row in (0, 1):
        mine = [e for e in events if e.row == row]
        assert mine[-1].finish_reason == "length" and len(mine) == 40
        versions = [e.version for e in mine]
        assert versions == sorted(versions) and versions[0] == 0 and versions[-1] == 1
        first_new = versions.index(1)
        tokens = [e.token for e in mine]
        # Tokens labelled 0 came from the old adapter: one full forward with it reproduces their logprobs.
        AdapterSlots(model).swap(old)
        expected = reference_logprobs(model, prompt, tokens[: first_new + 1], 1.0)
        got = [e.logprob for e in mine[: first_new + 1]]
        assert_within(
            "engine vs one full forward", max_gap(got[:first_new], expected[:first_new]), LOGPROB_TOL[compute]
        )
        # The first token labelled 1 did not come from the old adapter's forward pass.
        assert abs(got[first_new] - expected[first_new]) > 1e-3


def test_unevaluated_arrays_from_another_thread_are_refused_and_the_engine_keeps_serving(tiny_model_path):
    engine, model = make_engine(tiny_model_path)
    prompt = prompts(engine.tokenizer)[0]
    made: dict[str, mx.array] = {}

    def lazy_elsewhere() -> None:  # a thread's lazy arrays can only be evaluated on that thread
        made.update({k: v * 2.0 for k, v in adapter_arrays(model).items()})

    async def body(engine: Engine) -> None:
        await anyio.to_thread.run_sync(lazy_elsewhere)
        with pytest.raises(ValueError, match="not applied"):
            await engine.swap_adapter(made, version=1)
        assert engine.version == 0
        done = await engine.complete(request(prompt, max_tokens=3, ignore_eos=True))
        assert len(done[0].tokens) == 3

    serve(engine, body)


def test_swap_without_an_adapter_is_refused(tiny_model_path):
    engine, model = make_engine(tiny_model_path, lora=False)

    async def body(engine: Engine) -> None:
        with pytest.raises(RuntimeError, match="no adapter"):
            await engine.swap_adapter({}, version=1)

    serve(engine, body)


def test_leaving_the_iteration_frees_the_rows(tiny_model_path):
    engine, _ = make_engine(tiny_model_path)
    prompt = prompts(engine.tokenizer)[0]
    long = request(prompt, n=3, temperature=1.0, max_tokens=500, ignore_eos=True)

    async def body(engine: Engine) -> None:
        events = engine.generate(long)
        async for _ in events:
            break
        assert engine.stats()["active_rows"] == 3
        await events.aclose()
        await until(lambda: engine.stats()["active_rows"] == 0, "no row decoding")

        # A consumer task that is cancelled frees its rows too.
        async def consume(started: anyio.Event) -> None:
            async for _ in engine.generate(long):
                started.set()

        started = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume, started)
            await started.wait()
            assert engine.stats()["active_rows"] == 3
            tg.cancel_scope.cancel()
        await until(lambda: engine.stats()["active_rows"] == 0, "no row decoding")
        assert engine.stats()["queue_depth"] == 0

    serve(engine, body)


def test_a_full_queue_answers_engine_busy(tiny_model_path):
    engine, _ = make_engine(tiny_model_path, max_queue=2)
    prompt = prompts(engine.tokenizer)[0]
    long = request(prompt, temperature=1.0, max_tokens=500, ignore_eos=True)

    async def body(engine: Engine) -> None:
        first, second = engine.generate(long), engine.generate(long)
        await first.__anext__()
        await second.__anext__()
        with pytest.raises(EngineBusy):
            await engine.generate(long).__anext__()
        await first.aclose()
        assert len((await engine.complete(request(prompt, max_tokens=2)))[0].tokens) >= 1
        await second.aclose()

    serve(engine, body)


def test_stopping_the_engine_aborts_unfinished_rows(tiny_model_path):
    engine, _ = make_engine(tiny_model_path)
    prompt = prompts(engine.tokenizer)[0]

    async def main() -> list[Completion]:
        out: list[Completion] = []
        engine_scope = anyio.CancelScope()

        async def run_engine(*, task_status=anyio.TASK_STATUS_IGNORED) -> None:
            with engine_scope:
                await engine.run(task_status=task_status)

        async def consume() -> None:
            out.extend(await engine.complete(request(prompt, n=2, max_tokens=500, ignore_eos=True)))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                await tg.start(run_engine)
                tg.start_soon(consume)
                await until(lambda: engine.stats()["generated_tokens"] >= 4, "4 tokens generated")
                engine_scope.cancel()
        return out

    rows = anyio.run(main)
    assert [r.finish_reason for r in rows] == ["abort", "abort"]
    assert all(NO_TOKEN not in r.tokens and 0 < len(r.tokens) < 500 for r in rows)


def test_eos_and_stop_token_ids_stop_a_row_and_are_kept_in_tokens_but_not_in_text(tiny_model_path):
    engine, _ = make_engine(tiny_model_path)
    prompt = prompts(engine.tokenizer)[1]
    free_spec = request(prompt, temperature=0, max_tokens=12, ignore_eos=True)

    async def body(engine: Engine) -> tuple[Completion, Completion]:
        free = (await engine.complete(free_spec))[0]
        spec = request(prompt, temperature=0, max_tokens=12, stop_token_ids=[free.tokens[5]])
        return free, (await engine.complete(spec))[0]

    free, by_stop_id = serve(engine, body)
    stop_id = free.tokens[5]
    cut = free.tokens.index(stop_id) + 1
    # The same token as the tokenizer's EOS: it stops a row unless ignore_eos.
    eos_engine, _ = make_engine(tiny_model_path, eos_ids={stop_id})

    async def eos_body(engine: Engine) -> tuple[Completion, Completion]:
        stopped = (await engine.complete(request(prompt, temperature=0, max_tokens=12)))[0]
        return stopped, (await engine.complete(free_spec))[0]

    by_eos, ignoring = serve(eos_engine, eos_body)
    for stopped in (by_stop_id, by_eos):
        assert stopped.finish_reason == "stop" and stopped.tokens == free.tokens[:cut]
        assert len(stopped.logprobs) == len(stopped.tokens)
        assert stopped.text == engine.tokenizer.decode(free.tokens[: cut - 1])
    assert ignoring.tokens == free.tokens and ignoring.finish_reason == "length"


class FailingModel(ForwardLog):
    """Fails on its fifth forward pass, as a real model might run out of memory mid-decode."""

    def __call__(self, inputs: mx.array, cache: Any = None) -> mx.array:
        if len(self.shapes) == 4:
            raise RuntimeError("out of memory (simulated)")
        return super().__call__(inputs, cache)


def test_a_failing_engine_thread_aborts_the_requests_and_raises_from_run(tiny_model_path):
    engine, _ = make_engine(tiny_model_path, wrap=FailingModel)
    prompt = prompts(engine.tokenizer)[0]

    async def main() -> tuple[list[Completion], list[BaseException]]:
        rows: list[Completion] = []
        errors: list[BaseException] = []

        async def run_engine(*, task_status=anyio.TASK_STATUS_IGNORED) -> None:
            try:
                await engine.run(task_status=task_status)
            except RuntimeError as e:
                errors.append(e)

        async def consume() -> None:
            rows.extend(await engine.complete(request(prompt, n=2, max_tokens=50, ignore_eos=True)))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                await tg.start(run_engine)
                tg.start_soon(consume)
        return rows, errors

    rows, errors = anyio.run(main)
    assert len(errors) == 1 and "out of memory (simulated)" in str(errors[0].__cause__)
    assert [r.finish_reason for r in rows] == ["abort", "abort"]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"prompt_tokens": []}, "prompt"),
        ({"prompt_tokens": [1] * 65}, "prompt"),
        ({"prompt_tokens": [1, 5000]}, "prompt"),
        ({"n": 0}, "n"),
        ({"n": 9}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 513}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": 1.0}, "min_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"stop_token_ids": [1024]}, "stop_token_ids"),
        ({"stop": [""]}, "stop"),
        ({"top_logprobs": 21}, "top_logprobs"),
    ],
)
def test_invalid_requests_name_the_bad_field(tiny_model_path, changes, field):
    model, tokenizer, _, _ = load_model(tiny_model_path)
    engine = Engine(model, tokenizer, config=EngineConfig(max_prompt_tokens=64, max_tokens_limit=512, max_n=8))
    top = {k: changes.pop(k) for k in ("prompt_tokens", "n") if k in changes}
    spec = GenerateRequest(request_id="bad", **{"prompt_tokens": [1, 2, 3], **top}, params=SamplingParams(**changes))

    async def first_event() -> None:
        await engine.generate(spec).__anext__()

    with pytest.raises(RequestError) as err:
        anyio.run(first_event)
    assert err.value.field == field
