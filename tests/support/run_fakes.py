"""Small fakes for driving `paraloop run`'s actors through their streams, without a model.

FakeTrainer trains nothing but keeps what a checkpoint needs (real mx arrays, so the real checkpoint writer works);
InlineThread runs its calls on the event loop (so `anyio.wait_all_tasks_blocked()` settles a scenario exactly) and
can hold them at a gate; Rig wires a real Learner to streams the test drives; FakeEngine swaps adapters, optionally
holding a swap the way the drain-swap hang of issue #11 did (parked until some other request arrives, which never
does); FeedSource is a rollout source the test feeds.
"""

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import mlx.core as mx

from paraloop.config import Settings
from support import group

from paraloop.messages import (
    AdapterPublished,
    AdapterSwapped,
    CheckpointWritten,
    RolloutBatch,
    SaveCheckpoint,
    StepFinished,
)
from paraloop.run.control import LearnerControl
from paraloop.run.learner import Learner
from paraloop.run.main import error_of
from paraloop.run.publisher import run_publisher
from paraloop.run.status import RunStatus
from paraloop.run.wiring import Parts, run_actors

LORA_CONFIG = {
    "fine_tune_type": "lora",
    "num_layers": 1,
    "lora_parameters": {"rank": 2, "scale": 1.0, "dropout": 0.0, "keys": ["q_proj"]},
}


def batch(*tags: int, source: str = "atropos", **kw: Any) -> RolloutBatch:
    """One group scored [0, 1] per tag, the tag its prompt (so `tags` tells the groups apart)."""
    return RolloutBatch(groups=[group([0.0, 1.0], prompt=[t]) for t in tags], source=source, **kw)


def tags(b: RolloutBatch) -> list[int]:
    return [g.tokens[0][0] for g in b.groups]


@dataclass
class StepResult:
    metrics: dict[str, float]
    skipped: bool
    step: int
    version: int


class FakeTrainer:
    """Counts steps and records the batches it was given; `fail_at` raises inside that step."""

    def __init__(self, *, step_count: int = 0, fail_at: int | None = None) -> None:
        self.step_count = self.version = step_count
        self.trained: list[RolloutBatch] = []
        self.fail_at = fail_at

    def step(self, batch: RolloutBatch) -> StepResult:
        if self.fail_at is not None and self.step_count + 1 == self.fail_at:
            raise RuntimeError(f"injected trainer failure at step {self.fail_at}")
        self.trained.append(batch)
        self.step_count += 1
        self.version += 1
        return StepResult({"loss": 0.5, "reward_mean": 0.5, "step_time_s": 0.0}, False, self.step_count, self.version)

    def adapter(self) -> dict[str, mx.array]:
        arrays = {"model.layers.0.self_attn.q_proj.lora_a": mx.full((2, 2), float(self.version))}
        mx.eval(arrays)  # like the Trainer: evaluated where made (another thread cannot, MLX streams are per thread)
        return arrays

    def reference(self) -> None:
        return None

    def state(self) -> dict[str, Any]:
        step = mx.array(self.step_count)
        mx.eval(step)
        return {"optimizer": {"step": step}, "trainer": {"step_count": self.step_count, "version": self.version}}


class InlineThread:
    """MlxThread's interface, run on the event loop. While `gate` is set to an unset Event, calls wait for it
    (a step or a write in flight for as long as the test wants)."""

    def __init__(self) -> None:
        self.gate: anyio.Event | None = None
        self.entered = 0  # calls that have started

    async def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        self.entered += 1
        if self.gate is not None:
            with anyio.CancelScope(shield=True):  # like MlxThread: a call in flight is atomic
                await self.gate.wait()
        return fn(*args, **kwargs)

    def close(self) -> None:
        pass


@dataclass
class FakeEngine:
    """Swaps adapters and counts them. `park_swaps`: a swap is taken but never applied (the drain-swap hang)."""

    park_swaps: bool = False
    fail_swap: Exception | None = None
    version: int = 0
    tokenizer: Any = None
    swaps: list[int] = field(default_factory=list)
    parked_at: float | None = None  # time.monotonic() when a swap was parked
    gate: anyio.Event | None = None  # while set to an unset Event, a swap waits for it

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await anyio.sleep_forever()

    async def swap_adapter(self, arrays: dict[str, Any], version: int, *, drain: bool = False) -> AdapterSwapped:
        if self.fail_swap is not None:
            raise self.fail_swap
        if self.park_swaps:
            self.parked_at = time.monotonic()
            await anyio.sleep_forever()  # applied only when another command arrives: none does
        if self.gate is not None:
            await self.gate.wait()
        self.version = version
        self.swaps.append(version)
        return AdapterSwapped(version=version, pause_s=0.0)

    def stats(self) -> dict[str, float]:
        return {
            "queue_depth": 0.0,
            "waiting_requests": 0.0,
            "active_requests": 0.0,
            "active_rows": 0.0,
            "requests_served": 0.0,
            "generated_tokens": 0.0,
            "tokens_per_s": 0.0,
            "swaps": float(len(self.swaps)),
            "last_swap_pause_s": 0.0,
            "median_swap_pause_s": 0.0,
            "version": float(self.version),
        }


class FeedSource:
    """A rollout source the test feeds batch by batch; `close()` ends it. Counts what was pulled from it."""

    def __init__(self, size: float = 16) -> None:
        self.send, self.receive = anyio.create_memory_object_stream[Any](size)
        self.pulled = 0

    def __aiter__(self) -> "FeedSource":
        return self

    async def __anext__(self) -> RolloutBatch:
        try:
            item = await self.receive.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None
        if isinstance(item, BaseException):
            raise item
        self.pulled += 1
        return item

    def status(self) -> dict[str, Any]:
        return {"pulled": self.pulled}


class Rig:
    """A learner wired to streams the test drives: `batches` in; a fake checkpointer that answers at once, and
    sinks that record swaps and finished steps. `publisher`: a real publisher over `engine` instead of the sink."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        total_steps: int = 100,
        trainer=None,
        thread=None,
        engine=None,
        max_staleness: int | None = None,
        consumed=None,
        mode: str = "sync",
    ) -> None:
        self.status = RunStatus(total_steps=total_steps, mode=mode, run_dir=str(tmp_path))
        self.control = LearnerControl(self.status)
        self.trainer = trainer or FakeTrainer()
        self.thread = thread or InlineThread()
        self.engine = engine
        self.batches, batches_recv = anyio.create_memory_object_stream[RolloutBatch](1)
        published_send, self.published = anyio.create_memory_object_stream[AdapterPublished](1)
        ckpt_send, self.ckpts = anyio.create_memory_object_stream[SaveCheckpoint](2)
        finished_send, self.finished = anyio.create_memory_object_stream[StepFinished](64)
        self.learner = Learner(
            self.trainer,
            self.thread,
            status=self.status,
            control=self.control,
            total_steps=total_steps,
            checkpoint_interval=0,
            save_every_step=False,
            batches=batches_recv,
            published=published_send,
            checkpoints=ckpt_send,
            finished=finished_send,
            credits=None,
            max_staleness=max_staleness,
            consumed=consumed,
        )
        self.saved: list[SaveCheckpoint] = []
        self.swapped: list[int] = []
        self.done: list[int] = []  # the steps finished, in order
        self.steps: list[StepFinished] = []  # and what the learner said of each
        self.ended = anyio.Event()

    async def run(self, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
        async def learner() -> None:
            await self.learner.run()
            self.ended.set()

        async def published() -> None:
            async for p in self.published:
                self.swapped.append(p.version)

        async def checkpoints() -> None:
            async for request in self.ckpts:
                self.saved.append(request)
                if request.reply is not None:
                    async with request.reply:
                        await request.reply.send(CheckpointWritten(step=request.step, path=f"step_{request.step}"))

        async def finished() -> None:
            async for done in self.finished:
                self.done.append(done.step)
                self.steps.append(done)

        async with anyio.create_task_group() as tg:
            tg.start_soon(learner)
            if self.engine is None:
                tg.start_soon(published)
            else:
                tg.start_soon(
                    partial(
                        run_publisher, self.published, engine=self.engine, status=self.status, credits=None, drain=True
                    )
                )
            tg.start_soon(checkpoints)
            tg.start_soon(finished)
            task_status.started()


def settings(run_dir: Any, **sections: dict[str, Any]) -> Settings:
    """Settings for an in-process run on fakes: port 0, steps of 4 sequences, no periodic checkpoints."""
    tree: dict[str, Any] = {
        "server": {"port": 0},
        "rl_training": {"batch_size": 4, "total_steps": 100, "mode": "sync"},
        "checkpoint": {"dir": str(run_dir), "interval": 0},
    }
    for name, values in sections.items():
        tree[name] = {**tree.get(name, {}), **values}
    return Settings(**tree)


def parts(trainer: FakeTrainer, engine: FakeEngine, source: FeedSource, **kw: Any) -> Parts:
    return Parts(
        trainer=trainer,
        thread=kw.pop("thread", InlineThread()),
        engine=engine,
        source=source,
        source_status=source.status,
        adapter_config=LORA_CONFIG,
        **kw,
    )


class Run:
    """run_actors in a task group; `port` once HTTP serves, `status` at once, `error` if it raised."""

    def __init__(self, config, the_parts) -> None:
        self.config, self.parts = config, the_parts
        self.port: int | None = None
        self.statuses: list = []
        self.error: BaseException | None = None
        self.ended = anyio.Event()
        self.exits: list[tuple[int, str]] = []

    @property
    def status(self):
        return self.statuses[0]

    async def __call__(self) -> None:
        try:
            await run_actors(
                self.config,
                self.parts,
                ready=self._ready,
                signals=False,
                status_out=self.statuses,
                hard_exit=lambda code, why: self.exits.append((code, why)),
            )
        except Exception as e:  # the test inspects it
            self.error = error_of(e)
        finally:
            self.ended.set()

    def _ready(self, port: int) -> None:
        self.port = port
