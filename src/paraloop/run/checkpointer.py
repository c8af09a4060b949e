"""The checkpointer actor: SaveCheckpoint in, an atomic checkpoint directory out.

The arrays in a SaveCheckpoint are immutable snapshots, so writing them on this actor's own thread does not hold
the learner: training goes on while the previous step is written. After each write, journal entries that every
kept checkpoint has consumed are deleted (run/journal.py).

A write that fails (disk full, directory read-only: an OSError) leaves nothing partial behind (checkpoint.py
stages it), is answered with the error when someone waits for it (/control/snapshot), is shown in
status.checkpoint_error and the log, and is tried again after a backoff (1 s doubling to a minute) or as soon as a
newer snapshot arrives, which supersedes it: the run keeps serving and training meanwhile. Returns when its inbox
closes (the learner is done) and the last write is on disk; if that one still fails after FINAL_ATTEMPTS more
tries (about half a minute), it raises CheckpointFailed (the run exits 1, saying what is not saved).
"""

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
from anyio.abc import ObjectReceiveStream

from paraloop import checkpoint
from paraloop.messages import CheckpointWritten, SaveCheckpoint
from paraloop.mlx_thread import MlxThread
from paraloop.run.journal import Consumed, Journal
from paraloop.run.status import RunStatus

log = logging.getLogger("paraloop.checkpointer")

FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0
FINAL_ATTEMPTS = 4


class CheckpointFailed(RuntimeError):
    """The run ended and its last checkpoint could not be written."""


async def run_checkpointer(
    inbox: ObjectReceiveStream[SaveCheckpoint],
    *,
    run_dir: str,
    adapter_config: dict[str, Any] | None,
    adapter_format: str,
    keep_last: int | None,
    config: dict[str, Any],
    status: RunStatus,
    journal: Journal | None = None,
    write: Callable[..., Path] | None = None,
) -> None:
    """`write`: checkpoint.write_checkpoint unless a test gives its own."""
    write = write or checkpoint.write_checkpoint
    backoff = (FIRST_BACKOFF_S, MAX_BACKOFF_S)
    thread = MlxThread("paraloop-checkpointer")
    failures = 0

    def delay() -> float:
        return min(backoff[1], backoff[0] * 2 ** max(failures - 1, 0))

    async def attempt(request: SaveCheckpoint) -> bool:
        nonlocal failures
        status.checkpoint_writing_since = start = time.monotonic()
        try:
            path = await thread.call(
                write,
                run_dir,
                step=request.step,
                version=request.version,
                adapter=request.adapter,
                adapter_config=adapter_config,
                optimizer_state=request.optimizer_state,
                reference=request.reference,
                trainer_state={**request.trainer_state, "config": config},
                adapter_format=adapter_format,
                keep_last=keep_last,
            )
        except OSError as e:
            failures += 1
            error = f"{type(e).__name__}: {e}"
            if status.checkpoint_error is None:
                log.error(
                    "checkpoint step %d could not be written (%s): nothing partial was left; training goes "
                    "on and the write is retried",
                    request.step,
                    error,
                )
            status.checkpoint_error = {
                "step": request.step,
                "error": error,
                "failures": failures,
                "since": (status.checkpoint_error or {}).get("since", time.time()),
                "retry_in_s": delay(),
            }
            await _reply(request, CheckpointWritten(step=request.step, path="", error=error))
            return False
        finally:
            status.slowest_write_s = max(status.slowest_write_s, time.monotonic() - start)
            status.checkpoint_writing_since = None
        if status.checkpoint_error is not None:
            log.warning("checkpoint step %d written after %d failed attempt(s)", request.step, failures)
        failures, status.checkpoint_error = 0, None
        status.last_checkpoint = str(path)
        log.info("checkpoint step %d written to %s", request.step, path)
        await _reply(request, CheckpointWritten(step=request.step, path=str(path)))
        if journal is not None:
            await thread.call(_prune_journal, journal, run_dir)
        return True

    pending: SaveCheckpoint | None = None  # a failed write, tried again until it or a newer one is on disk
    try:
        async with inbox:
            while True:
                request = None
                if pending is None:
                    try:
                        request = await inbox.receive()
                    except anyio.EndOfStream:
                        break
                else:
                    with anyio.move_on_after(delay()):  # anyio hands over no item to a cancelled receive
                        try:
                            request = await inbox.receive()
                        except anyio.EndOfStream:
                            break
                    if request is not None:
                        log.info(
                            "checkpoint step %d supersedes step %d, which could not be written",
                            request.step,
                            pending.step,
                        )
                    request = request or pending
                pending = None if await attempt(request) else _without_reply(request)
        for _ in range(FINAL_ATTEMPTS if pending is not None else 0):
            await anyio.sleep(delay())
            if await attempt(pending):
                pending = None
                break
        if pending is not None:
            raise CheckpointFailed(
                f"the last checkpoint (step {pending.step}) could not be written: "
                f"{status.checkpoint_error and status.checkpoint_error['error']}; the newest on disk is "
                f"{status.last_checkpoint or 'none'}"
            )
    finally:
        thread.close()


async def _reply(request: SaveCheckpoint, written: CheckpointWritten) -> None:
    if request.reply is not None:
        async with request.reply:
            try:
                await request.reply.send(written)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass  # nobody waits any more


def _without_reply(request: SaveCheckpoint) -> SaveCheckpoint:
    return msgspec.structs.replace(request, reply=None)  # its waiter has had the error


def _prune_journal(journal: Journal, run_dir: str) -> None:
    """Delete journal entries every kept checkpoint has consumed (on the checkpointer's thread)."""
    kept = []
    for step_dir in checkpoint.list_checkpoints(run_dir):
        try:
            state = json.loads((step_dir / checkpoint.TRAINER_STATE).read_text())
            kept.append(Consumed.from_json(state.get("journal")))
        except (OSError, ValueError) as e:
            log.warning("journal not pruned: %s has no readable journal state (%s)", step_dir, e)
            return
    try:
        journal.prune(kept)
    except OSError as e:
        log.warning("journal not pruned: %s", e)
