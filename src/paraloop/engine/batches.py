"""mlx-lm's batch classes, with every forward pass told which adapter each of its rows uses.

A BatchGenerator keeps a prompt batch (prefill) and a generation batch (decode), each a list of rows (`uids`) that
mlx-lm itself extends, filters, splits and hands from one to the other. Rather than keep a second per-row array in
step with all of that, the adapter positions are read from the batch's own `uids` right before each forward pass:
the model the generator calls is a `Routed` model, which knows each uid's adapter, and `routed(batch)` selects them
(lora_rows.selected) for the pass. Whatever mlx-lm did to the batch, the positions match its rows.

In: the model, a uid -> adapter position function. Out: the batch classes the engine's BatchGenerator uses on the
`mlx-lm` decode path (cpu_decode.py derives the NumPy-sampling ones from them). Runs on the engine thread.
"""

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import mlx.core as mx
from mlx_lm.generate import GenerationBatch, PromptProcessingBatch

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


class RoutedGenerationBatch(GenerationBatch):
    def _step(self) -> tuple[list[int], list[Any]]:
        with routed(self):
            return super()._step()


class RoutedPromptBatch(PromptProcessingBatch):
    generation_class: type[GenerationBatch] = RoutedGenerationBatch  # split() keeps the class (it copies it)

    def prompt(self, tokens: list[list[int]]) -> None:
        with routed(self):
            super().prompt(tokens)

    def generate(self, tokens: list[list[int]]) -> GenerationBatch:
        # PromptProcessingBatch.generate, building `generation_class` instead of mlx-lm's GenerationBatch.
        if any(len(t) > 1 for t in tokens):
            self.prompt([t[:-1] for t in tokens])
        generation = self.generation_class(
            self.model, self.uids, mx.array([t[-1] for t in tokens]), self.prompt_cache, self.tokens, self.samplers,
            self.fallback_sampler, self.logits_processors, self.stop_sequences, self.max_tokens,
        )  # fmt: skip
        self.uids, self.prompt_cache, self.tokens, self.samplers = [], [], [], []
        self.logits_processors, self.max_tokens = [], []
        return generation
