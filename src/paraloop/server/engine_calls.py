"""The one place HTTP handlers talk to the engine: open a generation, turn engine refusals into HTTP errors,
collect rows.

In: the Engine and a GenerateRequest. Out: TokenEvents (streaming) or finished rows (the engine's RowAccumulator).
Leaving early (the client went away, so aiohttp cancelled the handler; or a write to a closed socket failed) closes
the engine's iterator via `aclosing`, which frees the request's rows in the engine.
"""

from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, aclosing, contextmanager

import msgspec

from paraloop.engine import EngineBusy, RequestError, RowAccumulator
from paraloop.engine.adapters import AdapterError, AdapterNotFound
from paraloop.engine.scoring import PromptLogprobs
from paraloop.messages import GenerateRequest, TokenEvent
from paraloop.server.errors import APIError, bad_request, request_error
from paraloop.server.metrics import first_token
from paraloop.server.prepare import Prepared
from paraloop.server.state import ServedEngine

RETRY_AFTER_S = 1


def distinct_versions(versions: list[int]) -> list[int]:
    return sorted(set(versions))


def open_generation(
    engine: ServedEngine, request: GenerateRequest
) -> AbstractAsyncContextManager[AsyncIterator[TokenEvent]]:
    """`async with open_generation(...) as events:` closes the engine iterator however the block is left."""
    return aclosing(engine.generate(request))


async def first_event(events: AsyncIterator[TokenEvent], *, fields: dict[str, str]) -> TokenEvent | None:
    """Pull the first event, where the engine refuses a request (`refusals`)."""
    with refusals(fields):
        try:
            event = await anext(events)
        except StopAsyncIteration:
            return None
    first_token()
    return event


async def score(engine: ServedEngine, prepared: Prepared, *, top: int | None) -> PromptLogprobs | None:
    """The prompt's log-probs (engine.score) with `top` alternatives, refusals answered as for a generation;
    None when the request asks for none (`top` None)."""
    if top is None:
        return None
    request = prepared.request
    request = msgspec.structs.replace(request, params=msgspec.structs.replace(request.params, top_logprobs=top))
    with refusals(prepared.fields):
        return await engine.score(request)


def check(engine: ServedEngine, prepared: Prepared) -> None:
    """A request answered without running it (a completion that only echoes its prompt) is refused as its
    admission would refuse it (prepare.py): token ids within the vocabulary, its length within the limits."""
    with refusals(prepared.fields):
        engine.check(prepared.request)


@contextmanager
def refusals(fields: dict[str, str]) -> Iterator[None]:
    """The engine's refusals as HTTP errors: EngineBusy -> 429, RequestError -> 400 naming the HTTP field (`fields`
    maps engine field names such as "prompt" to the route's own, e.g. "messages"), a `model` that names no adapter
    -> 404, an adapter that cannot be loaded -> 400."""
    try:
        yield
    except EngineBusy as e:
        raise APIError(
            429,
            f"engine busy: {e or 'admission queue full'}; retry later",
            code="engine_busy",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        ) from None
    except RequestError as e:
        raise request_error(e, fields) from None
    except AdapterNotFound as e:
        raise APIError(404, f"model: {e}", param="model", code="model_not_found") from None
    except AdapterError as e:
        raise bad_request("model", e.message) from None


async def collect(engine: ServedEngine, prepared: Prepared) -> list[RowAccumulator]:
    """Run a request to the end. A row aborted by the engine (shutting down) makes the whole answer a 503."""
    got: dict[int, RowAccumulator] = {}  # rows as their events arrive: nothing is made per row before admission
    async with open_generation(engine, prepared.request) as events:
        event = await first_event(events, fields=prepared.fields)
        while event is not None:
            (got.get(event.row) or got.setdefault(event.row, RowAccumulator())).add(event)
            event = await anext(events, None)
    rows = [got.get(i, RowAccumulator()) for i in range(prepared.request.n)]
    if any(r.finish_reason == "abort" for r in rows):
        raise APIError(503, "the server is shutting down; the request was aborted", code="aborted")
    return rows
