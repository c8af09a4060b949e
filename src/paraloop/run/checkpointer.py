"""The checkpointer actor: SaveCheckpoint in, an atomic checkpoint directory out.

The arrays in a SaveCheckpoint are immutable snapshots, so writing them on this actor's own thread does not hold
the learner: training goes on while the previous step is written. Returns when its inbox closes (the learner is done).
"""

import logging
from typing import Any

from anyio.abc import ObjectReceiveStream

from paraloop import checkpoint
from paraloop.messages import CheckpointWritten, SaveCheckpoint
from paraloop.run.mlx_thread import MlxThread
from paraloop.run.status import RunStatus

log = logging.getLogger("paraloop.checkpointer")


async def run_checkpointer(
    inbox: ObjectReceiveStream[SaveCheckpoint],
    *,
    run_dir: str,
    adapter_config: dict[str, Any] | None,
    adapter_format: str,
    keep_last: int | None,
    config: dict[str, Any],
    status: RunStatus,
) -> None:
    thread = MlxThread("paraloop-checkpointer")
    try:
        async with inbox:
            async for request in inbox:
                trainer_state = {**request.trainer_state, "config": config}
                path = await thread.call(
                    checkpoint.write_checkpoint,
                    run_dir,
                    step=request.step,
                    version=request.version,
                    adapter=request.adapter,
                    adapter_config=adapter_config,
                    optimizer_state=request.optimizer_state,
                    reference=request.reference,
                    trainer_state=trainer_state,
                    adapter_format=adapter_format,
                    keep_last=keep_last,
                )
                status.last_checkpoint = str(path)
                log.info("checkpoint step %d written to %s", request.step, path)
                if request.reply is not None:
                    async with request.reply:
                        await request.reply.send(CheckpointWritten(step=request.step, path=str(path)))
    finally:
        thread.close()
