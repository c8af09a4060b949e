"""Which policy version produced each completion the engine served, found again by token ids.

An Atropos environment samples through paraloop's HTTP routes, scores, and queues groups in the Atropos API; they
come back to the learner later, without versions (Atropos groups carry none). The engine knows the version of
every token it served: `ServedIndex` keeps, for the most recent `capacity` policy completions, a 16-byte digest
of prompt + completion ids -> (oldest version among its tokens, kept-set sizes of its tokens). The fetcher then
looks every trained segment of a fetched row up by the digest of the row's tokens up to that segment's end, and
gives the row the oldest version found (and the kept sets, for sampling-mask replay).

A completion that ended on a stop token is also indexed without it (an environment may drop the EOS). Memory:
about 200 bytes per entry plus the kept sizes of filtered completions (4 bytes per token); least recently recorded
entries go first. A row none of whose segments is found (an environment that retokenised the text, or a completion
served longer ago than the index holds) has no version, and a group with such a row keeps `versions` None (no
guessing): staleness rules cannot see it, and the fetcher counts its rows as unknown.
"""

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import msgspec
import numpy as np

from paraloop.engine.worker import NO_TOKEN
from paraloop.messages import PROMPT_MASK, ScoredGroup, TokenEvent


@dataclass(frozen=True, slots=True)
class Served:
    version: int  # the oldest adapter version among the completion's tokens
    length: int  # completion tokens
    kept: tuple[int, ...] | None  # kept-set size per completion token (None: all from the full vocabulary)


def digest(tokens: list[int] | np.ndarray) -> bytes:
    return hashlib.blake2b(np.asarray(tokens, np.int64).tobytes(), digest_size=16).digest()


def trained_segments(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of trained positions (mask != -100)."""
    trained = np.asarray(mask) != PROMPT_MASK
    edges = np.flatnonzero(np.diff(np.concatenate([[False], trained, [False]]).astype(np.int8)))
    return [(int(s), int(e)) for s, e in zip(edges[::2], edges[1::2], strict=True)]


class ServedIndex:
    """A bounded LRU of served policy completions by digest (module docstring). Used from the event loop only."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[bytes, Served] = OrderedDict()
        self.recorded = 0

    def __len__(self) -> int:
        return len(self._entries)

    def record(
        self, prompt: list[int], tokens: list[int], versions: list[int], kept: list[int], *, stopped: bool
    ) -> None:
        """A finished policy completion: its prompt's and its own ids, each token's version and kept-set size."""
        if not tokens:
            return
        entry = Served(min(versions), len(tokens), tuple(kept) if any(kept) else None)
        sequence = [*prompt, *tokens]
        self._put(digest(sequence), entry)
        if stopped and len(tokens) > 1:
            trimmed = Served(entry.version, entry.length - 1, None if entry.kept is None else entry.kept[:-1])
            self._put(digest(sequence[:-1]), trimmed)
        self.recorded += 1

    def _put(self, key: bytes, entry: Served) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def annotate(self, group: ScoredGroup) -> tuple[ScoredGroup, int]:
        """The group with `versions` (oldest found per row) and `sampling_kept` filled from the index where the
        environment sent none; returns it and how many of its rows were found."""
        if group.versions is not None:
            return group, len(group.tokens)
        versions: list[int | None] = []
        kept_rows: list[list[int]] = []
        for tokens, mask in zip(group.tokens, group.masks, strict=True):
            found: list[int] = []
            kept = [0] * len(tokens)
            for _, end in trained_segments(mask):
                entry = self._entries.get(digest(tokens[:end]))
                if entry is None:
                    continue
                found.append(entry.version)
                if entry.kept is not None:
                    kept[end - entry.length : end] = entry.kept
            versions.append(min(found) if found else None)
            kept_rows.append(kept)
        known = sum(v is not None for v in versions)
        update: dict = {}
        if known == len(versions):  # a group with a row of unknown version stays unknown: no guessed versions
            update["versions"] = [int(v) for v in versions if v is not None]
        if known and group.sampling_kept is None and any(any(k) for k in kept_rows):
            update["sampling_kept"] = kept_rows
        return (msgspec.structs.replace(group, **update) if update else group), known


class Recorder:
    """Collects one request's rows as their TokenEvents pass and records each finished row in the index."""

    def __init__(self, index: ServedIndex, prompt: list[int]) -> None:
        self.index, self.prompt = index, prompt
        self._rows: dict[int, tuple[list[int], list[int], list[int]]] = {}

    def add(self, event: TokenEvent) -> None:
        if event.token != NO_TOKEN:
            tokens, versions, kept = self._rows.setdefault(event.row, ([], [], []))
            tokens.append(event.token)
            versions.append(event.version)
            kept.append(event.kept)
        if event.finish_reason in ("stop", "length"):
            tokens, versions, kept = self._rows.pop(event.row, ([], [], []))
            self.index.record(self.prompt, tokens, versions, kept, stopped=event.finish_reason == "stop")
