"""One prefill, n independent caches: a row writing its cache never changes another row's (on the tiny 4-bit model,
once per compute path)."""

import paraloop  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import mlx.core as mx

from mlx_lm.models.cache import make_prompt_cache

from paraloop.engine.prefill import fork_cache
from paraloop.model import load_model
from support.compute_paths import CACHE_TOL, assert_within, max_gap


def prefill(model, tokens: list[int], *, step: int) -> list:
    """The prompt's KV cache, computed `step` tokens per forward pass."""
    cache = make_prompt_cache(model)
    for start in range(0, len(tokens), step):
        model(mx.array(tokens[start : start + step])[None], cache=cache)
        mx.eval([c.state for c in cache])
    return cache


def test_forked_caches_hold_the_prompt_and_do_not_share_arrays(tiny_q4_model_path, compute):
    model, tokenizer, _, _ = load_model(tiny_q4_model_path, compute=compute)
    tokens = tokenizer.encode("The capital of France is a city")
    base = prefill(model, tokens, step=4)  # chunked: 4 tokens per forward
    whole = prefill(model, tokens, step=2048)
    a, b = fork_cache(base), fork_cache(base)
    for ca, cb, cw in zip(a, b, whole, strict=True):
        assert ca.offset == cb.offset == len(tokens)
        assert ca.keys is not cb.keys and ca.values is not cb.values
        assert_within(
            f"chunked vs whole prefill keys ({compute})",
            max_gap(ca.keys, cw.keys[..., : cw.offset, :]),
            CACHE_TOL[compute],
        )

    # Decode a different next token in each copy: the other copy keeps the prompt's keys only.
    before = [mx.array(c.keys) for c in b]
    model(mx.array([[5]]), cache=a)
    mx.eval([c.state for c in a])
    for ca, cb, kept in zip(a, b, before, strict=True):
        assert ca.offset == len(tokens) + 1 and cb.offset == len(tokens)
        assert mx.array_equal(cb.keys, kept).item()
