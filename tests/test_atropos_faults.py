"""The Atropos client against a misbehaving API (an in-process fake of run-api): environment batches are untrusted
input. 500s, bodies that are not JSON, nested past any parser's depth, endless, or holding token ids the model
does not have never raise out of the client and never make it read more than max_response_bytes: it retries,
counts, and takes the next good batch."""

import asyncio
import json
import time
from collections.abc import Callable

import pytest
from aiohttp import web
import support
from support import scored_data

from paraloop.atropos.client import AtroposClient
from paraloop.config import AtroposConfig

LIMIT = 1 << 20  # max_response_bytes in these tests
VOCAB = 1000
DEADLINE = 30


def group(tag: int, **changes) -> dict:
    """A valid 2-sequence group as run-api's /batch answers it; `tag` is its first token."""
    return scored_data(support.group([1.0, 0.0], prompt=[tag], completions=[[5, 6], [5, 7]]), **changes)


class FakeApi:
    """run-api's trainer routes; /batch answers with the next of `answers` (then the good batch, then null)."""

    def __init__(self, answers: list[Callable[[web.Request], web.StreamResponse]]) -> None:
        self.answers = list(answers)
        self.registrations = 0
        self.streamed = 0  # bytes an endless answer wrote before the client hung up

    async def register(self, request: web.Request) -> web.Response:
        self.registrations += 1
        return web.json_response({"uuid": 1234})

    async def batch(self, request: web.Request) -> web.StreamResponse:
        if self.answers:
            answer = self.answers.pop(0)
            return await answer(self, request) if asyncio.iscoroutinefunction(answer) else answer(self, request)
        return web.json_response({"batch": [group(1), group(2)]})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/register", self.register)
        app.router.add_get("/batch", self.batch)
        app.router.add_get("/info", lambda r: web.json_response({"batch_size": 4, "max_token_len": 512}))
        app.router.add_get("/status", lambda r: web.json_response({"current_step": 1, "queue_size": 0}))
        return app


def status_500(api, request):
    return web.Response(status=500, text="Internal Server Error")


def not_json(api, request):
    return web.Response(text="<html><body>502 Bad Gateway</body></html>", content_type="text/html")


def not_utf8(api, request):
    return web.Response(body=b'{"batch": "\xff\xfe"}', content_type="application/json")


def deeply_nested(api, request):
    return web.Response(text='{"batch": ' + "[" * 200_000 + "]" * 200_000 + "}", content_type="application/json")


def says_it_is_huge(api, request):
    response = web.Response(body=b"{}", content_type="application/json")
    response.headers["Content-Length"] = str(1 << 40)  # refused before a byte of the body is read
    return response


async def endless(api, request):
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    chunk = b'{"batch": [' + b"1," * (1 << 16)
    try:
        while api.streamed < 1 << 33:
            await response.write(chunk)
            api.streamed += len(chunk)
    except (ConnectionResetError, RuntimeError):  # the client hung up
        pass
    return response


def wrong_shape(api, request):
    return web.json_response({"batch": [1, "two", None, {"tokens": "x"}]})


def a_string(api, request):
    return web.json_response({"batch": "not a list"})


def out_of_vocab(api, request):
    return web.json_response({"batch": [group(VOCAB, masks=[[-100, 5, 6], [-100, 5, 7]]), group(2**70)]})


FAULTS = {
    "500": status_500,
    "not JSON": not_json,
    "not UTF-8": not_utf8,
    "nested 200000 deep": deeply_nested,
    "Content-Length 1 TiB": says_it_is_huge,
    "endless body": endless,
    "groups of the wrong shape": wrong_shape,
    "batch not a list": a_string,
    "token ids outside the vocabulary": out_of_vocab,
}


async def fetch_one(api: FakeApi, tmp_path) -> tuple[list, dict, float]:
    runner = web.AppRunner(api.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        config = AtroposConfig(
            api_url=f"http://127.0.0.1:{port}", poll_interval=0.01, max_backoff=0.05, max_response_bytes=LIMIT
        )
        client = AtroposClient(
            config, batch_size=4, token_budget=4096, total_steps=1, checkpoint_dir=str(tmp_path), vocab_size=VOCAB
        )
        start = time.monotonic()
        async with asyncio.timeout(DEADLINE):
            batches = [await anext(aiter(client.batches()))]
        return batches, client.status(), time.monotonic() - start
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_misbehaving_api_is_survived_and_the_next_good_batch_is_taken(tmp_path, fault):
    api = FakeApi([FAULTS[fault]] * 2)
    batches, status, took = asyncio.run(fetch_one(api, tmp_path))
    assert [[g.tokens[0][0] for g in b.groups] for b in batches] == [[1, 2]], "only the good batch, once"
    assert took < 10
    if fault in ("Content-Length 1 TiB", "endless body"):
        assert status["batches_lost"] == 2, "a batch too large to read is counted lost, not hidden"
        assert api.streamed < 64 * LIMIT, f"the client read on: {api.streamed} bytes"
    elif fault in ("groups of the wrong shape", "token ids outside the vocabulary"):
        assert status["groups_rejected"] == (8 if fault == "groups of the wrong shape" else 4)
    elif fault != "batch not a list":
        assert status["retries"] >= 2 and status["last_error"], status
    assert len(json.dumps(status)) < 10_000, "status stays small whatever the server said"


def test_a_register_answer_without_a_uuid_is_retried_not_fatal(tmp_path):
    api = FakeApi([])
    answers = [web.json_response({"detail": "starting"}), web.json_response({"uuid": "x"})]

    async def register(request):
        api.registrations += 1
        return answers.pop(0) if answers else web.json_response({"uuid": 99})

    api.register = register
    batches, status, _ = asyncio.run(fetch_one(api, tmp_path))
    assert len(batches) == 1 and api.registrations == 3 and status["registrations"] == 1
