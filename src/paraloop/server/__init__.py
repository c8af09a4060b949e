"""paraloop's HTTP API: OpenAI-compatible completions, vLLM-style /generate, /health, /v1/models (see docs/api.md)."""

from paraloop.server.app import make_app, mark_shutting_down, serve_http, start_http
from paraloop.server.errors import APIError
from paraloop.server.state import STATE, ServerState

__all__ = ["APIError", "STATE", "ServerState", "make_app", "mark_shutting_down", "serve_http", "start_http"]
