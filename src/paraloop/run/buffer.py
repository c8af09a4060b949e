"""The rollout buffer: scored groups in, learner batches out, between the rollout fetcher and the learner.

In: ScoredGroups (`put`, `put_batch`). Out: RolloutBatches (`take`) of exactly `batch_size` sequences, as Atropos
counts them, groups never split; a batch closes early only when the next group would push it over
`max_batch_tokens` (padded: rows x longest row, what the learner's forward costs). Order: `fifo` (arrival) or
`abs_advantage` (most GRPO signal first, ties by arrival). Staleness: given the adapter version now training,
groups whose oldest token is more than `max_staleness` versions older are dropped (`stale_policy="drop"`, counted
in the next batch's `dropped_stale`) or kept and counted as capped (`"cap"`: the learner caps their importance
weights). Bounded: past `max_groups` the oldest group is dropped and counted.

Dynamic sampling (DAPO, `drop_zero_signal`): a group whose scores are all equal carries no GRPO signal and is
held back in a small reserve (the newest ones, at most one batch's worth) instead of the queue; the caller keeps
drawing rollouts, and once it gives up (`take(fill=True)`) the batch is completed from that reserve. Each batch
reports in `metrics` how many zero-signal groups were held back for it and how many filled it.

Journal ids (run/journal.py): a group put with an id keeps it; each batch taken lists in `consumes` the ids of
its groups and of every group dropped since the previous batch (a reserved zero-signal group only once it leaves
the reserve), so the learner can mark exactly those consumed. Groups put back from the journal by a resumed run
(`replayed=True`) come before every other group, in any order.

A plain synchronous class: the runtime owns it from one task, so it needs no lock; the same puts and takes give
the same batches.
"""

import itertools
import logging
import math
from collections import deque
from dataclasses import dataclass

from paraloop.config import BufferPriority, Staleness, StalePolicy, check_choice
from paraloop.messages import PROMPT_MASK, RolloutBatch, ScoredGroup

log = logging.getLogger("paraloop.buffer")


def too_stale(group: ScoredGroup, version: int, max_staleness: int | None) -> bool:
    """The staleness rule: a group is too stale for the adapter `version` now training when its oldest token came
    from more than `max_staleness` versions before it. Groups of unknown version (Atropos rows the engine's served
    index did not find) never are."""
    return max_staleness is not None and bool(group.versions) and version - min(group.versions) > max_staleness


def signal(group: ScoredGroup) -> float:
    """Mean |advantage| of a group: per-token advantages when the environment sent them (over trained tokens),
    else the mean absolute deviation of its scores from their mean. A group of equal scores gives 0: GRPO learns
    nothing from it. Deviations are not divided by the group's std, since after that every group with any spread
    scores about the same."""
    if group.advantages:
        values = [
            abs(a)
            for row, mask in zip(group.advantages, group.masks, strict=False)
            for a, m in zip(row, mask, strict=False)
            if m != PROMPT_MASK
        ]
        return math.fsum(values) / len(values) if values else 0.0
    scores = group.scores
    if not scores or max(scores) == min(scores):
        return 0.0
    mean = math.fsum(scores) / len(scores)
    return math.fsum(abs(s - mean) for s in scores) / len(scores)


@dataclass(frozen=True)
class _Entry:
    arrival: int
    group: ScoredGroup
    priority: float
    source: str
    source_step: int | None
    source_state: dict | None = None
    journal_id: tuple[int, int, int] | None = None
    replayed: bool = False

    @property
    def sequences(self) -> int:
        return len(self.group.tokens)

    @property
    def longest(self) -> int:
        return max((len(t) for t in self.group.tokens), default=0)


class RolloutBuffer:
    """See the module docstring. `stats()` counts everything that came in and how it left."""

    def __init__(
        self,
        *,
        batch_size: int,
        max_batch_tokens: int | None = None,
        priority: BufferPriority = "fifo",
        max_staleness: int | None = None,
        stale_policy: StalePolicy = "drop",
        drop_zero_signal: bool = False,
        max_groups: int = 1024,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1 or None, got {max_batch_tokens}")
        check_choice("priority", priority, BufferPriority)
        check_choice("stale_policy", stale_policy, StalePolicy)
        if max_staleness is not None and max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0 or None, got {max_staleness}")
        if max_groups < 1:
            raise ValueError(f"max_groups must be >= 1, got {max_groups}")
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.priority = priority
        self.staleness = Staleness(max_staleness, stale_policy)
        self.drop_zero_signal = drop_zero_signal
        self.max_groups = max_groups
        self._entries: dict[int, _Entry] = {}  # by arrival; dicts keep insertion (= arrival) order
        self._arrivals = itertools.count()
        self._stale_since_take = 0
        self._reserve: deque[_Entry] = deque(maxlen=batch_size)  # zero-signal groups, newest kept
        self._zero_since_take = 0
        self._dropped_ids: list[tuple[int, int, int]] = []  # journal ids dropped since the last take
        self._counts = dict.fromkeys(
            (
                "received",
                "taken",
                "batches",
                "dropped_stale",
                "capped_stale",
                "dropped_overflow",
                "dropped_zero_signal",
                "filled_zero_signal",
            ),
            0,
        )

    def __len__(self) -> int:
        """Groups held."""
        return len(self._entries)

    @property
    def sequences(self) -> int:
        return sum(e.sequences for e in self._entries.values())

    def stats(self) -> dict[str, int]:
        return {**self._counts, "groups": len(self), "sequences": self.sequences}

    # --- in ---------------------------------------------------------------------------------------------------------

    def put(
        self,
        group: ScoredGroup,
        *,
        source: str = "mock",
        source_step: int | None = None,
        source_state: dict | None = None,
        journal_id: tuple[int, int, int] | None = None,
        replayed: bool = False,
    ) -> bool:
        """Hold `group`; False when it was set aside for carrying no signal (dynamic sampling: into the reserve).
        Past max_groups the oldest goes. `journal_id`: the group's id in the run's journal; `replayed`: put back by
        a resumed run (taken first)."""
        if len(group.tokens) > self.batch_size:
            raise ValueError(
                f"a group of {len(group.tokens)} sequences can never fit a batch of {self.batch_size} "
                "(groups are never split): use a group size that divides the batch size"
            )
        self._counts["received"] += 1
        priority = signal(group)
        arrival = next(self._arrivals)
        entry = _Entry(arrival, group, priority, source, source_step, source_state, journal_id, replayed)
        if self.drop_zero_signal and priority == 0.0:
            self._counts["dropped_zero_signal"] += 1
            self._zero_since_take += 1
            if len(self._reserve) == self._reserve.maxlen:  # the oldest reserved group makes room
                self._dropped(self._reserve.popleft().journal_id)
            self._reserve.append(entry)
            return False
        self._entries[arrival] = entry
        while len(self._entries) > self.max_groups:
            self._dropped(self._entries.pop(next(iter(self._entries))).journal_id)
            self._counts["dropped_overflow"] += 1
        return True

    def put_batch(self, batch: RolloutBatch, *, journal_seq: int | None = None) -> int:
        """Hold every group of `batch` (journal entry `journal_seq`, if journaled); returns how many were kept."""
        self._stale_since_take += batch.dropped_stale  # drops upstream still reach the learner's metrics
        count = len(batch.groups)
        return sum(
            self.put(
                g,
                source=batch.source,
                source_step=batch.source_step,
                source_state=batch.source_state,
                journal_id=None if journal_seq is None else (journal_seq, i, count),
            )
            for i, g in enumerate(batch.groups)
        )

    def _dropped(self, journal_id: tuple[int, int, int] | None) -> None:
        if journal_id is not None:
            self._dropped_ids.append(journal_id)

    # --- out --------------------------------------------------------------------------------------------------------

    def prune(self, version: int) -> int:
        """Drop groups too stale for the adapter `version` now training (policy "drop"); returns how many."""
        if not self.staleness.drops:
            return 0
        stale = [e.arrival for e in self._entries.values() if self._is_stale(e, version)]
        for arrival in stale:
            self._dropped(self._entries.pop(arrival).journal_id)
        self._counts["dropped_stale"] += len(stale)
        self._stale_since_take += len(stale)
        if stale:
            log.info(
                "dropped %d rollout group(s) more than %d versions older than adapter %d: more are fetched",
                len(stale),
                self.staleness.max_versions,
                version,
            )
        return len(stale)

    def _is_stale(self, entry: _Entry, version: int) -> bool:
        return too_stale(entry.group, version, self.staleness.max_versions)

    def ordered(self) -> list[_Entry]:
        """Groups in the order batches take them."""
        entries = list(self._entries.values())
        if self.priority == "abs_advantage":
            entries.sort(key=lambda e: (-e.priority, e.arrival))
        return sorted(entries, key=lambda e: not e.replayed)  # stable: replayed groups first, each kind in order

    def take(self, *, version: int | None = None, partial: bool = False, fill: bool = False) -> RolloutBatch | None:
        """The next learner batch, or None while the held groups cannot fill one (they stay).

        `version`: the adapter version now training (None: no staleness check). `partial`: return whatever fits
        instead of None (e.g. to drain at the end of a run). `fill`: complete the batch with reserved zero-signal
        groups (dynamic sampling gave up drawing).
        """
        if version is not None:
            self.prune(version)
            while self._reserve and self._is_stale(self._reserve[0], version) and self.staleness.drops:
                self._dropped(self._reserve.popleft().journal_id)
        chosen: list[_Entry] = []
        rows = longest = 0
        over_budget = False
        candidates = self.ordered() + (list(self._reserve) if fill else [])
        for entry in candidates:
            if rows + entry.sequences > self.batch_size:
                continue  # a smaller group later in the order may still fit exactly
            new_longest = max(longest, entry.longest)
            budget = self.max_batch_tokens
            if budget is not None and chosen and (rows + entry.sequences) * new_longest > budget:
                over_budget = True
                continue
            chosen.append(entry)
            rows, longest = rows + entry.sequences, new_longest
            if rows == self.batch_size:
                break
        budget_full = over_budget or (self.max_batch_tokens is not None and rows * longest >= self.max_batch_tokens)
        if not chosen or (rows < self.batch_size and not budget_full and not partial and not fill):
            return None
        reserved = {e.arrival for e in chosen if e.arrival not in self._entries}
        for entry in chosen:
            self._entries.pop(entry.arrival, None)
        if reserved:
            self._reserve = deque((e for e in self._reserve if e.arrival not in reserved), maxlen=self.batch_size)
        filled = len(reserved)
        self._counts["filled_zero_signal"] += filled
        if version is not None:  # only "cap" leaves stale groups to take
            self._counts["capped_stale"] += sum(self._is_stale(e, version) for e in chosen)
        self._counts["taken"] += len(chosen)
        self._counts["batches"] += 1
        dropped, self._stale_since_take = self._stale_since_take, 0
        zero, self._zero_since_take = self._zero_since_take, 0
        consumes, self._dropped_ids = self._dropped_ids, []
        consumes += [e.journal_id for e in chosen if e.journal_id is not None]
        steps = [e.source_step for e in chosen if e.source_step is not None]
        return RolloutBatch(
            groups=[e.group for e in chosen],
            source=chosen[0].source,
            source_step=max(steps) if steps else None,
            dropped_stale=dropped,
            # The source's position after the newest group taken: exact for fifo batches (resume starts after them).
            source_state=max(chosen, key=lambda e: e.arrival).source_state,
            metrics={"zero_signal_groups": float(zero), "filled_zero_signal": float(filled)}
            if self.drop_zero_signal
            else {},
            consumes=consumes,
        )
