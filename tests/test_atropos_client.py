"""AtroposClient against the real run-api (atroposlib 0.4.0, from the Atropos venv), on loopback.

Groups are posted straight to /scored_data the way environments post them, so each case is exact; the test with a
real environment process is in test_atropos_env.py. Every run-api started here is stopped when its test ends.
"""

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path

import aiohttp
import pytest

import support
from support import free_port, scored_data, until

from paraloop.atropos.client import AtroposClient
from paraloop.atropos.launch import ProcessGroup, start_run_api
from paraloop.config import AtroposConfig

REPO = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("PARALOOP_ATROPOS_VENV", REPO / ".venv-atropos"))
RUN_API = VENV / "bin" / "run-api"

pytestmark = [
    pytest.mark.atropos,
    pytest.mark.timeout(120),
]


@contextlib.asynccontextmanager
async def running_api(port: int | None = None):
    url = f"http://127.0.0.1:{port or free_port()}"
    async with ProcessGroup(grace=5) as procs:
        await start_run_api(procs, str(RUN_API), url)
        yield procs, url


def make_client(url: str, tmp_path: Path, *, total_steps: int, starting_step: int = 0, **config) -> AtroposClient:
    cfg = AtroposConfig(api_url=url, poll_interval=0.05, max_backoff=0.4, **config)
    return AtroposClient(
        cfg,
        batch_size=4,
        token_budget=4096,
        total_steps=total_steps,
        checkpoint_dir=str(tmp_path),
        starting_step=starting_step,
    )


def group(tag: int, *, env_id: int | None = 0, **changes) -> dict:
    """A valid 2-sequence group as an environment posts it; `tag` is its first token so tests can tell groups apart."""
    posted = support.group([1.0, 0.0], prompt=[tag, 5], completions=[[6, 7], [8]], logprobs=[[-0.5, -0.25], [-2.0]])
    return scored_data(posted, env_id=env_id, **changes)


async def call(url: str, path: str, body=None):
    """GET (no body) or POST a JSON body; the answer decoded (text when it is not JSON)."""
    async with aiohttp.ClientSession() as session:
        # json.dumps writes NaN/Infinity literals, as Python environments do
        kwargs = {} if body is None else {"data": json.dumps(body), "headers": {"Content-Type": "application/json"}}
        async with session.request("GET" if body is None else "POST", url + path, **kwargs) as resp:
            text = await resp.text()
    with contextlib.suppress(ValueError):
        return json.loads(text)
    return text


async def register_env(url: str) -> int:
    answer = await call(
        url, "/register-env", {"max_token_length": 64, "desired_name": "test", "weight": 1.0, "group_size": 2}
    )
    assert answer["status"] == "success", answer
    return answer["env_id"]


async def take(client: AtroposClient, n: int, *, within: float = 30.0) -> list:
    out = []
    async with asyncio.timeout(within):
        async for batch in client.batches():
            out.append(batch)
            if len(out) == n:
                break
    return out


def first_tokens(batch) -> list[int]:
    return [g.tokens[0][0] for g in batch.groups]


def test_register_sends_every_field_and_opens_the_api_to_environments(tmp_path):
    async def scenario():
        async with running_api() as (_, url):
            assert (
                await call(
                    url,
                    "/register-env",
                    {"max_token_length": 64, "desired_name": "early", "weight": 1.0, "group_size": 2},
                )
            )["status"] == "wait for trainer to start"
            client = make_client(url, tmp_path, total_steps=7, wandb_group="grp", max_token_len=100_000)
            uuid = await client.register()
            assert isinstance(uuid, int) and 0 < uuid.bit_length() <= 128
            # Registering also sent the first /batch, so environments may register now.
            assert await register_env(url) == 0
            assert await call(url, "/info") == {"batch_size": 4, "max_token_len": 4096}  # capped by token_budget
            assert (await call(url, "/wandb_info"))["group"] == "grp"
            assert client.status()["registered"] and client.status()["connected"]

    asyncio.run(scenario())


def test_batches_arrive_translated_counting_our_steps_and_the_servers(tmp_path):
    async def scenario():
        async with running_api() as (_, url):
            client = make_client(url, tmp_path, total_steps=2)
            await client.register()
            env_id = await register_env(url)
            for tag in (1, 2, 3, 4):  # two full batches before the next /batch: built by one call
                await call(url, "/scored_data", group(tag, env_id=env_id))
            batches = await take(client, 2)
            status = client.status()
        assert [b.source for b in batches] == ["atropos", "atropos"]
        # One /batch call advanced the server by both batches at once and handed the newest first.
        assert [b.source_step for b in batches] == [2, 2]
        assert [first_tokens(b) for b in batches] == [[3, 4], [1, 2]]
        g = batches[1].groups[0]
        assert g.tokens == [[1, 5, 6, 7], [1, 5, 8]] and g.masks == [[-100, -100, 6, 7], [-100, -100, 8]]
        assert g.inference_logprobs == [[1.0, 1.0, -0.5, -0.25], [1.0, 1.0, -2.0]] and g.env_id == env_id
        assert status["own_step"] == 2 and status["server_step"] == 2
        assert status["per_env"] == {"0": {"groups": 4, "rejected": 0, "sequences": 8}}

    asyncio.run(scenario())


def test_a_resumed_run_registers_at_its_step_and_fetches_past_total_steps_while_asked(tmp_path):
    """The learner, not the count of batches fetched, ends a run: a batch whose groups were all dropped as stale
    trained no step, so the client must fetch past total_steps (a client that stopped ended the run early)."""

    async def scenario():
        async with running_api() as (_, url):
            client = make_client(url, tmp_path, total_steps=6, starting_step=5)
            await client.register()
            assert (await call(url, "/status"))["current_step"] == 5
            for tag in (1, 2, 3, 4):
                await call(url, "/scored_data", group(tag, env_id=None))
            batches = await take(client, 2)
        assert [b.source_state for b in batches] == [{"atropos_step": 6}, {"atropos_step": 7}]
        assert client.status()["own_step"] == 7

    asyncio.run(scenario())


def test_a_batch_answered_to_the_first_batch_call_is_not_lost(tmp_path):
    """run-api keeps its config across trainer registrations: a second trainer's immediate /batch may get a batch."""

    async def scenario():
        async with running_api() as (_, url):
            await make_client(url, tmp_path, total_steps=1).register()
            for tag in (1, 2):
                await call(url, "/scored_data", group(tag, env_id=None))
            client = make_client(url, tmp_path, total_steps=1)
            await client.register()  # its /batch right after /register took the queued batch
            assert (await call(url, "/status"))["queue_size"] == 0
            return await take(client, 1)

    assert [first_tokens(b) for b in asyncio.run(scenario())] == [[1, 2]]


def test_config_starting_step_overrides_the_resumed_step(tmp_path):
    client = AtroposClient(
        AtroposConfig(api_url="http://127.0.0.1:1", starting_step=2),
        batch_size=4,
        token_budget=4096,
        total_steps=10,
        checkpoint_dir="ck",
        starting_step=5,
    )
    assert client.registration() == {
        "wandb_group": "paraloop",
        "wandb_project": "paraloop",
        "batch_size": 4,
        "max_token_len": 4096,
        "checkpoint_dir": "ck",
        "save_checkpoint_interval": 0,
        "starting_step": 2,
        "num_steps": 10,
    }


def test_malformed_groups_are_rejected_with_a_log_line_and_counted(tmp_path, caplog):
    ragged = group(90, masks=[[-100, -100, 6], [-100, -100, 8]])
    wrong_mask = group(91, masks=[[-100, -100, 6, 99], [-100, -100, 8]])
    ragged_logprobs = group(92, inference_logprobs=[[1.0, 1.0, -0.5], [1.0, 1.0, -2.0]])
    short_scores = group(93, scores=[1.0])

    async def scenario():
        async with running_api() as (_, url):
            client = make_client(url, tmp_path, total_steps=3)
            await client.register()
            env_id = await register_env(url)
            posts = [group(1), ragged, wrong_mask, group(2), ragged_logprobs, short_scores, group(3), group(4)]
            for body in posts:
                await call(url, "/scored_data", {**body, "env_id": env_id})
            with caplog.at_level(logging.WARNING, logger="paraloop.atropos"):
                batches = await take(client, 3)
            return batches, client.status()

    batches, status = asyncio.run(scenario())
    assert sorted(t for b in batches for t in first_tokens(b)) == [1, 2, 3, 4]  # never a malformed one
    assert status["groups_rejected"] == 4 and status["groups_received"] == 4
    assert status["batches_received"] == 4  # the batch with no valid group was skipped, not a step
    assert status["per_env"]["0"] == {"groups": 4, "rejected": 4, "sequences": 8}
    rejections = [
        r.getMessage() for r in caplog.records if r.name == "paraloop.atropos" and "rejected group" in r.getMessage()
    ]
    assert len(rejections) == 4
    assert any("masks[0][3] = 99" in line for line in rejections)


def test_a_nan_score_makes_run_api_drop_its_batch_which_is_logged_and_counted(tmp_path, caplog):
    async def scenario():
        async with running_api() as (_, url):
            client = make_client(url, tmp_path, total_steps=1)
            await client.register()
            await call(url, "/scored_data", group(1, scores=[float("nan"), 1.0]))
            await call(url, "/scored_data", group(2))
            with caplog.at_level(logging.WARNING, logger="paraloop.atropos"):
                task = asyncio.ensure_future(take(client, 1))
                await until(lambda: client.status()["batches_lost"] == 1, "the lost batch")
                await call(url, "/scored_data", group(3))
                await call(url, "/scored_data", group(4))
                batches = await task
            return batches, client.status()

    batches, status = asyncio.run(scenario())
    assert [first_tokens(b) for b in batches] == [[3, 4]]
    assert status["batches_lost"] == 1 and status["registrations"] == 1
    assert any("NaN" in r.getMessage() for r in caplog.records if r.name == "paraloop.atropos")


def test_the_api_stopped_and_restarted_mid_run(tmp_path):
    port = free_port()

    async def scenario():
        async with running_api(port) as (procs, url):
            client = make_client(url, tmp_path, total_steps=2)
            await client.register()
            await call(url, "/scored_data", group(1, env_id=None))
            await call(url, "/scored_data", group(2, env_id=None))
            first = await take(client, 1)
            await procs.stop("api")
            task = asyncio.ensure_future(take(client, 1, within=60))
            await until(lambda: client.status()["retries"] >= 3, "retries while run-api is down")
            down = client.status()
            await start_run_api(procs, str(RUN_API), url)
            await until(lambda: client.status()["registrations"] == 2, "registering again")
            # The new run-api continues from our step, and environments may register with it.
            assert (await call(url, "/status"))["current_step"] == 1
            await register_env(url)
            await call(url, "/scored_data", group(3, env_id=None))
            await call(url, "/scored_data", group(4, env_id=None))
            second = await task
            return first, down, second, client.status()

    first, down, second, status = asyncio.run(scenario())
    assert [first_tokens(b) for b in first] == [[1, 2]] and first[0].source_step == 1
    assert down["connected"] is False and down["state"] == "unreachable" and down["last_error"]
    assert [first_tokens(b) for b in second] == [[3, 4]] and second[0].source_step == 2
    assert status["connected"] and status["own_step"] == 2 and status["registrations"] == 2


def test_a_reset_api_is_registered_with_again(tmp_path):
    async def scenario():
        async with running_api() as (_, url):
            client = make_client(url, tmp_path, total_steps=1)
            await client.register()
            task = asyncio.ensure_future(take(client, 1))
            await until(lambda: client.status()["state"] == "waiting for batch", "the client to poll /batch")
            await call(url, "/reset_data")  # /batch now fails with 500 until a trainer registers again
            await until(lambda: client.status()["registrations"] == 2, "registering again")
            await call(url, "/scored_data", group(1, env_id=None))
            await call(url, "/scored_data", group(2, env_id=None))
            return await task, client.status()

    batches, status = asyncio.run(scenario())
    assert [first_tokens(b) for b in batches] == [[1, 2]]
    assert status["batches_lost"] == 0


def test_an_api_that_is_not_up_yet_is_waited_for(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    async def scenario():
        client = make_client(url, tmp_path, total_steps=1)
        registering = asyncio.ensure_future(client.register())
        await until(lambda: client.status()["retries"] >= 2, "retries")
        waiting = client.status()
        async with running_api(port):
            uuid = await asyncio.wait_for(registering, 30)
        return waiting, uuid

    waiting, uuid = asyncio.run(scenario())
    assert waiting["state"] == "registering" and waiting["connected"] is False
    assert "Connect" in waiting["last_error"]
    assert isinstance(uuid, int)
