"""The ranks of a distributed run keep watch on each other: joining, addresses, heartbeats and deadlines.

A collective blocks until every rank joins it. When a peer process dies its sockets close and MLX raises at once
(distributed.Ranks turns that into PeerLost, naming the peers the heartbeats find gone); when a peer hangs, or its
machine is cut off, the collective would block forever. So every rank's `Watcher` (on the event loop):

- pings every other rank's GET /ranks every heartbeat_interval; a rank that answers none for peer_timeout is lost;
- ends the run when a collective has waited collective_timeout (naming the ranks that have not reached it);
- at start, bounds the wait for every rank to join (connect_timeout).

Losing a rank ends the process with exit code 1 and one line naming the rank. When the learner's thread is inside
a collective (the usual case) it can never return, so the process ends at once (`hard_exit`); otherwise PeerLost
ends the run through its task group. The newest complete checkpoint stands.
"""

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import anyio
from aiohttp import web

from paraloop.distributed import PeerLost, Ranks, launch_rank
from paraloop.logs import hard_exit
from paraloop.server.errors import APIError
from paraloop.server.responses import json_response

log = logging.getLogger("paraloop.peers")

WILDCARDS = ("", "0.0.0.0", "::", "[::]")


async def connect(backend: str, thread: Any, wait_s: float, *, exit_: Callable[[int, str], Any] = hard_exit) -> Ranks:
    """Join the group the launcher described, on the learner's thread; exit when the others do not come."""

    async def deadline() -> None:
        await anyio.sleep(wait_s)
        exit_(
            1,
            f"error: rank {launch_rank()}: the other ranks did not join within {wait_s:.0f} s "
            "(distributed.connect_timeout); are they all started, with the same hostfile?",
        )

    def join() -> Ranks:
        # The ring's connecting side gives up after ~30 s (its listening side waits for ever): a rank 0 still busy
        # before joining (e.g. downloading the model) is waited for, up to wait_s, by trying again.
        until = time.monotonic() + wait_s
        while True:
            try:
                return Ranks.connect(backend)
            except RuntimeError as e:
                if time.monotonic() + 1 >= until:
                    raise PeerLost(
                        f"rank {launch_rank()}: cannot join the other ranks ({backend} backend): {e}"
                    ) from None
                log.info("rank %d: the other ranks are not there yet (%s): trying again", launch_rank(), e)
                time.sleep(1)

    async with anyio.create_task_group() as tg:
        tg.start_soon(deadline)
        ranks = await thread.call(join)
        tg.cancel_scope.cancel()
    log.info("rank %d of %d joined (%s backend)", ranks.rank, ranks.size, backend)
    return ranks


def advertise_host(settings: Any, rank: int) -> str:
    """The address the other ranks reach this rank's HTTP server at; see distributed.advertise_host."""
    if settings.distributed.advertise_host:
        return settings.distributed.advertise_host
    if settings.server.host not in WILDCARDS:
        return settings.server.host
    with contextlib.suppress(OSError, ValueError, KeyError, IndexError, TypeError):
        hosts = json.loads(Path(os.environ["MLX_HOSTFILE"]).read_text())  # the ring's [["ip:port", ...], ...]
        return hosts[rank][0].rsplit(":", 1)[0]
    return socket.getfqdn()


def bound_port(settings: Any, rank: int) -> int:
    """server.port + rank, so ranks sharing a machine never collide (0 stays 0: any free port)."""
    return settings.server.port + rank if settings.server.port else 0


async def exchange_addresses(ranks: Ranks, thread: Any, host: str, port: int) -> list[dict[str, Any]]:
    """Every rank's {"rank", "url", "pid"}, in rank order, on every rank."""
    mine = {"rank": ranks.rank, "url": f"http://{host}:{port}", "pid": os.getpid()}
    blobs = await thread.call(ranks.gather, json.dumps(mine).encode(), "peers")
    return [json.loads(b) for b in blobs]


class Watcher:
    """Heartbeats and deadlines for one rank; see the module docstring. `run()` returns when `done()` is true."""

    def __init__(
        self,
        ranks: Ranks,
        config: Any,  # DistributedConfig
        *,
        token: str | None,
        done: Callable[[], bool],
        exit_: Callable[[int, str], Any] = hard_exit,
    ) -> None:
        self.ranks, self.config, self.token, self.done, self.exit = ranks, config, token, done, exit_
        self.peers: list[dict[str, Any]] = []
        self.last_ok: dict[int, float] = {}
        self.answers: dict[int, dict[str, Any]] = {}
        self.errors: dict[int, str] = {}
        ranks.blame = self.blame
        ranks.blame_wait = 2 * config.heartbeat_interval + self.ping_timeout

    @property
    def ping_timeout(self) -> float:
        return max(1.0, min(5.0, self.config.peer_timeout / 3))

    def set_peers(self, peers: list[dict[str, Any]]) -> None:
        now = time.monotonic()
        self.peers = [p for p in peers if p["rank"] != self.ranks.rank]
        self.last_ok = {p["rank"]: now for p in self.peers}

    def url_of(self, rank: int) -> str:
        return next((p["url"] for p in self.peers if p["rank"] == rank), f"rank {rank} (its address is not known yet)")

    def describe(self, rank: int) -> str:
        url = next((p["url"] for p in self.peers if p["rank"] == rank), None)
        return f"rank {rank}" + (f" ({url})" if url else "")

    def blame(self) -> str:
        """The peers whose last heartbeat failed, and why (for the error of a failed collective)."""
        return "; ".join(f"{self.describe(r)} is unreachable: {e}" for r, e in sorted(self.errors.items()))

    def status(self) -> dict[str, Any]:
        """For /control/status and GET /ranks."""
        now = time.monotonic()
        flight = self.ranks.in_flight
        return {
            "rank": self.ranks.rank,
            "size": self.ranks.size,
            "collectives": self.ranks.seq,
            "in_collective": None
            if flight is None
            else {"seq": flight.seq, "name": flight.name, "for_s": round(now - flight.started, 3)},
            "peers": {
                str(p["rank"]): {
                    "url": p["url"],
                    "last_heartbeat_s": round(now - self.last_ok[p["rank"]], 3),
                    "error": self.errors.get(p["rank"]),
                }
                for p in self.peers
            },
        }

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        timeout = aiohttp.ClientTimeout(total=self.ping_timeout)
        async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
            task_status.started()
            while not self.done():
                self._check_deadline()
                if self.peers:
                    async with anyio.create_task_group() as tg:
                        for peer in self.peers:
                            tg.start_soon(self._ping, session, peer)
                    if self.done():
                        return
                    now = time.monotonic()
                    lost = [r for r, t in self.last_ok.items() if now - t > self.config.peer_timeout]
                    if lost:
                        self._lose(
                            "; ".join(
                                f"{self.describe(r)} has answered no heartbeat for {now - self.last_ok[r]:.0f} s "
                                f"(distributed.peer_timeout; last error: {self.errors.get(r, 'none')})"
                                for r in lost
                            )
                        )
                await anyio.sleep(self.config.heartbeat_interval)

    async def _ping(self, session: aiohttp.ClientSession, peer: dict[str, Any]) -> None:
        rank = peer["rank"]
        try:
            async with session.get(f"{peer['url']}/ranks") as response:
                body = await response.read()
            self.answers[rank] = json.loads(body) if response.status == 200 else {}
            self.last_ok[rank] = time.monotonic()  # any answer: the process and its event loop are alive
            self.errors.pop(rank, None)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
            self.errors[rank] = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__

    def _check_deadline(self) -> None:
        flight = self.ranks.in_flight
        if flight is None or time.monotonic() - flight.started <= self.config.collective_timeout:
            return
        behind = [
            f"{self.describe(r)} is at collective #{a.get('collectives', '?')}"
            + (f" ({a['in_collective']['name']})" if a.get("in_collective") else "")
            for r, a in sorted(self.answers.items())
            if a.get("collectives", flight.seq) < flight.seq
        ]
        self._lose(
            f"collective {flight.name} #{flight.seq} has waited {time.monotonic() - flight.started:.0f} s "
            f"(distributed.collective_timeout)" + (f": {'; '.join(behind)}" if behind else "")
        )

    def _lose(self, reason: str) -> None:
        reason = f"rank {self.ranks.rank}: {reason}"
        if self.ranks.fail(reason):
            self.exit(
                1,
                f"error: {reason}. The learner is blocked in a collective that cannot finish: exiting "
                "now (the newest complete checkpoint stands)",
            )
        raise PeerLost(reason)


def rank_routes(watcher: Watcher, status: Any, *, follower: bool) -> list[web.RouteDef]:
    """GET /ranks (the heartbeat: this rank and what it sees of the others). On a follower rank, GET
    /control/status reads its own status and POST /control/* answers 409 naming rank 0, which drives the run."""

    async def ranks(request: web.Request) -> web.Response:
        return json_response({**watcher.status(), "step": status.step, "paused": status.paused})

    routes = [web.get("/ranks", ranks, allow_head=False)]
    if not follower:
        return routes

    async def get_status(request: web.Request) -> web.Response:
        return json_response(status.snapshot())

    async def refuse(request: web.Request) -> web.Response:
        raise APIError(
            409,
            f"this is rank {watcher.ranks.rank} of a distributed run: /control is rank 0's, at {watcher.url_of(0)}",
            code="conflict",
        )

    return routes + [web.get("/control/status", get_status, allow_head=False), web.post("/control/{action}", refuse)]
