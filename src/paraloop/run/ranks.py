"""Data-parallel paraloop: N `paraloop run` processes (ranks) make one run (docs/distributed.md).

Every rank loads the model, serves its own engine and HTTP port, generates its part of the rollouts and runs a
learner; rank 0 alone owns /control, the checkpointer, metrics.jsonl and the Atropos registration. The learners
meet in collectives (distributed.py), always the same ones in the same order, all on the learner's MLX thread:

    start      rank 0's adapter, optimizer and trainer state (fresh, resumed or a predecessor's) -> every rank
    peers      each rank's HTTP address -> every rank (heartbeats, and the inference servers Atropos may use)
    tick       at each step boundary, one small row per rank (ready, stop asked, rank 0's pause / step permit /
               snapshot request), every TICK_S while waiting: every rank derives the same decision from the table
    rollouts   on "step": each rank's part of the batch -> the whole batch, on every rank (rank order)
    reduce     inside the step: gradients and loss statistics (learn/trainer.py)
    compare    adapter and optimizer checksums, every checksum_interval steps and at each checkpoint
    end        after the final checkpoint: every rank leaves together

So swaps, pause, single steps, snapshots and stops happen on every rank at the same step, and a batch trains only
when every rank has its part. Ticks are periodic on purpose: a rank cannot learn of another's event without one.
Faults are run/peers.py's: a dead, stuck or unreachable rank ends the run on every rank, naming it.
"""

import json
import logging
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import msgspec
import numpy as np

from paraloop.checkpoint import Checkpoint
from paraloop.config import Settings
from paraloop.distributed import (
    PeerLost,
    Ranks,
    RanksDiverged,
    chunk,
    digest,
    launched,
    pack_tree,
    unpack_tree,
)
from paraloop.messages import RolloutBatch
from paraloop.mlx_thread import ComputeThread
from paraloop.run.peers import Watcher, connect
from paraloop.run.setup import Models, SetupError, build_models

log = logging.getLogger("paraloop.ranks")

TICK_S = 0.05  # the longest a waiting rank goes without a tick (a step starts at most this late)
# tick row fields (int64)
STEP, READY, STOPPING, ENDED, PAUSED, MAY_STEP, SNAPSHOT = range(7)
FIELDS = 7
WAIT, TRAIN, STOP, SNAP = "wait", "step", "stop", "snapshot"


def decide(table: np.ndarray) -> str:
    """The step-boundary decision from the tick table; every rank computes it from the same table."""
    steps = set(table[:, STEP].tolist())
    if len(steps) > 1:
        raise RanksDiverged(f"the ranks are at different learner steps: {table[:, STEP].tolist()}")
    if table[:, STOPPING].any() or table[:, ENDED].any():
        return STOP
    if table[0, SNAPSHOT]:
        return SNAP
    if table[:, READY].all() and table[0, MAY_STEP]:
        return TRAIN
    return WAIT


def merge(batches: list[RolloutBatch]) -> RolloutBatch | None:
    """The ranks' parts of one batch, in rank order, as the batch one process would have trained."""
    if not batches:
        return None
    first = batches[0]
    steps = [b.source_step for b in batches if b.source_step is not None]
    return msgspec.structs.replace(
        first,
        groups=[g for b in batches for g in b.groups],
        dropped_stale=sum(b.dropped_stale for b in batches),
        source_step=max(steps) if steps else None,
    )


def local_batch_size(settings: Any, ranks: Ranks | None) -> int:
    """Sequences per batch this rank's rollout buffer forms: its part of the mock environment's groups, or the
    whole batch (one process, or rank 0 fetching from Atropos)."""
    rl = settings.rl_training
    if ranks is None or rl.rollout_source != "mock":
        return rl.batch_size
    groups = rl.batch_size // rl.mock.group_size
    return len(chunk(groups, ranks.rank, ranks.size)) * rl.mock.group_size


def has_source(settings: Any, ranks: Ranks | None) -> bool:
    """Whether this rank runs a rollout source: rank 0 always; another rank for the mock environment when its part
    of a batch is not empty (Atropos batches are fetched by rank 0 alone)."""
    if ranks is None or ranks.is_root:
        return True
    return settings.rl_training.rollout_source == "mock" and local_batch_size(settings, ranks) > 0


# --- the start state --------------------------------------------------------------------------------------------


def start_payload(settings: Any, models: Any) -> bytes:
    """Rank 0 (on the learner thread): what every rank starts from, bitwise."""
    trainer, resumed = models.trainer, models.resumed
    state = trainer.state()
    reference = trainer.reference()
    return msgspec.msgpack.encode(
        {
            "rl_training": settings.rl_training.model_dump(mode="json"),
            "adapter_config": models.adapter_config,
            "adapter": pack_tree(trainer.adapter()),
            "reference": pack_tree(reference) if reference is not None else None,
            "optimizer": pack_tree(state["optimizer"]),
            "trainer": state["trainer"],
            "resumed": None
            if resumed is None
            else {
                "path": str(resumed.path),
                "step": resumed.step,
                "version": resumed.version,
                "trainer_state": json.loads(json.dumps(resumed.trainer_state, default=str)),
            },
        }
    )


class StartReceiver:
    """A follower rank's side of `start`: the layout (for build_models) and then the state, from one broadcast."""

    def __init__(self, ranks: Ranks, settings: Any) -> None:
        self.ranks, self.settings = ranks, settings
        self.payload: dict[str, Any] | None = None

    def receive(self) -> dict[str, Any]:
        if self.payload is None:
            try:
                blob = self.ranks.broadcast(None, "start")
            except PeerLost as e:
                raise PeerLost(
                    f"rank {self.ranks.rank}: rank 0 sent no start state (did it fail to start? see its output): {e}"
                ) from None
            self.payload = msgspec.msgpack.decode(blob)
            ours = self.settings.rl_training.model_dump(mode="json")
            theirs = self.payload["rl_training"]  # all of it must agree: the ranks compute one update
            differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
            if differ:
                raise SetupError(
                    f"rank {self.ranks.rank}: rl_training differs from rank 0's in {', '.join(differ)} "
                    "(every rank must run the same configuration)"
                )
        return self.payload

    def layout(self) -> dict[str, Any] | None:
        return self.receive()["adapter_config"]

    def apply(self, models: Any) -> None:
        """Load rank 0's state into this rank's trainer; `models.resumed` describes rank 0's checkpoint, if any."""
        p = self.receive()
        adapter = unpack_tree(p["adapter"])
        reference = unpack_tree(p["reference"]) if p["reference"] is not None else None
        models.trainer.load_state(
            {"optimizer": unpack_tree(p["optimizer"]), "trainer": p["trainer"]}, adapter, reference
        )
        models.adapter_config = p["adapter_config"]
        if p["resumed"] is not None:
            r = p["resumed"]
            models.resumed = Checkpoint(
                path=Path(r["path"]),
                step=r["step"],
                version=r["version"],
                adapter=models.trainer.adapter(),
                adapter_config=p["adapter_config"],
                optimizer_state=None,
                reference=reference,
                trainer_state=r["trainer_state"],
            )


# --- the learner's side ---------------------------------------------------------------------------------------


@dataclass
class Coordinator:
    """What the learner of a distributed run asks at its step boundaries (run/learner.py calls it)."""

    ranks: Ranks
    thread: Any  # the learner's MlxThread: every collective runs there
    status: Any  # RunStatus
    control: Any  # LearnerControl (rank 0's drives the run; a follower's only asks to stop)
    source: bool  # whether this rank has a rollout source (else it is always ready, with nothing to add)
    checksum_interval: int
    run_dir: Path
    info: dict[str, Any] = field(default_factory=dict)  # this rank's address etc., written to its rank file
    held: RolloutBatch | None = None  # this rank's part of the next batch, once it came
    ended: bool = False  # the local source ended
    verified: dict[str, Any] = field(default_factory=dict)  # the last checksum comparison
    started: dict[str, Any] = field(default_factory=dict)  # the first: every rank holds rank 0's start state
    _snapshots: list[Any] = field(default_factory=list)  # rank 0: /control/snapshot requests waiting for a tick
    done: bool = False  # every rank has passed `end`: a rank going away is no longer a fault

    def __post_init__(self) -> None:
        self.control.at_ticks = True  # the ticks say when the pause holds (next_batch)

    @property
    def is_root(self) -> bool:
        return self.ranks.is_root

    # rank 0's /control/snapshot: taken at the next step boundary, on every rank's checksum
    async def request_snapshot(self) -> Any:
        send, receive = anyio.create_memory_object_stream[Any](1)
        self._snapshots.append(send)
        self.control.wake()
        async with receive:
            try:
                return await receive.receive()
            except anyio.EndOfStream:
                return None

    def _row(self) -> np.ndarray:
        row = np.zeros(FIELDS, np.int64)
        row[READY] = self.held is not None or not self.source
        row[STOPPING] = bool(self.status.stopping)
        row[ENDED] = self.ended and self.held is None
        if self.is_root:
            row[PAUSED] = bool(self.status.paused)
            row[MAY_STEP] = self.control.may_step()
            row[SNAPSHOT] = bool(self._snapshots)
        return row

    async def _wait_for_event(self, learner: Any) -> None:
        """Until this rank has news for the others (its part arrived, /control or a signal acted) or TICK_S."""
        with anyio.move_on_after(TICK_S):
            if self.source and self.held is None and not self.ended:
                with self.control.receiving():
                    try:
                        self.held = await learner.batches.receive()
                    except anyio.EndOfStream:
                        self.ended = True
            else:
                await self.control.changed()

    async def next_batch(self, learner: Any, step: int) -> RolloutBatch | None:
        """Tick until the ranks decide: the whole next batch (every rank's part, exchanged), or None to stop."""
        first = True
        while True:
            if not first:
                await self._wait_for_event(learner)
            first = False
            row = self._row()
            row[STEP] = step
            table = await self.thread.call(self.ranks.table, row, "tick")
            decision = decide(table)
            if not self.is_root:
                self.status.paused = bool(table[0, PAUSED])
            # held once a tick that saw rank 0's pause (and no single-step permit) decided no step: a tick already
            # under way when the pause came may still decide one
            self.status.learner_held = decision != TRAIN and bool(table[0, PAUSED]) and not table[0, MAY_STEP]
            if decision == STOP:
                self.status.stopping = True
                return None
            if decision == SNAP:
                await self._snapshot(learner, step)
                continue
            if decision == TRAIN:
                if self.is_root:
                    self.control.take_turn()
                part, self.held = self.held, None
                blob = msgspec.msgpack.encode(part) if part is not None else b""
                blobs = await self.thread.call(self.ranks.gather, blob, "rollouts")
                batch = merge([msgspec.msgpack.decode(b, type=RolloutBatch) for b in blobs if b])
                if batch is not None:
                    return batch
                self.control.no_step()
                log.warning("no rank had rollouts for step %d", step + 1)  # cannot happen with a source on rank 0

    async def _snapshot(self, learner: Any, step: int) -> None:
        await self.compare(learner.trainer, step)
        if not self.is_root:
            return
        requests, self._snapshots = self._snapshots, []
        written = await learner.checkpoint_now()
        for send in requests:
            with send:
                send.send_nowait(written)

    async def after_step(self, trainer: Any, step: int, checkpoint_due: bool) -> None:
        """Compare checksums when a checkpoint is due or every checksum_interval steps."""
        if checkpoint_due or (self.checksum_interval and step % self.checksum_interval == 0):
            await self.compare(trainer, step)

    async def compare(self, trainer: Any, step: int) -> None:
        """Every rank's adapter and optimizer checksums against rank 0's: RanksDiverged names the ranks that
        differ."""

        def sums() -> tuple[str, str]:
            return digest(trainer.adapter()), digest(trainer.state()["optimizer"])

        adapter, optimizer = await self.thread.call(sums)
        differ, values = await self.thread.call(self.ranks.differing, f"{adapter}:{optimizer}", "compare")
        self.verified = {"step": step, "adapter_sha256": adapter, "optimizer_sha256": optimizer, "at": time.time()}
        self.started = self.started or self.verified
        self.write_rank_file()
        if differ:
            raise RanksDiverged(
                f"at step {step} the adapter or optimizer state of rank(s) {', '.join(map(str, differ))} differs from "
                f"rank 0's (checksums: {', '.join(f'rank {r} {v[:12]}' for r, v in enumerate(values))})"
            )

    async def end(self, learner: Any, step: int) -> None:
        """The run's end on every rank: compare, rank 0 writes the final checkpoint, then all leave together."""
        await self.compare(learner.trainer, step)
        if self.is_root:
            await learner.checkpoint_now(final=True)
        for send in self._snapshots:
            send.close()
        self._snapshots = []
        await self.thread.call(self.ranks.table, np.array([step]), "end")
        self.done = True

    def write_rank_file(self) -> None:
        """RUN_DIR/ranks/rank_<r>.json: where this rank serves, what its engine served, and the checksums it
        compared first and last."""
        path = self.run_dir / "ranks" / f"rank_{self.ranks.rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        engine = self.status.engine_stats() if self.status.engine_stats else {}
        served = {k: engine[k] for k in ("requests_served", "generated_tokens") if k in engine}
        tmp.write_text(
            json.dumps(
                {
                    **self.info,
                    "rank": self.ranks.rank,
                    "size": self.ranks.size,
                    "step": self.status.step,
                    "engine": served,
                    "started": self.started,
                    "verified": self.verified,
                }
            )
        )
        tmp.replace(path)


# --- what `paraloop run` calls ----------------------------------------------------------------------------------


async def join(settings: Settings, thread: ComputeThread) -> tuple[Ranks | None, Watcher | None]:
    """(Ranks, Watcher) when a launcher started this process as one rank of several, else (None, None)."""
    if not launched():
        return None, None
    ranks = await connect(settings.distributed.backend, thread, settings.distributed.connect_timeout)
    if ranks.size == 1:
        return None, None
    return ranks, Watcher(ranks, settings.distributed, token=settings.server.control_token, done=lambda: False)


async def build(settings: Settings, thread: ComputeThread, ranks: Ranks | None, watcher: Watcher | None) -> Models:
    """setup.build_models on every rank; then rank 0's start state goes to the others (which read neither
    --resume nor lora_path themselves), under the watcher's deadline."""
    if ranks is None:
        return await thread.call(build_models, settings)
    async with anyio.create_task_group() as tg:
        await tg.start(watcher.run)  # no peers known yet: deadlines only, while rank 0 loads and reads its checkpoint
        if ranks.is_root:
            models = await thread.call(build_models, settings)
            blob = await thread.call(start_payload, settings, models)
            await thread.call(ranks.broadcast, blob, "start")
        else:
            receiver = StartReceiver(ranks, settings)
            models = await thread.call(partial(build_models, settings, adapter_layout=receiver.layout))
            await thread.call(receiver.apply, models)
        tg.cancel_scope.cancel()
    log.info("rank %d starts at step %d from rank 0's state", ranks.rank, models.trainer.step_count)
    return models


async def follow(finished: Any, *, status: Any) -> None:
    """A follower rank's monitor: its status follows the steps (rank 0 alone writes metrics)."""
    async with finished:
        async for done in finished:
            status.record_step(done)
