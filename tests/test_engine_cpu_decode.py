"""The CPU decode step (engine.decode = "cpu", the CPU default): its sampling in NumPy and its arithmetic exp and
swiglu against NumPy float64; the engine on both paths ("cpu", and "mlx-lm" that Metal and CUDA use): greedy rows
agree, recorded log-probs equal a full forward pass of the model as the learner computes it, seeded rows repeat
whatever shares the batch."""

import threading

import paraloop  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import anyio
import mlx.core as mx
import numpy as np
import pytest
from support.compute_paths import assert_within, max_gap
from support.engines import reference_logprobs, request

from paraloop.config import EngineConfig
from paraloop.engine import Engine
from paraloop.engine import cpu_kernels
from paraloop.engine.cpu_decode import NumpySampler, row_generators, sample_rows
from paraloop.engine.filtering import FILTERED_LOGPROB, filter_row
from paraloop.engine.sampling import filter_logits
from paraloop.messages import Completion, SamplingParams
from paraloop.model import load_model

RNG = np.random.default_rng(0)
LOGITS = RNG.normal(0.0, 2.0, size=(3, 50)).astype(np.float32)


def sampler(seed: int = 0, **params) -> NumpySampler:
    return NumpySampler(SamplingParams(**params), row_generators(n=1, seed=seed, engine_seed=0, counter=0)[0])


def log_softmax64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


@pytest.mark.parametrize(
    "filters",
    [dict(top_k=7), dict(top_p=0.5), dict(top_p=0.999), dict(min_p=0.2), dict(top_k=20, top_p=0.9, min_p=0.05)],
)
def test_the_numpy_filters_keep_what_the_mlx_filters_keep(filters):
    args = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, **filters}
    mlx_kept = np.isfinite(np.array(filter_logits(mx.array(LOGITS), **args)))
    for row, kept in zip(LOGITS, mlx_kept, strict=True):
        assert (filter_row(row, **args) == kept).all()


def test_rows_are_drawn_from_the_tempered_filtered_distribution():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], dtype=np.float32))
    s = sampler(temperature=0.5, top_k=3)
    draws = np.array([sample_rows(logits, [s])[0][0] for _ in range(3000)])
    tempered = np.exp(log_softmax64(logits[0] / 0.5))[:3]
    tempered /= tempered.sum()
    assert 3 not in draws  # outside the top 3
    assert np.abs(np.bincount(draws, minlength=3)[:3] / len(draws) - tempered).max() < 0.03


def test_recorded_logprobs_are_of_the_distribution_each_row_sampled_from():
    """log_softmax(logits / T), renormalised over the kept set of a filtered row, whose size is recorded; an
    alternative outside the kept set reads FILTERED_LOGPROB (vLLM's stand-in for -inf)."""
    rows = [
        sampler(temperature=0.0, top_logprobs=4),
        sampler(1, temperature=0.7, top_p=0.5, top_logprobs=8),
        sampler(2, temperature=1.5, top_logprobs=2),
    ]
    tokens, logprobs = sample_rows(LOGITS, rows)
    assert tokens[0] == np.argmax(LOGITS[0])  # greedy: the argmax, reported at T = 1
    for i, (t, lp) in enumerate(zip([1.0, 0.7, 1.5], logprobs, strict=True)):
        expected = log_softmax64(LOGITS[i] / t)
        keep = filter_row(LOGITS[i] / t, top_k=0, top_p=0.5, min_p=0.0) if i == 1 else np.ones(50, bool)
        assert lp.kept == (int(keep.sum()) if i == 1 else 0)
        ranked = np.argsort(-expected)[: rows[i].top_logprobs]  # the ranking is the full distribution's
        expected = np.where(keep, expected - np.log(np.exp(expected[keep]).sum()), FILTERED_LOGPROB)
        assert abs(lp.chosen - expected[tokens[i]]) < 1e-5
        assert [tok for tok, _ in lp.top] == ranked.tolist()
        assert np.abs(np.array([v for _, v in lp.top]) - expected[ranked]).max() < 1e-5
    assert 1 < logprobs[1].kept < 8, "the top_p row keeps fewer tokens than it lists alternatives"
    assert sample_rows(LOGITS[:1], [sampler(temperature=1.0)])[1][0].top is None


def test_a_seeded_row_draws_the_same_tokens_whatever_shares_the_batch():
    def draws(batch: int) -> list[int]:
        mine = NumpySampler(SamplingParams(temperature=1.0), row_generators(n=2, seed=42, engine_seed=0, counter=0)[1])
        others = [sampler(seed=100 + j, temperature=0.8) for j in range(batch - 1)]
        logits = np.repeat(LOGITS[:1], batch, axis=0)
        return [int(sample_rows(logits, [*others, mine])[0][-1]) for _ in range(40)]

    assert draws(1) == draws(3)
    a, b = row_generators(n=2, seed=42, engine_seed=0, counter=0)
    assert a.random() != b.random()  # rows of one request get different streams
    unseeded = [row_generators(n=1, seed=None, engine_seed=0, counter=c)[0].random() for c in range(3)]
    assert len(set(unseeded)) == 3


def test_the_arithmetic_exp_and_swiglu_match_float64():
    x = np.concatenate([np.linspace(-87, 87, 20001), RNG.normal(0, 3, 20000)]).astype(np.float32)
    got = np.array(cpu_kernels.exp(mx.array(x)))
    assert np.abs(got / np.exp(x.astype(np.float64)) - 1).max() < 5e-7
    gate, up = RNG.normal(0, 3, (32, 1536)).astype(np.float32), RNG.normal(0, 1, (32, 1536)).astype(np.float32)
    expected = gate.astype(np.float64) / (1 + np.exp(-gate.astype(np.float64))) * up
    got = np.array(cpu_kernels.swiglu(mx.array(gate), mx.array(up)))
    assert np.abs(got - expected).max() <= 4e-7 * np.abs(expected).max()
    assert np.isfinite(np.array(cpu_kernels.swiglu(mx.array([-200.0, 200.0]), mx.array([1.0, 1.0])))).all()


def test_the_engine_thread_alone_uses_the_arithmetic_swiglu():
    from mlx_lm.models import activations, llama

    gate = mx.array(RNG.normal(0, 3, (4, 64)).astype(np.float32))
    up = mx.ones_like(gate)
    fast, own = np.array(cpu_kernels.swiglu(gate, up)), np.array(activations.swiglu(gate, up))
    assert not np.array_equal(fast, own) and np.allclose(fast, own, rtol=1e-6, atol=1e-7)

    def in_a_thread(install: bool) -> np.ndarray:
        seen = []

        def body() -> None:
            if install:
                assert cpu_kernels.use_on_this_thread() > 0
            seen.append(np.array(llama.swiglu(gate, up)))  # what a llama MLP calls on this thread

        thread = threading.Thread(target=body)
        thread.start()
        thread.join()
        return seen[0]

    assert np.array_equal(in_a_thread(True), fast)  # the engine's thread
    assert np.array_equal(in_a_thread(False), own)  # any other thread (the learner's) keeps mlx-lm's
    assert np.array_equal(np.array(llama.swiglu(gate, up)), own)
    assert llama.swiglu.original is activations.swiglu  # mlx-lm's module itself is left as it was


# --- the engine on both paths ---------------------------------------------------------------------------------------


def serve_on(path, decode: str, specs: list) -> list[list[Completion]]:
    model, tokenizer, _, _ = load_model(path)
    engine = Engine(model, tokenizer, config=EngineConfig(decode=decode, max_n=8, prefix_cache_mb=0))

    async def main() -> list[list[Completion]]:
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            with anyio.fail_after(120):
                out = await engine.complete_many(specs)
            tg.cancel_scope.cancel()
        return out

    return anyio.run(main)


def test_both_sampling_paths_record_the_models_logprobs_and_agree_on_greedy_rows(tiny_model_path):
    model, tokenizer, _, _ = load_model(tiny_model_path)
    prompt_a = tokenizer.encode("The capital of France is")
    prompt_b = tokenizer.encode("Water freezes at zero degrees and boils at one")
    specs = [
        request(prompt_a, temperature=0, max_tokens=12, ignore_eos=True, top_logprobs=3),
        request(prompt_b, n=2, temperature=0.7, top_p=0.95, max_tokens=12, ignore_eos=True, seed=5),
        request(prompt_a, n=2, temperature=1.3, max_tokens=12, ignore_eos=True),
    ]
    results = {kind: serve_on(tiny_model_path, kind, specs) for kind in ("cpu", "mlx-lm")}
    assert results["cpu"][0][0].tokens == results["mlx-lm"][0][0].tokens  # greedy
    for kind, groups in results.items():
        for spec, rows in zip(specs, groups, strict=True):
            for row in rows:
                expected = reference_logprobs(model, spec.prompt_tokens, row.tokens, spec.params.temperature, row.kept)
                assert_within(f"engine vs one full forward ({kind} decode)", max_gap(row.logprobs, expected), 1e-4)
                assert all(row.kept) == (spec.params.top_p < 1), kind  # the top_p rows record their kept sets
        assert groups[1][0].tokens != groups[1][1].tokens
    again = serve_on(tiny_model_path, "cpu", specs[1:2])  # a seeded request alone: the same rows
    assert [r.tokens for r in again[0]] == [r.tokens for r in results["cpu"][1]]


def test_the_two_level_draw_never_picks_a_token_without_weight():
    from paraloop.engine.cpu_decode import _draw

    weights = np.zeros(3000, np.float32)
    weights[[5, 1023, 1024, 2999]] = [1.0, 2.0, 3.0, 4.0]  # block edges and the ragged last block
    picks = [_draw(weights, u) for u in np.linspace(0.0, 1.0, 2001, endpoint=False)]
    assert set(picks) == {5, 1023, 1024, 2999}
    counts = np.array([picks.count(t) for t in (5, 1023, 1024, 2999)]) / len(picks)
    assert np.abs(counts - np.array([1, 2, 3, 4]) / 10).max() < 0.002
    assert _draw(weights, np.nextafter(1.0, 0.0)) == 2999


def test_extreme_filters_and_non_finite_logits_still_give_a_token():
    top = int(np.argmax(LOGITS[0]))
    for tiny in (1e-323, 1e-45, 1e-9):  # a denormal top_p is 0 in float32: the most likely token still survives
        assert np.flatnonzero(filter_row(LOGITS[0], top_k=0, top_p=tiny, min_p=0.0)).tolist() == [top]
        kept = np.isfinite(np.array(filter_logits(mx.array(LOGITS[:1]), top_k=0, top_p=tiny, min_p=0.0)))[0]
        assert np.flatnonzero(kept).tolist() == [top]
        assert sample_rows(LOGITS[:1], [sampler(temperature=1.0, top_p=tiny)])[0][0] == top
    bad = LOGITS[:2].copy()
    bad[0, 3], bad[1, :] = np.inf, np.nan
    tokens, _ = sample_rows(bad, [sampler(temperature=1.0), sampler(1, temperature=1.0)])
    assert tokens.tolist() == [3, 0]


@pytest.mark.parametrize("top_p", [0.3, 0.8, 0.95, 0.999])
def test_the_partial_sort_nucleus_equals_a_full_sort_on_a_large_vocabulary(top_p):
    """filter_row sorts only the most likely tokens, growing the set until it holds top_p's mass: the same
    nucleus as sorting the whole row (vocabularies far above its first guess of 64 tokens)."""
    z = np.random.default_rng(7).normal(0.0, 3.0, size=5000).astype(np.float32)
    p = np.exp(z.astype(np.float64) - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    before = np.cumsum(p[order]) - p[order]
    expected = np.zeros(z.shape, bool)
    expected[order[before < top_p]] = True
    got = filter_row(z, top_k=0, top_p=top_p, min_p=0.0)
    assert got.sum() > 64 or top_p == 0.3
    assert np.array_equal(got, expected)
