"""Many processes, one run: MLX's distributed group as paraloop uses it (no run wiring here: run/ranks.py).

`Ranks` wraps mx.distributed's global group (ring over TCP, JACCL over Thunderbolt RDMA, NCCL on CUDA, MPI) with
the few collectives data parallelism needs. Each is a blocking call on the learner's MLX thread, and every rank
must issue the same collectives in the same order:

    reduce(grads, sums, mins, maxs)   the trainer's gradient tree and loss statistics, summed over ranks
    table(row)                        one small int64 row per rank -> the (size, F) table, on every rank
    gather(blob)                      bytes from every rank -> the list of them, on every rank
    broadcast(blob)                   rank 0's bytes -> every rank
    differing(digest)                 the ranks whose digest differs from rank 0's

`Single` is the same interface for one process (nothing moves). `share(lengths)` splits a batch's rows between the
ranks by tokens, identically on every rank; the trainer trains its share and sums the rest through `reduce`.

A collective blocks until every rank joins. A peer that dies closes its sockets and MLX raises; one that hangs or
is cut off blocks the call forever. So each collective records itself in `in_flight` for the run's watcher
(run/ranks.py), which ends the process when a deadline passes or a peer stops answering, and `fail(reason)` makes
every later collective raise at once.
"""

import hashlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

BUCKET_BYTES = 32 * 1024 * 1024  # gradients are summed in buckets of about this size (as mlx.nn.average_gradients)
LAUNCH_VARIABLES = ("MLX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")  # set by mlx.launch / mpirun for each rank


class PeerLost(RuntimeError):
    """A collective failed or cannot finish: a rank died, hung or cannot be reached. The run ends (exit 1)."""


class RanksDiverged(RuntimeError):
    """The ranks' adapters (or optimizer states) are no longer identical. The run ends (exit 1)."""


def launched() -> bool:
    """True when a distributed launcher (mlx.launch, paraloop launch, mpirun) started this process as one rank."""
    return any(name in os.environ for name in LAUNCH_VARIABLES)


def launch_rank() -> int:
    """This process's rank as the launcher set it (0 when not launched), known before the group connects."""
    for name in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def share(lengths: np.ndarray, rank: int, size: int) -> np.ndarray:
    """(N,) bool: the rows `rank` trains. Longest rows first, each to the rank with the fewest tokens so far (ties:
    the lowest rank), so every rank computes about the same and all ranks compute the same split. Rows of length 0
    (nothing to train) go to no rank."""
    lengths = np.asarray(lengths)
    mine = np.zeros(lengths.shape[0], bool)
    if size == 1:
        mine[:] = lengths > 0
        return mine
    load = np.zeros(size, np.int64)
    for row in np.argsort(-lengths, kind="stable"):
        if lengths[row] <= 0:
            break
        owner = int(np.argmin(load))
        load[owner] += int(lengths[row])
        mine[row] = owner == rank
    return mine


def chunk(count: int, rank: int, size: int) -> range:
    """Rank `rank`'s contiguous part of `count` items (the first `count % size` ranks get one more), so the
    parts in rank order are 0..count-1 in order."""
    base, extra = divmod(count, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def digest(tree: dict[str, Any]) -> str:
    """sha256 over a flat dict of arrays (names, dtypes, shapes, bytes): equal iff the arrays are bitwise equal."""
    h = hashlib.sha256()
    for name, value in sorted(tree_flatten(tree)):
        a = value if isinstance(value, mx.array) else mx.array(value)
        h.update(f"{name}|{a.dtype}|{tuple(a.shape)}|".encode())
        h.update(memoryview(_bytes_of(a)))
    return h.hexdigest()


def _bytes_of(a: mx.array) -> np.ndarray:
    return np.array(a.reshape(-1).view(mx.uint8)) if a.size else np.zeros(0, np.uint8)


def pack_tree(tree: dict[str, Any]) -> dict[str, Any]:
    """A flat dict of mx arrays and JSON-able leaves -> msgpack-able, bitwise (bfloat16 and -0.0 included)."""
    out = {}
    for name, value in tree_flatten(tree):
        if isinstance(value, (mx.array, np.ndarray)):
            a = mx.array(value) if isinstance(value, np.ndarray) else value
            out[name] = {
                "dtype": str(a.dtype).rsplit(".", 1)[-1],
                "shape": list(a.shape),
                "data": _bytes_of(a).tobytes(),
            }
        else:
            out[name] = {"value": value}
    return out


def unpack_tree(packed: dict[str, Any]) -> dict[str, Any]:
    """The inverse of pack_tree: a flat dict of mx arrays (and leaves)."""
    out = {}
    for name, item in packed.items():
        if "value" in item:
            out[name] = item["value"]
            continue
        dtype = getattr(mx, item["dtype"])
        raw = mx.array(np.frombuffer(item["data"], np.uint8))
        out[name] = raw.view(dtype).reshape(item["shape"])
    return out


@dataclass(frozen=True)
class InFlight:
    seq: int
    name: str
    started: float  # time.monotonic()


class Single:
    """One process: the trainer's reducer when nothing is distributed."""

    rank, size = 0, 1

    def share(self, lengths: np.ndarray) -> np.ndarray:
        return share(lengths, 0, 1)

    def reduce(self, grads: Any, sums: dict[str, float], mins: dict[str, float], maxs: dict[str, float]) -> tuple:
        return grads, sums, mins, maxs

    def table(self, row: np.ndarray, name: str = "table") -> np.ndarray:
        del name
        return np.asarray(row, np.int64).reshape(1, -1)


def keep_clear_cache_out_of_collectives() -> None:
    """Make mx.clear_cache a no-op in this process.

    clear_cache first synchronizes every CPU stream, including the one where a collective waits for its peers, and
    it holds the GIL while it waits. mlx-lm's BatchGenerator calls it every so many decode steps on the engine
    thread; called while the learner's collective waits for a rank that hangs, it freezes the whole process (the
    event loop cannot take the GIL), so the watcher that would end the run never runs. Skipping it only leaves freed
    buffers in MLX's cache, which MLX's cache limit bounds (`mx.set_cache_limit`)."""
    mx.clear_cache = _no_clear_cache


def _no_clear_cache() -> None:
    """mx.clear_cache in a distributed run (see keep_clear_cache_out_of_collectives)."""


class Ranks:
    """This process's place in the group and its collectives; see the module docstring."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self.seq = 0  # collectives issued so far: equal on every rank between collectives
        self.in_flight: InFlight | None = None  # read by the watcher on the event loop
        self.blame: Callable[[], str] = lambda: ""  # which peers look lost (the watcher's heartbeats)
        self.blame_wait = 0.0  # seconds a failed collective waits for `blame` to name someone
        self._lock = threading.Lock()
        self._failed: str | None = None
        self.reduce_s = 0.0  # seconds spent in reduce (gradients + statistics), for the benchmark
        self.reduce_bytes = 0  # bytes each rank contributed to reduce

    @classmethod
    def connect(cls, backend: str = "any") -> "Ranks":
        """Join the group the launcher described (blocks until every rank has joined: run it under a deadline)."""
        ranks = cls(mx.distributed.init(strict=True, backend=backend))
        if ranks.size > 1:
            keep_clear_cache_out_of_collectives()
        return ranks

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def fail(self, reason: str) -> bool:
        """Make every later collective raise PeerLost(reason). Returns True when one is in flight now (its
        thread is blocked in it, and only the end of the process gets it out)."""
        with self._lock:
            self._failed = self._failed or reason
            return self.in_flight is not None

    def _collective(self, name: str, fn: Callable[[], Any]) -> Any:
        with self._lock:
            if self._failed:
                raise PeerLost(self._failed)
            self.seq += 1
            self.in_flight = InFlight(self.seq, name, time.monotonic())
        try:
            out = fn()
            mx.eval(out)
            return out
        except RuntimeError as e:  # MLX: "[ring] connection to a peer was lost" and the like
            self.fail(f"collective {name} #{self.seq} failed: {e}")
            deadline = time.monotonic() + self.blame_wait
            while not (blame := self.blame()) and time.monotonic() < deadline:
                time.sleep(0.1)  # the heartbeats find out which peer went away
            raise PeerLost(
                f"collective {name} #{self.seq} failed on rank {self.rank}: {e}" + (f" ({blame})" if blame else "")
            ) from None
        finally:
            self.in_flight = None

    # --- the trainer's reducer ---------------------------------------------------------------------------------

    def share(self, lengths: np.ndarray) -> np.ndarray:
        return share(lengths, self.rank, self.size)

    def reduce(self, grads: Any, sums: dict[str, float], mins: dict[str, float], maxs: dict[str, float]) -> tuple:
        """Sum the gradient tree and `sums` over ranks; the smallest of `mins` and largest of `maxs`. Gradients go
        in float32 buckets of ~BUCKET_BYTES; the statistics ride in the last one (per-rank slots for min/max)."""
        start = time.perf_counter()
        flat = tree_flatten(grads)
        stats = np.zeros(len(sums) + self.size * (len(mins) + len(maxs)), np.float32)
        stats[: len(sums)] = list(sums.values())
        for i, value in enumerate([*mins.values(), *maxs.values()]):
            stats[len(sums) + i * self.size + self.rank] = value
        buckets: list[list[int]] = [[]]
        size = 0
        for i, (_, g) in enumerate(flat):
            if buckets[-1] and size + g.size * 4 > BUCKET_BYTES:
                buckets.append([])
                size = 0
            buckets[-1].append(i)
            size += g.size * 4
        summed: list[mx.array] = [None] * len(flat)  # type: ignore[list-item]
        for b, bucket in enumerate(buckets):
            parts = [flat[i][1].astype(mx.float32).reshape(-1) for i in bucket]
            if b == len(buckets) - 1:
                parts.append(mx.array(stats))
            vector = mx.concatenate(parts) if len(parts) > 1 else parts[0]
            self.reduce_bytes += vector.nbytes
            total = self._collective("reduce", lambda v=vector: mx.distributed.all_sum(v, group=self.group))
            offset = 0
            for i in bucket:
                g = flat[i][1]
                summed[i] = total[offset : offset + g.size].reshape(g.shape).astype(g.dtype)
                offset += g.size
            if b == len(buckets) - 1:
                stats = np.array(total[offset:])
        mx.eval(summed)
        self.reduce_s += time.perf_counter() - start
        out_sums = dict(zip(sums, stats[: len(sums)].tolist(), strict=True))
        slots = stats[len(sums) :].reshape(-1, self.size) if (mins or maxs) else np.zeros((0, self.size))
        out_mins = {k: float(slots[i].min()) for i, k in enumerate(mins)}
        out_maxs = {k: float(slots[len(mins) + i].max()) for i, k in enumerate(maxs)}
        return tree_unflatten([(k, summed[i]) for i, (k, _) in enumerate(flat)]), out_sums, out_mins, out_maxs

    # --- the run's collectives ---------------------------------------------------------------------------------

    def table(self, row: np.ndarray, name: str = "table") -> np.ndarray:
        """Each rank's int64 row (same length everywhere) -> the (size, F) table of all rows, on every rank."""
        row = np.asarray(row, np.int64).reshape(-1)
        mine = np.zeros((self.size, row.shape[0]), np.int64)
        mine[self.rank] = row
        out = self._collective(name, lambda: mx.distributed.all_sum(mx.array(mine), group=self.group))
        return np.array(out)

    def gather(self, blob: bytes, name: str = "gather") -> list[bytes]:
        """Every rank's bytes, in rank order, on every rank (lengths first, then one all_gather padded to the
        longest)."""
        lengths = self.table(np.array([len(blob)]), f"{name}.lengths")[:, 0]
        longest = int(lengths.max())
        if longest == 0:
            return [b""] * self.size
        padded = np.zeros(longest, np.uint8)
        padded[: len(blob)] = np.frombuffer(blob, np.uint8)
        out = np.array(
            self._collective(name, lambda: mx.distributed.all_gather(mx.array(padded), group=self.group))
        ).reshape(self.size, longest)
        return [out[r, : int(lengths[r])].tobytes() for r in range(self.size)]

    def broadcast(self, blob: bytes | None, name: str = "broadcast") -> bytes:
        """Rank 0's bytes on every rank (the others pass None): an all_sum of rank 0's bytes and zeros."""
        length = int(self.table(np.array([len(blob or b"")]), f"{name}.length")[0, 0])
        buffer = np.zeros(length, np.uint8)
        if self.is_root and length:
            buffer[:] = np.frombuffer(blob, np.uint8)
        if not length:
            return b""
        out = self._collective(name, lambda: mx.distributed.all_sum(mx.array(buffer), group=self.group))
        return np.array(out).tobytes()

    def differing(self, value: str, name: str = "compare") -> tuple[list[int], list[str]]:
        """Compare a short string (a digest) across ranks: (ranks whose value differs from rank 0's, all values)."""
        values = [b.decode() for b in self.gather(value.encode(), name)]
        return [r for r, v in enumerate(values) if v != values[0]], values
