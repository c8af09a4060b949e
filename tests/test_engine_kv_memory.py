"""The engine's KV cache holds what its rows can reach: mlx-lm's batch cache grows 256 positions at a time and
copies the whole prompt batch when rows move to decoding; the engine's batches (engine/batches.py) grow by a
row's prompt and remaining tokens, and move rows without the copy. Outputs stay those of each prompt alone."""

import paraloop  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import mlx.core as mx
import pytest
from mlx_lm.models.cache import BatchKVCache

from paraloop.engine.cpu_decode import make_generator
from paraloop.model import Float32Logits, load_model

PROMPTS = [[5, 9, 14, 3, 7, 11, 2, 8, 6, 4], [12, 30, 7, 7, 19, 2, 40, 3, 5, 9, 1, 17, 22, 8, 13, 6, 27]]


@pytest.fixture(scope="module")
def model(tiny_model_path):
    return Float32Logits(load_model(tiny_model_path)[0])


def greedy(logits: mx.array) -> mx.array:
    return mx.argmax(logits, axis=-1)


def run(model, prompts: list[list[int]], max_tokens: int, **kwargs) -> tuple[dict[int, list[int]], int]:
    """Greedy tokens per prompt, and the most positions any layer's batch cache held at once."""
    gen = make_generator(model, numpy_sampling=False, sampler=greedy, **kwargs)
    uids = gen.insert(prompts, max_tokens=[max_tokens] * len(prompts))
    tokens: dict[int, list[int]] = {u: [] for u in uids}
    most = 0
    for _ in range(200):
        _, responses = gen.next()
        for r in responses:
            tokens[r.uid].append(r.token)
        for batch in (gen._prompt_batch, gen._generation_batch):
            for c in batch.prompt_cache:
                if isinstance(c, BatchKVCache) and c.keys is not None:
                    most = max(most, c.keys.shape[2])
        if all(len(t) == max_tokens for t in tokens.values()):
            break
    gen.close()
    return {i: tokens[u] for i, u in enumerate(uids)}, most


def test_a_batch_cache_holds_the_prompt_and_the_tokens_still_to_come_not_256_positions(model):
    _, most = run(model, [PROMPTS[0]] * 4, max_tokens=6)
    assert most <= len(PROMPTS[0]) + 6  # mlx-lm's own growth held 256


def test_rows_that_finish_prefill_first_leave_the_batch_and_decode_as_if_alone(model):
    # prefill_step_size 4: the short prompt moves to decoding while the long one is still prefilled (a split
    # that keeps rows), then the long one follows (a split that moves every row).
    together, most = run(model, PROMPTS, max_tokens=8, prefill_step_size=4)
    for i, prompt in enumerate(PROMPTS):
        alone, _ = run(model, [prompt], max_tokens=8, prefill_step_size=4)
        assert together[i] == alone[0]
    assert most <= max(len(p) for p in PROMPTS) + 8 + 4  # a growth holds one prompt chunk + the tokens to come
