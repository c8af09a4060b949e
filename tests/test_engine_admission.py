"""Engine admission: work held at once is bounded in requests and in KV-cache tokens; a request's limits are checked
before anything is built for its rows; the engine's own batches wait for room and are not starved by HTTP traffic."""

import time

import paraloop  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import anyio
import pytest

from paraloop.config import EngineConfig
from paraloop.engine import Engine, EngineBusy, RequestError
from paraloop.messages import GenerateRequest, SamplingParams
from paraloop.model import load_model
from support import until

DEADLINE_S = 60


def engine_with(path, **config) -> Engine:
    model, tokenizer, _, _ = load_model(path)
    max_queue = config.pop("max_queue", 8)
    return Engine(model, tokenizer, config=EngineConfig(max_tokens_limit=512, **config), max_queue=max_queue)


def req(prompt_len: int, max_tokens: int, *, n: int = 1) -> GenerateRequest:
    return GenerateRequest(
        request_id="r",
        prompt_tokens=[5] * prompt_len,
        n=n,
        params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
    )


def serve(engine: Engine, body) -> None:
    async def main() -> None:
        with anyio.fail_after(DEADLINE_S):
            async with anyio.create_task_group() as tg:
                await tg.start(engine.run)
                await body(engine, tg)
                tg.cancel_scope.cancel()

    anyio.run(main)


def test_a_huge_n_is_refused_before_any_row_is_made(tiny_model_path):
    engine = engine_with(tiny_model_path)

    async def body(engine: Engine, tg) -> None:
        for n in (2**31, 2**62):
            start = time.monotonic()
            with pytest.raises(RequestError) as err:
                await engine.complete(req(4, 4, n=n))
            assert err.value.field == "n" and time.monotonic() - start < 1.0

    serve(engine, body)


def test_a_request_that_could_never_fit_the_kv_budget_is_a_request_error(tiny_model_path):
    engine = engine_with(tiny_model_path, max_kv_tokens=100)

    async def body(engine: Engine, tg) -> None:
        with pytest.raises(RequestError, match=r"4 x \(10 \+ 20\) = 120 KV-cache tokens") as err:
            await engine.complete(req(10, 20, n=4))
        assert err.value.field == "n"
        with pytest.raises(RequestError) as err:
            await engine.complete(req(10, 91))
        assert err.value.field == "max_tokens"
        assert len((await engine.complete(req(10, 90)))[0].tokens) == 90  # exactly at the budget

    serve(engine, body)


def test_the_kv_budget_is_shared_by_the_requests_admitted_and_freed_when_they_leave(tiny_model_path):
    engine = engine_with(tiny_model_path, max_kv_tokens=200)

    async def body(engine: Engine, tg) -> None:
        hog = engine.generate(req(4, 150))  # 154 tokens, for a while
        await hog.__anext__()
        assert engine.stats()["kv_tokens_admitted"] == 154
        with pytest.raises(EngineBusy, match="154 of engine.max_kv_tokens=200"):
            await engine.generate(req(4, 50)).__anext__()  # 54 more: 208
        assert len((await engine.complete(req(4, 40)))[0].tokens) == 40  # 44 more: 198 fits
        await hog.aclose()
        assert engine.stats()["kv_tokens_admitted"] == 0
        assert len((await engine.complete(req(4, 50)))[0].tokens) == 50

    serve(engine, body)


def test_an_engine_batch_waits_for_room_and_new_requests_are_refused_meanwhile(tiny_model_path):
    engine = engine_with(tiny_model_path, max_queue=2)  # room for the batch of two only once the hog leaves
    results = []

    async def body(engine: Engine, tg) -> None:
        hog = engine.generate(req(4, 500))
        await hog.__anext__()

        async def batch() -> None:
            results.append(await engine.complete_many([req(4, 3), req(4, 2)]))

        tg.start_soon(batch)
        await anyio.wait_all_tasks_blocked()  # the batch has asked for room
        assert results == []  # waiting for room, not refused
        with pytest.raises(EngineBusy, match="rollout batch"):
            await engine.generate(req(4, 2)).__anext__()
        await hog.aclose()
        await until(lambda: bool(results), "the batch's results", within=DEADLINE_S)

    serve(engine, body)
    [rows_a, rows_b] = results[0]
    assert len(rows_a[0].tokens) == 3 and len(rows_b[0].tokens) == 2


def test_an_engine_batch_that_could_never_fit_is_refused_at_once(tiny_model_path):
    engine = engine_with(tiny_model_path, max_queue=2, max_kv_tokens=100)

    async def body(engine: Engine, tg) -> None:
        with pytest.raises(RequestError, match="server.max_concurrent_requests=2"):
            await engine.complete_many([req(4, 2)] * 3)
        with pytest.raises(RequestError, match="engine.max_kv_tokens=100"):
            await engine.complete_many([req(10, 50), req(10, 50)])

    serve(engine, body)


def test_a_temperature_too_small_to_divide_by_samples_greedily_and_one_too_large_is_refused(tiny_model_path):
    engine = engine_with(tiny_model_path)

    def at(temperature: float) -> GenerateRequest:
        return GenerateRequest(
            request_id="t",
            prompt_tokens=[5, 6, 7],
            n=2,
            params=SamplingParams(max_tokens=8, ignore_eos=True, temperature=temperature),
        )

    async def body(engine: Engine, tg) -> None:
        greedy = (await engine.complete(at(0.0)))[0]
        for tiny in (5e-324, 1e-40, 1e-6):
            for row in await engine.complete(at(tiny)):
                assert row.tokens == greedy.tokens and row.logprobs == greedy.logprobs  # finite, at T = 1
        for bad in (100.5, 1e39, float("inf"), float("nan")):
            with pytest.raises(RequestError) as err:
                await engine.complete(at(bad))
            assert err.value.field == "temperature"

    serve(engine, body)
