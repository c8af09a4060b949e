"""What every handler reads from the app: the engine, the settings, the served name, the shutdown flag, and a
training run's agent sessions."""

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from aiohttp import web
from mlx_lm.tokenizer_utils import TokenizerWrapper

from paraloop.config import Settings
from paraloop.engine import RowAccumulator
from paraloop.engine.adapters import Adapters
from paraloop.engine.scoring import PromptLogprobs
from paraloop.messages import GenerateRequest, TokenEvent


class ServedEngine(Protocol):
    """The engine as the HTTP routes see it: engine.Engine (tests and the run's fakes pass their own)."""

    tokenizer: TokenizerWrapper
    adapters: Adapters  # the policy, the base model and named adapters, by name

    @property
    def version(self) -> int: ...  # the policy's adapter version being served

    def check(self, request: GenerateRequest) -> None: ...  # raises RequestError (400) before any work

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]: ...

    async def score(self, request: GenerateRequest) -> PromptLogprobs: ...  # the prompt's log-probs

    def stats(self) -> dict[str, float]: ...


class TurnRecorder(Protocol):
    """A training run's agent sessions as the routes see them (run/agent_sessions.AgentSessions;
    server/session_turns.py calls it)."""

    def begin(self, session_id: str, prompt: list[int], max_tokens: int) -> None: ...  # refuses with APIError

    def record(self, session_id: str, prompt: list[int], row: RowAccumulator, temperature: float) -> None: ...

    def end(self, session_id: str) -> None: ...


@dataclass
class ServerState:
    engine: ServedEngine
    settings: Settings
    model_name: str
    shutting_down: bool = False
    openapi: bytes | None = None  # /openapi.json, built on first request (the routes are all added by then)
    created: int = field(default_factory=lambda: int(time.time()))
    turns: TurnRecorder | None = None  # a run in sessions mode records tagged requests (server/session_turns.py)

    @property
    def tokenizer(self) -> TokenizerWrapper:
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
