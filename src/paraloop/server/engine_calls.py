"""The one place HTTP handlers talk to the engine: open a generation, turn engine refusals into HTTP errors,
collect rows.

In: the Engine and a GenerateRequest. Out: TokenEvents (streaming) or finished Rows. Leaving early (the client
went away, so aiohttp cancelled the handler; or a write to a closed socket failed) closes the engine's iterator via
`aclosing`, which frees the request's rows in the engine.
"""

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, aclosing
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from paraloop.engine import NO_TOKEN, EngineBusy, RequestError
from paraloop.messages import GenerateRequest, TokenEvent
from paraloop.server.errors import APIError, bad_request

RETRY_AFTER_S = 1


@dataclass
class Row:
    """One completion as it accumulates from its TokenEvents."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, event: TokenEvent) -> None:
        if event.token != NO_TOKEN:  # an "abort" event carries no token
            self.tokens.append(event.token)
            self.logprobs.append(event.logprob)
            self.versions.append(event.version)
            self.top.append(list(event.top_logprobs or []))
        self.pieces.append(event.text)
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason

    @property
    def text(self) -> str:
        return "".join(self.pieces)


class Prepared(NamedTuple):
    """An engine request and how the engine's field names read in this route's body (for 400 messages)."""

    request: GenerateRequest
    fields: dict[str, str]


def distinct_versions(versions: list[int]) -> list[int]:
    return sorted(set(versions))


def open_generation(
    engine: Any, request: GenerateRequest
) -> AbstractAsyncContextManager[AsyncIterator[TokenEvent]]:
    """`async with open_generation(...) as events:` closes the engine iterator however the block is left."""
    return aclosing(engine.generate(request))


async def first_event(events: AsyncIterator[TokenEvent], *, fields: dict[str, str]) -> TokenEvent | None:
    """Pull the first event, where the engine refuses a request: EngineBusy -> 429, RequestError -> 400 naming the
    HTTP field (`fields` maps engine field names such as "prompt" to the route's own, e.g. "messages")."""
    try:
        return await anext(events)
    except StopAsyncIteration:
        return None
    except EngineBusy as e:
        raise APIError(
            429,
            f"engine busy: {e or 'admission queue full'}; retry later",
            code="engine_busy",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        ) from None
    except RequestError as e:
        raise bad_request(fields.get(e.field, e.field), e.message) from None


async def collect(engine: Any, prepared: Prepared) -> list[Row]:
    """Run a request to the end. A row aborted by the engine (shutting down) makes the whole answer a 503."""
    rows = [Row() for _ in range(prepared.request.n)]
    async with open_generation(engine, prepared.request) as events:
        event = await first_event(events, fields=prepared.fields)
        if event is not None:
            rows[event.row].add(event)
            async for event in events:
                rows[event.row].add(event)
    if any(r.finish_reason == "abort" for r in rows):
        raise APIError(503, "the server is shutting down; the request was aborted", code="aborted")
    return rows
