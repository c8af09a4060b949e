"""The inference engine: continuous batching on one MLX thread, per-request sampling, live adapter swaps."""

from paraloop.engine.engine import Engine, EngineBusy, RequestError, RowAccumulator, collect
from paraloop.engine.worker import NO_TOKEN

__all__ = ["NO_TOKEN", "Engine", "EngineBusy", "RequestError", "RowAccumulator", "collect"]
