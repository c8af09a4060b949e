"""The rollout journal: each batch fetched from a source that cannot send it again (Atropos), on disk before it is
used, until every kept checkpoint has trained it.

The Atropos API has no acknowledgement: a batch popped from it exists only inside paraloop. So the fetcher appends
each one here first (written to a hidden temporary file, fsynced, renamed into place, the directory fsynced):

    RUN_DIR/journal/000000000042.msgpack     one fetched batch (messages.RolloutBatch as msgpack)

Each group gets an id (entry, index, the entry's group count). The rollout buffer carries the ids into the learner
batches it forms (RolloutBatch.consumes: every group a batch trains, and every group dropped since the last one),
however it regroups and reorders them. The learner adds them to its `Consumed` set as it steps, and each checkpoint
keeps that set (trainer_state["journal"]). `--resume` puts the groups its checkpoint has not consumed back into the
buffer ahead of anything new, in fetch order: they are trained first, and none twice. After each checkpoint,
entries that every kept checkpoint has consumed are deleted (`prune`), so the journal is bounded by keep_last.
"""

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from paraloop.checkpoint import pid_alive
from paraloop.messages import RolloutBatch

log = logging.getLogger("paraloop.journal")

JOURNAL = "journal"
ENTRY = re.compile(r"(\d{12})\.msgpack")
STAGED = re.compile(r"\.tmp-(\d{12})-(\d+)")


@dataclass
class Consumed:
    """Which journaled groups the learner has trained (or dropped): every group of an entry below `below`, plus
    the listed indices of later entries. Kept in checkpoints as JSON; small, since entries finish in about the
    order they were fetched."""

    below: int = 0
    partial: dict[int, tuple[int, set[int]]] = field(default_factory=dict)  # entry -> (its group count, indices)

    def add(self, ids: list[tuple[int, int, int]] | list[list[int]]) -> None:
        for seq, index, count in ids:
            if seq >= self.below:
                self.partial.setdefault(int(seq), (int(count), set()))[1].add(int(index))
        while self.below in self.partial and len(self.partial[self.below][1]) >= self.partial[self.below][0]:
            del self.partial[self.below]
            self.below += 1

    def entry_done(self, seq: int) -> bool:
        if seq < self.below:
            return True
        total, done = self.partial.get(seq, (1, set()))
        return seq in self.partial and len(done) >= total

    def has(self, seq: int, index: int) -> bool:
        return seq < self.below or index in self.partial.get(seq, (0, set()))[1]

    def to_json(self) -> dict[str, Any]:
        return {
            "below": self.below,
            "partial": {str(s): {"count": c, "done": sorted(d)} for s, (c, d) in sorted(self.partial.items())},
        }

    @classmethod
    def from_json(cls, data: Any) -> "Consumed":
        """Read a checkpoint's journal state; ValueError when it is not one."""
        if not isinstance(data, dict) or not isinstance(data.get("below"), int) or data["below"] < 0:
            raise ValueError(f"not a journal state: {data!r:.200}")
        partial = {}
        for seq, entry in (data.get("partial") or {}).items():
            if not isinstance(entry, dict) or not isinstance(entry.get("count"), int):
                raise ValueError(f"journal state: bad entry {seq!r}")
            partial[int(seq)] = (entry["count"], {int(i) for i in entry.get("done", [])})
        return cls(data["below"], partial)


@dataclass(frozen=True)
class Replay:
    """A journaled batch whose groups at `indices` a resumed run trains first."""

    seq: int
    batch: RolloutBatch
    indices: list[int]


class Journal:
    """RUN_DIR/journal. Synchronous file work: call it off the event loop (anyio.to_thread)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir) / JOURNAL
        self.dir.mkdir(parents=True, exist_ok=True)
        for entry in self.dir.iterdir():  # writes that died half way
            staged = STAGED.fullmatch(entry.name)
            if staged and not pid_alive(int(staged[2])):
                entry.unlink(missing_ok=True)
        self._sizes = {seq: self.path(seq).stat().st_size for seq in self.entries()}
        self.next_seq = max(self._sizes, default=-1) + 1
        self.counts = {"appended": 0, "replayed_groups": 0, "pruned": 0, "errors": 0}
        self.last_error: str | None = None

    def path(self, seq: int) -> Path:
        return self.dir / f"{seq:012d}.msgpack"

    def entries(self) -> list[int]:
        return sorted(int(m[1]) for p in self.dir.iterdir() if (m := ENTRY.fullmatch(p.name)))

    def append(self, batch: RolloutBatch) -> int:
        """Write `batch` durably; return its entry number. Raises OSError (disk full, read-only)."""
        seq = self.next_seq
        tmp = self.dir / f".tmp-{seq:012d}-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                f.write(msgspec.msgpack.encode(batch))
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, self.path(seq))
            _fsync_dir(self.dir)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if isinstance(e, OSError):
                self.counts["errors"] += 1
                self.last_error = f"{type(e).__name__}: {e}"
            raise
        self.next_seq = seq + 1
        self._sizes[seq] = self.path(seq).stat().st_size
        self.counts["appended"] += 1
        self.last_error = None
        return seq

    def read(self, seq: int) -> RolloutBatch:
        return msgspec.msgpack.decode(self.path(seq).read_bytes(), type=RolloutBatch)

    def unconsumed(self, consumed: Consumed) -> list[Replay]:
        """The groups `consumed` has not seen, entry by entry in fetch order. A damaged entry is logged and left."""
        out = []
        for seq in self.entries():
            if consumed.entry_done(seq):
                continue
            try:
                batch = self.read(seq)
            except (OSError, msgspec.DecodeError, msgspec.ValidationError) as e:
                log.error("journal entry %s cannot be read (%s): its groups are not replayed", self.path(seq), e)
                continue
            indices = [i for i in range(len(batch.groups)) if not consumed.has(seq, i)]
            if indices:
                out.append(Replay(seq, batch, indices))
        return out

    def adopt(self, other: "Journal", consumed: Consumed) -> int:
        """A run resumed from another run's checkpoint: copy that run's entries `consumed` has not finished here
        (same numbers), so they are replayed and stay safe. Returns how many were copied."""
        if other.dir.resolve() == self.dir.resolve():
            return 0
        copied = 0
        for seq in other.entries():
            if consumed.entry_done(seq) or self.path(seq).exists():
                continue
            tmp = self.dir / f".tmp-{seq:012d}-{os.getpid()}"
            data = other.path(seq).read_bytes()
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, self.path(seq))
            self._sizes[seq] = len(data)
            copied += 1
        if copied:
            _fsync_dir(self.dir)
            self.next_seq = max(self.next_seq, max(self._sizes) + 1)
            log.info("copied %d unconsumed journal entries from %s", copied, other.dir)
        return copied

    def prune(self, kept: list[Consumed]) -> int:
        """Delete the entries that every kept checkpoint (`kept`: their journal states) has consumed, so each of
        them can still be resumed exactly. Returns how many went."""
        removed = 0
        for seq in self.entries() if kept else []:
            if all(consumed.entry_done(seq) for consumed in kept):
                self.path(seq).unlink(missing_ok=True)
                self._sizes.pop(seq, None)
                removed += 1
        if removed:
            _fsync_dir(self.dir)
        self.counts["pruned"] += removed
        return removed

    def stats(self) -> dict[str, Any]:
        sizes = self._sizes.copy()  # written by the file thread, read by /control/status
        return {**self.counts, "entries": len(sizes), "bytes": sum(sizes.values()), "last_error": self.last_error}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
