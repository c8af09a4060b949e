"""What every handler reads from the app: the engine, the settings, the served name, the shutdown flag."""

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from paraloop.config import Settings


@dataclass
class ServerState:
    engine: Any  # paraloop.engine.Engine (typed loosely so tests and the runtime can pass their own)
    settings: Settings
    model_name: str
    shutting_down: bool = False
    openapi: bytes | None = None  # /openapi.json, built on first request (the routes are all added by then)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def adapter_of(self, model: str | None) -> str | None:
        """The engine adapter a request's `model` names: the served model's own name (or none) selects the default
        (the policy when one is served, else the base model); any other id is an adapter's ("policy", "base", a
        named adapter, a checkpoint), which the engine resolves (unknown: 404)."""
        return None if model is None or model == self.model_name else model


STATE = web.AppKey("paraloop_state", ServerState)


def served_model_name(settings: Settings) -> str:
    """server.served_model_name, else the model directory's name."""
    if settings.server.served_model_name:
        return settings.server.served_model_name
    if settings.model.base_path:
        return Path(settings.model.base_path.rstrip("/")).name or settings.model.base_path
    return "paraloop"
