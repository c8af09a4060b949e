"""Per-row sampling filters, PRNG keys and the recorded logprobs, against NumPy in float64."""

import paraloop  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import mlx.core as mx
import numpy as np
import pytest

from paraloop.engine.filtering import FILTERED_LOGPROB
from paraloop.engine.sampling import RowSampler, filter_logits, row_keys, token_logprobs
from paraloop.messages import SamplingParams

RNG = np.random.default_rng(0)
LOGITS = RNG.normal(0.0, 2.0, size=(3, 50)).astype(np.float32)


def kept(logits: mx.array) -> list[set[int]]:
    return [set(np.flatnonzero(np.isfinite(row)).tolist()) for row in np.array(logits)]


def probs64(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_top_k_keeps_the_k_largest_logits():
    got = kept(filter_logits(mx.array(LOGITS), top_k=7, top_p=1.0, min_p=0.0))
    assert got == [set(np.argsort(-row)[:7].tolist()) for row in LOGITS]


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p):
    got = kept(filter_logits(mx.array(LOGITS), top_k=0, top_p=top_p, min_p=0.0))
    expected = []
    for p in probs64(LOGITS):
        order = np.argsort(-p)
        before = np.cumsum(p[order]) - p[order]  # mass of the more likely tokens
        expected.append(set(order[before < top_p].tolist()))
    assert got == expected
    assert all(len(s) >= 1 for s in got)


def test_min_p_keeps_tokens_at_least_min_p_times_the_most_likely():
    got = kept(filter_logits(mx.array(LOGITS), top_k=0, top_p=1.0, min_p=0.2))
    p = probs64(LOGITS)
    assert got == [set(np.flatnonzero(row >= 0.2 * row.max()).tolist()) for row in p]


def test_a_row_sampler_draws_from_the_tempered_filtered_distribution():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], dtype=np.float32))
    logprobs = mx.array(logits)
    sampler = RowSampler(SamplingParams(temperature=0.5, top_k=3), row_keys(n=1, seed=0, engine_seed=0, counter=0)[0])
    draws = np.array([sampler(logprobs).item() for _ in range(3000)])
    tempered = probs64(logits / 0.5)[0, :3]
    tempered /= tempered.sum()
    assert 3 not in draws  # outside the top 3
    assert np.abs(np.bincount(draws, minlength=3)[:3] / len(draws) - tempered).max() < 0.03


def test_the_same_key_gives_the_same_samples_and_rows_get_different_keys():
    logprobs = mx.array(LOGITS[:1])
    params = SamplingParams(temperature=1.0)

    def draw(key: mx.array) -> list[int]:
        sampler = RowSampler(params, key)
        return [sampler(logprobs).item() for _ in range(30)]

    a, b = row_keys(n=2, seed=42, engine_seed=0, counter=0)
    a2, _ = row_keys(n=2, seed=42, engine_seed=9, counter=5)  # a request seed ignores the engine's
    assert draw(a) == draw(a2)
    assert draw(a) != draw(b)
    unseeded = [row_keys(n=1, seed=None, engine_seed=0, counter=c)[0].tolist() for c in range(3)]
    assert len({tuple(k) for k in unseeded}) == 3


def test_token_logprobs_are_log_softmax_at_each_rows_temperature():
    x = LOGITS.astype(np.float64)
    lp = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))  # what BatchGenerator hands over (T = 1)
    tokens, temps = [3, 10, 49], [0.0, 0.7, 1.5]
    rows = list(lp.astype(np.float32))
    chosen, top_ids, top_vals, kept = token_logprobs(rows, tokens, temps, 4)
    for i, (token, t) in enumerate(zip(tokens, temps, strict=True)):
        expected = np.log(probs64(LOGITS[i] / (t or 1.0)))
        assert abs(chosen[i] - expected[token]) < 1e-5
        assert top_ids[i] == np.argsort(-expected)[:4].tolist()
        assert np.abs(np.array(top_vals[i]) - np.sort(expected)[::-1][:4]).max() < 1e-5
    assert kept == [0, 0, 0]
    assert token_logprobs(rows, tokens, temps, 0)[1] is None


@pytest.mark.parametrize("filters", [(5, 1.0, 0.0), (0, 0.8, 0.0), (0, 1.0, 0.2), (20, 0.8, 0.05)])
def test_filtered_rows_report_the_kept_sets_distribution_and_its_size(filters):
    """The MLX path's log-probs of a filtered row: renormalised over what filter_logits keeps, in float64."""
    x = LOGITS.astype(np.float64)
    lp = (x - np.log(np.exp(x).sum(axis=-1, keepdims=True))).astype(np.float32)
    temps = [0.7, 1.0, 1.3]
    top_k, top_p, min_p = filters
    for i, t in enumerate(temps):
        keep = np.isfinite(
            np.array(filter_logits(mx.array(LOGITS[i : i + 1] / t), top_k=top_k, top_p=top_p, min_p=min_p))
        )[0]
        token = int(np.flatnonzero(keep)[-1])  # the least likely kept token
        chosen, ids, vals, kept = token_logprobs([lp[i]], [token], [t], 3, [filters])
        z = x[i] / t
        expected = z[token] - np.log(np.exp(z[keep]).sum())
        assert kept == [int(keep.sum())] and 0 < kept[0] < LOGITS.shape[1]
        assert abs(chosen[0] - expected) < 1e-5
        outside = [v for tok, v in zip(ids[0], vals[0], strict=True) if not keep[tok]]
        assert all(v == FILTERED_LOGPROB for v in outside)
