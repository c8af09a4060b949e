"""mlx-lm's batch classes, with every forward pass told which adapter each of its rows uses.

A BatchGenerator keeps a prompt batch (prefill) and a generation batch (decode), each a list of rows (`uids`) that
mlx-lm itself extends, filters, splits and hands from one to the other. Rather than keep a second per-row array in
step with all of that, the adapter positions are read from the batch's own `uids` right before each forward pass:
the model the generator calls is a `Routed` model, which knows each uid's adapter, and `routed(batch)` selects them
(lora_rows.selected) for the pass. Whatever mlx-lm did to the batch, the positions match its rows.

In: the model, a uid -> adapter position function. Out: the batch classes the engine's BatchGenerator uses on the
`mlx-lm` decode path (cpu_decode.py derives the NumPy-sampling ones from them). Runs on the engine thread.
"""

import copy
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import mlx.core as mx
from mlx_lm.generate import GenerationBatch, PromptProcessingBatch
from mlx_lm.models.cache import BatchKVCache

from paraloop.engine.lora_rows import selected
from paraloop.model import Float32Logits


class Routed(Float32Logits):
    """The model a BatchGenerator calls (float32 logits, see Float32Logits), with `rows(uids)` to route one
    forward pass's rows to their adapters; `position_of(uid)` is the row's adapter position."""

    def __init__(self, model: Any, position_of: Callable[[int], int] | None = None) -> None:
        super().__init__(model)
        self.position_of = position_of

    def rows(self, uids: list[int]) -> AbstractContextManager[None]:
        if self.position_of is None:
            return nullcontext()
        return selected([self.position_of(uid) for uid in uids])


def routed(batch: Any) -> AbstractContextManager[None]:
    """Route the forward pass `batch` is about to make (its model's rows, in its row order)."""
    rows = getattr(batch.model, "rows", None)
    return rows(batch.uids) if rows is not None else nullcontext()


GROWTH = 256  # mlx-lm's BatchKVCache.step: the most positions a cache grows by for the tokens still to come


def fit_cache_growth(caches: list[Any], new: int, left: int) -> None:
    """Make the next growth of each layer's BatchKVCache hold `new` positions plus what its rows can still generate.

    mlx-lm's BatchKVCache grows in multiples of 256 positions for every row, so 16 rows of 60-token prompts and
    24-token completions held 16 x 256 positions (SmolLM2 in float32: ~190 MB) where 16 x 85 are used (~60 MB).
    With `step` = new + min(256, left), a growth allocates exactly what the rows can reach (one growth per
    arrival or prompt chunk); `left` is the largest number of tokens a row of the batch may still generate."""
    step = max(1, new + min(GROWTH, max(left, 0)))
    for c in caches:
        if isinstance(c, BatchKVCache):
            c.step = step


def generation_left(batch: Any) -> int:
    return max((m - n for m, n in zip(batch.max_tokens, batch._num_tokens, strict=False)), default=0)


class RoutedGenerationBatch(GenerationBatch):
    def _step(self) -> tuple[list[int], list[Any]]:
        fit_cache_growth(self.prompt_cache, 1, generation_left(self))
        with routed(self):
            return super()._step()


class RoutedPromptBatch(PromptProcessingBatch):
    generation_class: type[GenerationBatch] = RoutedGenerationBatch  # split() keeps the class (it copies it)

    def prompt(self, tokens: list[list[int]]) -> None:
        if tokens:
            fit_cache_growth(self.prompt_cache, max(len(t) for t in tokens), max(self.max_tokens, default=0))
        with routed(self):
            super().prompt(tokens)

    def split(self, indices: list[int]) -> PromptProcessingBatch:
        """mlx-lm's split deep-copies every layer's cache, then filters both copies: for a moment the batch's
        whole KV exists twice. Taking the selected rows out (all of them: the cache moves, no copy) gives the
        same two batches. Other cache kinds keep mlx-lm's way."""
        if not all(isinstance(c, BatchKVCache) for c in self.prompt_cache):
            return super().split(indices)
        indices = sorted(indices)
        keep = sorted(set(range(len(self.uids))) - set(indices))
        caches, self.prompt_cache = self.prompt_cache, []
        new_batch = self._copy()  # copies the row lists; the cache list it deep-copies is empty now
        self.prompt_cache, new_batch.prompt_cache = caches, [copy.copy(c) for c in caches]
        if keep:  # `filter` gives each side its own gathered arrays, so no array is shared afterwards
            new_batch.filter(indices)
            self.filter(keep)
        else:
            self.filter([])  # every row moved: new_batch holds the arrays alone
        return new_batch

    def generate(self, tokens: list[list[int]]) -> GenerationBatch:
        # PromptProcessingBatch.generate, building `generation_class` instead of mlx-lm's GenerationBatch.
        if any(len(t) > 1 for t in tokens):
            self.prompt([t[:-1] for t in tokens])
        generation = self.generation_class(
            self.model,
            self.uids,
            mx.array([t[-1] for t in tokens]),
            self.prompt_cache,
            self.tokens,
            self.samplers,
            self.fallback_sampler,
            self.logits_processors,
            self.stop_sequences,
            self.max_tokens,
        )
        self.uids, self.prompt_cache, self.tokens, self.samplers = [], [], [], []
        self.logits_processors, self.max_tokens = [], []
        return generation
