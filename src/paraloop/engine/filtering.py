"""What a row samples from: its effective temperature and the tokens its filters keep (shared by both samplers).

In: a row's SamplingParams and its tempered logits. Out: the temperature it samples at (greedy below GREEDY_BELOW),
the kept set of top-k, top-p and min-p (vLLM's order, on the tempered distribution) as a mask, that set's
normaliser, and the seed an unseeded row's PRNG starts from. The MLX sampler (sampling.py) and the NumPy one
(cpu_decode.py) both import this module, and neither imports the other; samplers.py picks between them.
"""

import numpy as np

from paraloop.messages import SamplingParams

_GOLDEN = 0x9E3779B97F4A7C15  # spreads (engine seed, counter) over 64 bits
GREEDY_BELOW = 1e-5  # temperatures under this sample greedily, as vLLM does (1/T would overflow float32 soon after)
MAX_TEMPERATURE = 100.0  # above this every distribution is uniform to float32 precision, and 1e39 overflows it
NUCLEUS_FIRST = 64  # filter_row's first guess at a top-p nucleus size (grown 8x until it holds top_p's mass)
FILTERED_LOGPROB = -9999.0  # an alternative outside the kept set (probability 0): vLLM's JSON stand-in for -inf

Filters = tuple[int, float, float]  # (top_k, top_p, min_p) of a row that samples with at least one of them


def effective_temperature(temperature: float) -> float:
    """The temperature a row samples at: 0 (greedy) for anything below GREEDY_BELOW."""
    return 0.0 if temperature < GREEDY_BELOW else temperature


def unseeded_seed(engine_seed: int, counter: int) -> int:
    """The 64-bit seed of the `counter`-th PRNG an engine makes for rows without a request seed."""
    return (engine_seed * _GOLDEN + counter) % 2**64


def row_filters(params: SamplingParams) -> Filters | None:
    """The filters a row samples with, or None (greedy rows and unfiltered ones sample the full vocabulary)."""
    if effective_temperature(params.temperature) == 0:
        return None
    if params.top_k > 0 or params.top_p < 1.0 or params.min_p > 0.0:
        return (params.top_k, params.top_p, params.min_p)
    return None


def filter_row(z: np.ndarray, *, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """The tokens top-k, top-p (nucleus) and min-p keep, as a bool mask over one row of tempered logits `z`
    (vLLM's order, as filter_logits)."""
    vocab = z.shape[0]
    keep = np.ones(vocab, bool)
    if 0 < top_k < vocab:
        keep &= z >= np.partition(z, vocab - top_k)[vocab - top_k]
    if top_p < 1.0:
        masked = np.where(keep, z, -np.inf)
        p = np.exp(masked - masked.max())
        p /= p.sum()
        # Sort only the most likely `m` tokens, m growing until their mass reaches top_p (the nucleus is a prefix
        # of the descending order): O(vocab) per row instead of a full sort, where nuclei are usually small.
        m = min(vocab, NUCLEUS_FIRST)
        while True:
            top = np.argpartition(-p, m - 1)[:m] if m < vocab else np.arange(vocab)
            order = top[np.argsort(-p[top], kind="stable")]
            mass = np.cumsum(p[order], dtype=np.float64)
            if m == vocab or mass[-1] >= top_p:
                break
            m = min(vocab, m * 8)
        before = mass - p[order]  # mass of the more likely tokens
        nucleus = np.zeros(vocab, bool)
        nucleus[order[before < top_p]] = True
        nucleus[order[0]] = True  # the most likely token always survives (whatever top_p's float rounding)
        keep &= nucleus
    if min_p > 0.0:
        masked = np.where(keep, z, -np.inf)
        keep &= z >= masked.max() + np.log(min_p)
    return keep


def kept_logsumexp(z: np.ndarray, keep: np.ndarray) -> float:
    """log sum_{kept} exp(z), summed in float64: the normaliser of the distribution a filtered row samples from."""
    peak = float(z[keep].max())
    return peak + float(np.log(np.exp(z[keep] - peak).sum(dtype=np.float64)))
