"""Batched scoring (Engine.score_many, engine/scoring.py) on the tiny model: sequences of different lengths, each
under its own adapter (the policy, the base model, two named adapters), scored together in routed forwards, equal
each sequence scored alone (Engine.score: one sequence's prompt_logprobs under its adapter, the API's path) within
SCORE_TOL, and each row's log-probs are its own adapter's (a separate load with that adapter applied). A batch of
short sequences is one forward group; bounds, errors and a stopping engine answer every caller."""

import itertools

import paraloop  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import anyio
import mlx.core as mx
import numpy as np
import pytest

from support import engines
from support.adapter_files import random_adapter
from support.compute_paths import assert_within, max_gap
from paraloop.config import EngineConfig, LoraConfig
from paraloop.engine import Engine
from paraloop.engine.admission import RequestError
from paraloop.engine.scoring import CHUNK, FORWARD_COST, SCORE_TOKENS, prompt_logprobs, score_plan, score_sequences
from paraloop.logits_head import logits_head
from paraloop.lora import AdapterSlots, apply_adapter
from paraloop.messages import GenerateRequest, SamplingParams
from paraloop.model import Float32Logits, load_model

# Batched routed forwards (rows padded together, gathered LoRA, the body/head split) vs one sequence's own forward:
# float32 rounding of another grouping. Worst measured, by OpenBLAS kernel: Zen 2.9e-6, Haswell 2.9e-6, Sandybridge 0
# (the engine's routed path alone: 1.4e-6, 1.4e-6, 0; the worst is a model of its own through full logits).
SCORE_TOL = 1e-5
# vs a separate load with the adapter applied, one full forward (LOGPROB_TOL's bound for an adapter row). Worst
# measured: Zen 1.9e-6, Haswell 1.9e-6, Sandybridge 1.4e-6.
OWN_TOL = 1e-4
CFG = LoraConfig(rank=4, keys="all", num_layers=-1, scale=2.0)
LENGTHS = [300, 257, 200, 129, 64, 17, 5, 2]  # across CHUNK (256), down to one scored token
ADAPTERS = ["policy", "teacher", "base", "other", "teacher", "policy", "other", "base"]


@pytest.fixture(scope="module")
def adapters(tiny_model_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("score-many")
    return {
        name: random_adapter(root / name, tiny_model_path, CFG, seed=seed)
        for name, seed in [("policy", 11), ("teacher", 3), ("other", 5)]
    }


def make_engine(model_path, adapters, **kwargs) -> Engine:
    model, tokenizer, _, _ = load_model(model_path)
    apply_adapter(model, adapters["policy"])
    config = EngineConfig(decode="cpu", prefix_cache_mb=0)
    return Engine(model, tokenizer, config=config, adapter=AdapterSlots(model), **kwargs)


def sequences(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab, n).tolist() for n in LENGTHS]


def ask(tokens: list[int], adapter: str, rid: str = "s") -> GenerateRequest:
    return GenerateRequest(request_id=rid, prompt_tokens=tokens, adapter=adapter, params=SamplingParams(max_tokens=1))


def own_forward(model_path, adapter, tokens: list[int], temperature: float) -> list[float]:
    model, _, _, _ = load_model(model_path)
    if adapter is not None:
        apply_adapter(model, adapter)
    logits = model(mx.array(tokens[:-1])[None])[0].astype(mx.float32) / temperature
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return logp[mx.arange(len(tokens) - 1), mx.array(tokens[1:])].tolist()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_a_mixed_batch_scores_each_row_as_alone_and_under_its_own_adapter(tiny_model_path, adapters, temperature):
    engine = make_engine(tiny_model_path, adapters)
    seqs = sequences(engine._vocab)

    async def body(engine: Engine):
        for name in ("teacher", "other"):
            await engine.adapters.load(name, adapters[name])
        requests = [ask(s, a, f"s{i}") for i, (s, a) in enumerate(zip(seqs, ADAPTERS, strict=True))]
        before = engine._worker.score_groups
        batched = await engine.score_many(requests, temperature=temperature)
        groups = engine._worker.score_groups - before
        alone = [list((await engine.score(r, temperature=temperature)).chosen) for r in requests]
        return batched, alone, groups

    batched, alone, groups = engines.serve(engine, body, deadline=120)
    plan = score_plan(LENGTHS)
    assert groups == len(plan)
    mixed = [g for g in plan if len({ADAPTERS[i] for i in g}) > 1 and len({LENGTHS[i] for i in g}) > 1]
    assert len(mixed) >= 2, plan  # forwards that pad rows of several lengths and route them to several adapters
    for seq, got, ref in zip(seqs, batched, alone, strict=True):
        assert len(got) == len(seq) - 1
        assert_within("batched scoring vs one sequence's prompt_logprobs", max_gap(got, ref), SCORE_TOL)
    own = {name: adapters.get(name) for name in set(ADAPTERS)}  # "base": no adapter
    for seq, got, name in zip(seqs, batched, ADAPTERS, strict=True):
        gap = max_gap(got, own_forward(tiny_model_path, own[name], seq, temperature))
        assert_within("batched scoring vs a separate load's full forward", gap, OWN_TOL)
    # the adapters differ by far more than the bounds: a row routed to another's adapter would fail above
    longest = seqs[0]
    ref = own_forward(tiny_model_path, None, longest, temperature)
    for name in ("policy", "teacher", "other"):
        assert max_gap(ref, own_forward(tiny_model_path, own[name], longest, temperature)) > 0.05


def plan_cost(lengths: list[int], groups: list[list[int]]) -> float:
    cost = 0.0
    for group in groups:
        width = max(lengths[i] - 1 for i in group)
        assert len(group) * min(width, CHUNK) <= SCORE_TOKENS or len(group) == 1
        cost += -(-width // CHUNK) * FORWARD_COST + len(group) * width
    return cost


def test_the_plan_puts_near_lengths_in_one_forward_and_is_the_cheapest_within_the_bound():
    assert score_plan([120] * 16) == [list(range(16))]  # a GRPO group at the length cap: one forward
    assert [len(g) for g in score_plan([300] * 40)] == [16, 16, 8]  # SCORE_TOKENS // CHUNK rows per forward
    assert score_plan([1000, 40, 700, 300]) == [[0], [2], [3], [1]]  # padding would cost more than 3 forwards
    rng = np.random.default_rng(1)
    for _ in range(30):
        lengths = rng.integers(2, 400, int(rng.integers(1, 9))).tolist()
        plan = score_plan(lengths)
        assert sorted(i for g in plan for i in g) == list(range(len(lengths)))
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        cheapest = min(  # every cut of the sorted rows into consecutive groups
            plan_cost(lengths, [order[a:b] for a, b in itertools.pairwise([0, *cuts, len(order)])])
            for r in range(len(order))
            for cuts in itertools.combinations(range(1, len(order)), r)
        )
        assert plan_cost(lengths, plan) == cheapest


def test_bounds_errors_and_a_stopping_engine_answer_every_caller(tiny_model_path, adapters):
    engine = make_engine(tiny_model_path, adapters, max_queue=4)
    vocab = engine._vocab

    async def body(engine: Engine):
        teacher = await engine.adapters.load("teacher", adapters["teacher"])
        with pytest.raises(RequestError, match="prompt"):
            await engine.score_many([ask([1, 2, 3], "teacher"), ask([1, vocab], "teacher")])
        with pytest.raises(RequestError, match="a batch of 5 requests"):
            await engine.score_many([ask([1, 2, 3], "teacher")] * 5)
        assert await engine.score_many([]) == []
        assert len((await engine.score_many([ask([1, 2, 3], "teacher")] * 4))[3]) == 2
        assert engine.stats()["queue_depth"] == 0 and teacher.users == 0

    engines.serve(engine, body, deadline=60)

    stopped = make_engine(tiny_model_path, adapters)

    async def main():
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                await tg.start(stopped.run)
                tg.cancel_scope.cancel()
            with pytest.raises(RuntimeError, match="stopped"):
                await stopped.score_many([ask([1, 2, 3], "policy")])

    anyio.run(main)


def test_scoring_runs_between_decode_steps_and_leaves_the_decoding_rows_as_they_were(tiny_model_path, adapters):
    """Policy rows decode while a teacher batch is scored: their tokens and log-probs equal a run without it, and
    the scores equal the same batch scored on an idle engine."""
    seqs = sequences(make_engine(tiny_model_path, adapters)._vocab)[:6]
    prompts = [[3, 14, 15, 92, 65], [35, 89, 79]]

    def generation(i: int) -> GenerateRequest:
        params = SamplingParams(max_tokens=400, temperature=1.0, seed=i, ignore_eos=True)
        return GenerateRequest(request_id=f"g{i}", prompt_tokens=prompts[i], adapter="policy", params=params)

    async def run(engine: Engine, *, score: bool, decode: bool):
        await engine.adapters.load("teacher", adapters["teacher"])
        out: dict = {}
        async with anyio.create_task_group() as tg:
            if decode:

                async def gen() -> None:
                    out["rows"] = await engine.complete_many([generation(0), generation(1)])

                tg.start_soon(gen)
            if score:
                await anyio.sleep(0.05)  # decoding has started
                out["scores"] = await engine.score_many([ask(s, "teacher", f"s{i}") for i, s in enumerate(seqs)])
                out["decoding"] = engine.stats()["active_rows"]
        return out

    together = engines.serve(make_engine(tiny_model_path, adapters), lambda e: run(e, score=True, decode=True))
    decoding = engines.serve(make_engine(tiny_model_path, adapters), lambda e: run(e, score=False, decode=True))
    idle = engines.serve(make_engine(tiny_model_path, adapters), lambda e: run(e, score=True, decode=False))
    assert together["decoding"] == 2  # the batch was scored while both rows decoded
    for mixed, alone in zip(together["rows"], decoding["rows"], strict=True):
        assert mixed[0].tokens == alone[0].tokens and mixed[0].logprobs == alone[0].logprobs
    assert together["scores"] == idle["scores"]


def test_a_caller_that_leaves_drops_its_groups_and_a_stopping_engine_answers_a_running_job(tiny_model_path, adapters):
    engine = make_engine(tiny_model_path, adapters)
    rng = np.random.default_rng(2)
    big = [ask(rng.integers(0, engine._vocab, 300).tolist(), "teacher", f"b{i}") for i in range(80)]
    total = len(score_plan([300] * len(big)))

    async def main():
        outcome: dict = {}
        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                scope = anyio.CancelScope()

                async def serve_engine(*, task_status=anyio.TASK_STATUS_IGNORED):
                    with scope:
                        await engine.run(task_status=task_status)

                await tg.start(serve_engine)
                await engine.adapters.load("teacher", adapters["teacher"])
                with anyio.move_on_after(0.05):  # the caller leaves while its job runs
                    await engine.score_many(big)
                left_at = engine._worker.score_groups
                assert len(await engine.score_many(big[:2])) == 2  # the engine goes on
                outcome["dropped"] = (left_at, engine._worker.score_groups)

                async def score() -> None:
                    try:
                        await engine.score_many(big)
                    except RuntimeError as e:
                        outcome["error"] = str(e)

                tg.start_soon(score)
                await anyio.sleep(0.05)
                scope.cancel()  # the engine stops with the job queued or running
        return outcome

    outcome = anyio.run(main)
    left_at, after = outcome["dropped"]
    assert after - left_at <= 2 and left_at < total  # at most the group running as it left, then the 2-row one
    assert "stopped" in outcome["error"]


def test_a_model_of_its_own_scores_alike_with_the_head_split_and_with_full_logits(tiny_model_path, adapters):
    """score_sequences (a model-directory teacher's path): through the body/head split and through full logits (a
    model the split does not hold for), each against one sequence's prompt_logprobs."""
    model, _, _, _ = load_model(tiny_model_path)
    apply_adapter(model, adapters["teacher"])
    seqs = sequences(model.args.vocab_size)
    head = logits_head(model)
    assert head is not None
    alone = [prompt_logprobs(Float32Logits(model), s, top=0, temperature=0.7).chosen for s in seqs]
    for split in (head, None):
        scored = score_sequences(model, split, seqs, temperature=0.7)
        for got, ref in zip(scored, alone, strict=True):
            assert_within("batched scoring vs one sequence's prompt_logprobs", max_gap(got, ref), SCORE_TOL)
