"""The inference engine: continuous batching on one MLX thread, per-request sampling, live adapter swaps."""

from paraloop.engine.admission import EngineBusy, RequestError
from paraloop.engine.engine import Engine, RowAccumulator, collect
from paraloop.engine.worker import NO_TOKEN

__all__ = ["NO_TOKEN", "Engine", "EngineBusy", "RequestError", "RowAccumulator", "collect"]
