"""The Atropos rollout source: registers with run-api as the trainer and turns each GET /batch into a RolloutBatch.

In: an AtroposConfig (api_url, poll_interval, max_backoff, ...) and the run's shape (batch_size in sequences,
token_budget, total_steps, checkpoint_dir, the step to start from). Out: `batches()`, an async iterator of
messages.RolloutBatch (source="atropos", source_step = run-api's current_step when known) for as long as the run
asks: the learner ends the run after total_steps trained steps, and groups dropped as stale or rejected need more
batches than that (environments stop at their own total_steps: run-api's num_steps, total_steps here, when theirs
is -1). `status()` for the status route.

Protocol facts this relies on (atroposlib 0.4.0 run-api, see docs/atropos.md):
- POST /register needs every field of its Registration model; only the first registration sets the config.
- Environments can only register after the trainer's first GET /batch, so one is sent right after registering.
- {"batch": null} means "no full batch yet"; one /batch call may build several batches, advance current_step by
  all of them at once and hand them out newest first, so the server's step can jump: we keep our own count too.
- A restarted run-api (or GET /reset_data) forgets the trainer: /batch then answers {"status": "error"} (or 500
  after a reset). We register again with our own step as starting_step and carry on.
- run-api stores groups without checking their shapes; translate.py rejects the bad ones. A group holding a NaN or
  infinite number cannot be encoded as JSON, so run-api answers that whole batch with a 500 and drops it: counted
  here as a lost batch.
Network errors never escape: the client waits (exponential backoff up to max_backoff) and retries. Only a 4xx
answer to /register (an incompatible server) raises AtroposError.

Answers are untrusted input: a body is read only up to max_response_bytes (a larger one is refused before it is
read), decoded by msgspec (deep nesting is a decode error, not a crash), and a group whose token ids fall outside
the model's vocabulary is rejected like any other malformed group. Each batch's source_state records our step
(`atropos_step`), from which a resumed run's client counts on.
"""

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec

from paraloop.atropos.translate import translate_batch
from paraloop.config import AtroposConfig
from paraloop.messages import RolloutBatch

logger = logging.getLogger("paraloop.atropos")

SMALL_ANSWER_BYTES = 1 << 20  # /register, /info, /status answer a few fields
MIN_BATCH_BYTES = 16 << 20
BYTES_PER_TOKEN = 128  # a token's id, mask, logprobs and advantage as JSON take well under this
READ_CHUNK = 1 << 16


class AtroposError(RuntimeError):
    """run-api answered in a way no retry can fix (e.g. /register rejected our fields)."""


class Unavailable(Exception):
    """run-api could not be reached, timed out, or failed with a 5xx; worth retrying."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AtroposClient:
    """The trainer side of run-api. Besides the run's shape: checkpoint_interval is sent as run-api's
    save_checkpoint_interval (when environments save their own state; 0: never), request_timeout bounds each call."""

    def __init__(
        self,
        config: AtroposConfig,
        *,
        batch_size: int,
        token_budget: int,
        total_steps: int,
        checkpoint_dir: str,
        starting_step: int = 0,
        checkpoint_interval: int = 0,
        request_timeout: float = 60.0,
        vocab_size: int | None = None,
        served: Any = None,
    ) -> None:
        """`served`: the engine's ServedIndex (engine/served.py), which gives fetched rows the adapter version (and
        kept sets) the engine served them with; None: Atropos rows keep no version."""
        if not config.api_url:
            raise ValueError("rl_training.atropos.api_url is not set: the Atropos client needs run-api's URL")
        self.config = config
        self.url = config.api_url.rstrip("/")
        self.batch_size = batch_size
        # A sequence longer than the learner's token budget would not fit in any micro-batch: envs drop those.
        self.max_token_len = min(config.max_token_len, token_budget)
        self.total_steps = total_steps
        self.checkpoint_dir = str(checkpoint_dir)
        self.checkpoint_interval = checkpoint_interval
        self.timeout = aiohttp.ClientTimeout(total=request_timeout)
        self.vocab_size = vocab_size
        self.served = served
        self.max_batch_bytes = config.max_response_bytes or max(
            MIN_BATCH_BYTES, BYTES_PER_TOKEN * batch_size * self.max_token_len
        )
        self.uuid: int | None = None
        self._registered = False
        self._pending: list[Any] = []  # a batch that register()'s first /batch already returned
        self._own_step = config.starting_step if config.starting_step is not None else starting_step
        self._failures = 0  # consecutive failures, drives the backoff
        self._stats: dict[str, Any] = {
            "connected": False,
            "state": "idle",
            "retries": 0,
            "last_error": None,
            "last_error_at": None,
            "server_step": None,
            "registrations": 0,
            "batches_received": 0,
            "batches_lost": 0,
            "groups_received": 0,
            "groups_rejected": 0,
            "sequences_received": 0,
            "sequences_version_known": 0,  # rows the served-completions index found (their adapter version)
        }
        self._per_env: dict[str, dict[str, int]] = defaultdict(lambda: {"groups": 0, "rejected": 0, "sequences": 0})

    def status(self) -> dict[str, Any]:
        """Connection state and counters, JSON-ready (env ids as strings: "none" for groups without one)."""
        return {
            **self._stats,
            "url": self.url,
            "registered": self._registered,
            "own_step": self._own_step,
            "total_steps": self.total_steps,
            "per_env": {k: dict(v) for k, v in self._per_env.items()},
        }

    # --- registration -------------------------------------------------------------------------------------------------

    def registration(self) -> dict[str, Any]:
        """The POST /register body: every field run-api requires (422 otherwise)."""
        return {
            "wandb_group": self.config.wandb_group,
            "wandb_project": self.config.wandb_project,
            "batch_size": self.batch_size,
            "max_token_len": self.max_token_len,
            "checkpoint_dir": self.checkpoint_dir,
            "save_checkpoint_interval": self.checkpoint_interval,
            "starting_step": self._own_step,
            "num_steps": self.total_steps,
        }

    async def register(self) -> int:
        """Register as the trainer (waiting while run-api is unreachable), then GET /batch at once so environments
        may register. Returns the trainer uuid (a 128-bit int)."""
        self._stats["state"] = "registering"
        while True:
            try:
                answer = await self._request("POST", "/register", json=self.registration())
                uuid = answer.get("uuid") if isinstance(answer, dict) else None
                if not isinstance(uuid, int):  # a proxy's error page, a server mid-restart: try again
                    raise Unavailable(f"POST /register answered without an integer uuid: {answer!r:.200}")
                try:
                    first = await self._request("GET", "/batch", limit=self.max_batch_bytes)
                except TooLarge as e:
                    first = self._lost_too_large(e)
                info = await self._request("GET", "/info")
                break
            except Unavailable as e:
                await self._failed(e)
        self._succeeded()
        self.uuid, self._registered = uuid, True
        self._stats["registrations"] += 1
        if isinstance(first, dict) and first.get("batch"):
            self._pending.append(first["batch"])
        server_batch = info.get("batch_size") if isinstance(info, dict) else None
        if server_batch not in (None, -1, self.batch_size):
            logger.warning(
                "run-api at %s was configured by an earlier registration with batch_size %s (ours: %d): batches "
                "will hold %s sequences; restart run-api to change it",
                self.url,
                server_batch,
                self.batch_size,
                server_batch,
            )
        logger.info("registered with Atropos API %s as trainer (starting_step %d)", self.url, self._own_step)
        return uuid

    # --- the rollout stream -------------------------------------------------------------------------------------------

    async def batches(self) -> AsyncIterator[RolloutBatch]:
        """Yield one RolloutBatch per server batch until the consumer stops asking; never raises on network errors.
        Not bounded by total_steps: a batch whose groups are dropped (too stale, rejected) trains no step, so the
        learner may need more batches than total_steps, and stopping here would end its run early."""
        while True:
            if not self._registered:
                await self.register()
            raw = self._pending.pop(0) if self._pending else await self._next_raw_batch()
            if raw is None:
                continue
            batch = await self._translate(raw)
            if batch is not None:
                yield batch

    async def _next_raw_batch(self) -> Any:
        """One GET /batch: the batch, or None after waiting (empty queue, error, lost registration)."""
        self._stats["state"] = "waiting for batch"
        try:
            answer = await self._request("GET", "/batch", limit=self.max_batch_bytes)
        except TooLarge as e:
            await self._failed(e)
            return self._lost_too_large(e)
        except Unavailable as e:
            await self._failed(e)
            if e.status is not None:
                await self._diagnose_server_error(e)
            return None
        self._succeeded()
        if not isinstance(answer, dict):
            await self._failed(Unavailable(f"GET /batch answered {type(answer).__name__}, not a JSON object"))
            return None
        if answer.get("status") == "error":
            self._lost_registration(f"GET /batch answered {answer.get('message', 'error')!r}")
            return None
        if answer.get("batch") is None:
            await asyncio.sleep(self.config.poll_interval)
            return None
        return answer["batch"]

    async def _translate(self, raw: Any) -> RolloutBatch | None:
        groups, rejected = translate_batch(raw)
        if self.vocab_size is not None:
            groups, rejected = self._in_vocab(groups, rejected)
        self._stats["batches_received"] += 1
        self._stats["groups_received"] += len(groups)
        self._stats["groups_rejected"] += len(rejected)
        if self.served is not None:
            groups = self._annotate(groups)
        for group in groups:
            env = self._per_env[_env_key(group.env_id)]
            env["groups"] += 1
            env["sequences"] += len(group.tokens)
            self._stats["sequences_received"] += len(group.tokens)
        for env_id, _ in rejected:
            self._per_env[_env_key(env_id)]["rejected"] += 1
        if not groups:
            logger.warning("every group of a batch was rejected: waiting for the next batch")
            return None
        self._own_step += 1
        self._stats["server_step"] = await self._server_step()
        return RolloutBatch(
            groups=groups,
            source="atropos",
            source_step=self._stats["server_step"],
            source_state={"atropos_step": self._own_step},
        )

    def _annotate(self, groups: list[Any]) -> list[Any]:
        """Versions (and kept sets) from the engine's index of the completions it served; a group any row of which
        is not found keeps none."""
        out = []
        for group in groups:
            annotated, known = self.served.annotate(group)
            self._stats["sequences_version_known"] += known
            out.append(annotated)
        return out

    def _in_vocab(self, groups: list[Any], rejected: list[Any]) -> tuple[list[Any], list[Any]]:
        """Reject groups holding a token id the model does not have (the learner would index past its
        embedding)."""
        kept = []
        for group in groups:
            bad = next((t for row in group.tokens for t in row if not 0 <= t < self.vocab_size), None)
            if bad is None:
                kept.append(group)
                continue
            why = f"token id {bad} is outside the model's vocabulary [0, {self.vocab_size})"
            logger.warning("rejected a group of a batch (env_id %s): %s", group.env_id, why)
            rejected.append((group.env_id, why))
        return kept, rejected

    async def _server_step(self) -> int | None:
        try:
            answer = await self._request("GET", "/status")
        except Unavailable as e:
            logger.debug("GET /status failed: %s", e)
            return None
        step = answer.get("current_step") if isinstance(answer, dict) else None
        return step if isinstance(step, int) else None

    async def _diagnose_server_error(self, error: Unavailable) -> None:
        """A 5xx from /batch: either run-api was reset (it forgot the trainer) or it failed to encode a batch."""
        try:
            info = await self._request("GET", "/info")
        except Unavailable:
            return  # unreachable now: the next /batch tells more
        if isinstance(info, dict) and info.get("batch_size") == -1:
            self._lost_registration(f"GET /batch failed ({error}) and /info reports no trainer config")
            return
        self._stats["batches_lost"] += 1
        logger.warning(
            "run-api failed to send a batch (%s) and dropped it: a group holding a NaN or infinite number "
            "cannot be encoded as JSON by run-api; check the environment's scores and logprobs",
            error,
        )

    def _lost_too_large(self, error: "TooLarge") -> None:
        self._stats["batches_lost"] += 1
        logger.error(
            "run-api answered /batch with more than max_response_bytes (%s): not read, so its batch is lost", error
        )

    def _lost_registration(self, why: str) -> None:
        logger.warning(
            "Atropos API %s forgot this trainer (%s): registering again at step %d", self.url, why, self._own_step
        )
        self._registered = False
        self._pending.clear()

    # --- HTTP and retries ---------------------------------------------------------------------------------------------

    async def _request(self, method: str, path: str, *, json: Any = None, limit: int = SMALL_ANSWER_BYTES) -> Any:
        # A session per request: at one poll a second its cost is nothing, and no session outlives its task however
        # the iteration ends (cancelled, abandoned, finished), so there is nothing to close.
        try:
            async with (
                aiohttp.ClientSession(timeout=self.timeout) as session,
                session.request(method, self.url + path, json=json) as resp,
            ):
                if resp.status >= 500:
                    raise Unavailable(f"{method} {path} answered HTTP {resp.status}", status=resp.status)
                if resp.status >= 400:
                    text = (await resp.content.read(500)).decode(errors="replace")
                    raise AtroposError(f"{method} {self.url}{path} answered HTTP {resp.status}: {text}")
                body = await _read_bounded(resp, limit, f"{method} {path}")
            return msgspec.json.decode(body)
        except (TimeoutError, aiohttp.ClientError, ValueError, RecursionError) as e:  # not JSON, or nested too deep
            raise Unavailable(f"{method} {path}: {type(e).__name__}: {e}"[:500].rstrip(": ")) from None

    async def _failed(self, error: Unavailable) -> None:
        """Record a failure and wait: poll_interval * 2**k, capped at max_backoff."""
        if self._failures == 0:  # once per streak; every retry is in status()
            logger.warning(
                "Atropos API %s: %s; retrying (backoff up to %.0f s)", self.url, error, self.config.max_backoff
            )
        self._failures += 1
        self._stats.update(
            connected=False, retries=self._stats["retries"] + 1, last_error=str(error), last_error_at=time.time()
        )
        if self._stats["state"] != "registering":
            self._stats["state"] = "unreachable" if error.status is None else "server error"
        delay = min(self.config.max_backoff, self.config.poll_interval * 2 ** (self._failures - 1))
        await asyncio.sleep(delay)

    def _succeeded(self) -> None:
        if self._failures:
            logger.info("Atropos API %s answering again after %d failed attempts", self.url, self._failures)
        self._failures = 0
        self._stats["connected"] = True


def _env_key(env_id: int | None) -> str:
    return "none" if env_id is None else str(env_id)


class TooLarge(Unavailable):
    """An answer larger than the client reads (max_response_bytes)."""


async def _read_bounded(resp: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    """The body, refused (TooLarge) as soon as it is known to exceed `limit`: before reading when the server says
    its length, else once `limit` bytes have arrived."""
    if resp.content_length is not None and resp.content_length > limit:
        raise TooLarge(f"{what}: {resp.content_length} bytes, more than {limit}", status=resp.status)
    chunks, size = [], 0
    while chunk := await resp.content.read(READ_CHUNK):
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"{what}: more than {limit} bytes", status=resp.status)
        chunks.append(chunk)
    return b"".join(chunks)
