"""Agent sessions: rollouts recorded from agents' own requests to the run's OpenAI routes (`source = "sessions"`).

A request tagged with a session (server/session_turns.py reads the tag) is one turn: its prompt's token ids and
the completion's ids, log-probs, kept sets and adapter versions as the engine produced them; nothing is
re-tokenized. A session is a list of samples. A turn whose prompt starts with the current sample's tokens (the
previous prompt and completion) extends that sample: the new prompt tokens (the environment's: tool results, the
next user message, the template's glue) masked, the completion trained. A turn whose prompt does not (a chat
template that rewrites history, e.g. drops past reasoning) or that samples at another temperature starts a new
sample; the log says so once per session.

`reward(session, value, group)` closes a session: its samples join the group of that key, each a row scored with
the session's reward. At `group_size` sessions the group is complete: `hand_over` journals it (run/journal.py, so
a kill -9 loses no group a reward call was answered for) and queues it for the fetcher, which reads `batches()`.

Bounded: open sessions (`max_open`, then 429), tokens per session (`max_session_tokens`, a turn that could pass it
is a 400 naming max_tokens), complete groups waiting plus unfinished group keys (`max_waiting_groups`, then 429),
rows per group (the learner's batch size: a larger group is dropped and counted). A session or unfinished group
idle for `max_age_s` is dropped and counted (`expired_sessions`, `expired_groups`). One turn of a session at a time
(409), so its turns have an order. The event loop alone calls it: no lock.
"""

import logging
import math
import time
from array import array
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from paraloop.config import AgentSessionsConfig
from paraloop.engine import RowAccumulator
from paraloop.messages import PROMPT_MASK, RolloutBatch, ScoredGroup
from paraloop.run.journal import Journal
from paraloop.server.errors import APIError, bad_request

log = logging.getLogger("paraloop.sessions")

SESSION_PARAM = "metadata.paraloop_session"


@dataclass
class Sample:
    """One trained sequence: the tokens of a run of turns that extend each other, and per token what the learner
    needs (trained or not; at trained positions the engine's log-prob, kept set and adapter version). Packed
    arrays: 17 bytes a token (15 measured) where lists of Python ints and floats take about 90 (the engine's
    log-probs are float32 already)."""

    temperature: float
    tokens: array = field(default_factory=lambda: array("i"))
    trained: bytearray = field(default_factory=bytearray)
    logprobs: array = field(default_factory=lambda: array("f"))
    kept: array = field(default_factory=lambda: array("i"))
    versions: array = field(default_factory=lambda: array("i"))  # of the trained tokens only

    def add(self, environment: list[int], row: RowAccumulator) -> None:
        self.tokens.extend(environment + row.tokens)
        self.trained.extend(bytes(len(environment)) + b"\x01" * len(row.tokens))
        self.logprobs.extend([1.0] * len(environment) + row.logprobs)
        self.kept.extend([0] * len(environment) + (row.kept or [0] * len(row.tokens)))
        self.versions.extend(row.versions)

    def extends(self, prompt: list[int]) -> bool:
        n = len(self.tokens)
        return len(prompt) >= n and self.tokens.tolist() == prompt[:n]


@dataclass
class Session:
    last: float  # time.monotonic() of its last turn
    samples: list[Sample] = field(default_factory=list)
    busy: bool = False
    split_logged: bool = False

    @property
    def tokens(self) -> int:
        return sum(len(s.tokens) for s in self.samples)


@dataclass
class Group:
    last: float
    samples: list[Sample] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    sessions: int = 0


def scored_group(samples: list[Sample], scores: list[float]) -> ScoredGroup:
    """The learner's group (the Atropos convention: -100 and 1.0 placeholders where a token is not trained)."""
    return ScoredGroup(
        tokens=[s.tokens.tolist() for s in samples],
        masks=[[t if m else PROMPT_MASK for t, m in zip(s.tokens, s.trained, strict=True)] for s in samples],
        scores=scores,
        inference_logprobs=[s.logprobs.tolist() for s in samples],
        sampling_kept=[s.kept.tolist() for s in samples],
        overrides=[{"temperature": s.temperature} for s in samples],
        versions=[min(s.versions) for s in samples],
    )


class AgentSessions:
    """The sessions of one run; the server's TurnRecorder (server/session_turns.py) and the run's rollout source."""

    def __init__(
        self,
        config: AgentSessionsConfig,
        *,
        batch_size: int,
        journal: Journal | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.batch_size = batch_size
        self.journal = journal
        self.clock = clock
        self.sessions: dict[str, Session] = {}
        self.groups: dict[str, Group] = {}
        self._send, self._receive = anyio.create_memory_object_stream[RolloutBatch](config.max_waiting_groups)
        self._journal_lock = anyio.Lock()
        self._handing = 0  # complete groups between `reward` and the queue (their journal write under way)
        self.counts = dict.fromkeys(
            (
                "turns",
                "split_samples",
                "rewarded_sessions",
                "groups_formed",
                "groups_fetched",
                "expired_sessions",
                "expired_groups",
                "dropped_oversize",
            ),
            0,
        )

    # --- turns (the server's TurnRecorder) ----------------------------------------------------------------------

    def begin(self, session_id: str, prompt: list[int], max_tokens: int) -> None:
        """A turn of `session_id` is about to be generated: refuse it (APIError) unless it fits the bounds."""
        self.expire()
        session = self.sessions.get(session_id)
        if session is None:
            if len(self.sessions) >= self.config.max_open:
                raise APIError(
                    429,
                    f"{len(self.sessions)} sessions are open (rl_training.sessions.max_open): reward or let some "
                    "expire first",
                    param=SESSION_PARAM,
                    code="too_many_sessions",
                )
            session = self.sessions[session_id] = Session(last=self.clock())
        if session.busy:
            raise APIError(
                409,
                f"session {session_id!r} has a turn in flight: one turn of a session at a time",
                param=SESSION_PARAM,
                code="session_busy",
            )
        current = session.samples[-1] if session.samples else None
        new = len(prompt) - (len(current.tokens) if current is not None and current.extends(prompt) else 0)
        limit = self.config.max_session_tokens
        if session.tokens + new + max_tokens > limit:
            if not session.samples:
                del self.sessions[session_id]
            raise bad_request(
                "max_tokens",
                f"session {session_id!r} holds {session.tokens} tokens; this turn's {new} new prompt tokens and "
                f"max_tokens {max_tokens} could pass rl_training.sessions.max_session_tokens = {limit}",
            )
        session.busy = True
        session.last = self.clock()

    def record(self, session_id: str, prompt: list[int], row: RowAccumulator, temperature: float) -> None:
        """The finished turn: its completion extends the session's current sample, or starts a new one."""
        session = self.sessions.get(session_id)
        if session is None or not row.tokens or row.finish_reason == "abort":
            return
        self.counts["turns"] += 1
        current = session.samples[-1] if session.samples else None
        if current is not None and current.extends(prompt) and current.temperature == temperature:
            current.add(prompt[len(current.tokens) :], row)
        else:
            if current is not None:
                self.counts["split_samples"] += 1
                if not session.split_logged:
                    session.split_logged = True
                    why = "another temperature" if current.extends(prompt) else "a prompt that does not extend it"
                    log.info(
                        "session %r: turn %d came with %s (a chat template that rewrites history?): its turns "
                        "from here on are trained as a separate sample (said once per session)",
                        session_id,
                        self.counts["turns"],
                        why,
                    )
            sample = Sample(temperature=temperature)
            sample.add(prompt, row)
            session.samples.append(sample)
        session.last = self.clock()

    def end(self, session_id: str) -> None:
        """The turn is over (recorded or not); a session whose first turn recorded nothing is forgotten."""
        session = self.sessions.get(session_id)
        if session is not None:
            session.busy = False
            if not session.samples:
                del self.sessions[session_id]

    # --- rewards and groups -------------------------------------------------------------------------------------

    def reward(self, session_id: str, value: float, group_key: str) -> tuple[dict[str, Any], ScoredGroup | None]:
        """Close the session with its reward into the group `group_key`: (the answer's fields, the complete group
        for `hand_over` or None). Raises APIError: 404 unknown session, 409 a turn in flight, 429 full."""
        self.expire()
        if not math.isfinite(value):
            raise bad_request("reward", f"must be a finite number, got {value!r}")
        session = self.sessions.get(session_id)
        if session is None:
            raise APIError(
                404,
                f"no open session {session_id!r} (never recorded a turn, already rewarded, or expired)",
                param="session_id",
                code="session_not_found",
            )
        if session.busy:
            raise APIError(
                409,
                f"session {session_id!r} has a turn in flight: reward it once the turn is answered",
                param="session_id",
                code="session_busy",
            )
        group = self.groups.get(group_key)
        if group is None and self.waiting() >= self.config.max_waiting_groups:
            raise APIError(
                429,
                f"{self.waiting()} groups are waiting or unfinished (rl_training.sessions.max_waiting_groups): "
                "the learner is behind; retry later",
                param="group",
                code="too_many_groups",
            )
        del self.sessions[session_id]
        group = self.groups.setdefault(group_key, Group(last=self.clock()))
        group.samples += session.samples
        group.scores += [float(value)] * len(session.samples)
        group.sessions += 1
        group.last = self.clock()
        self.counts["rewarded_sessions"] += 1
        answer = {
            "session_id": session_id,
            "group": group_key,
            "samples": len(session.samples),
            "sessions_in_group": group.sessions,
            "group_size": self.config.group_size,
            "group_complete": group.sessions >= self.config.group_size,
        }
        if group.sessions < self.config.group_size:
            return answer, None
        del self.groups[group_key]
        if len(group.samples) > self.batch_size:
            self.counts["dropped_oversize"] += 1
            log.warning(
                "group %r has %d samples (its sessions split into separate samples), more than a learner batch of "
                "%d sequences: dropped",
                group_key,
                len(group.samples),
                self.batch_size,
            )
            return answer | {"dropped": "more samples than rl_training.batch_size"}, None
        self.counts["groups_formed"] += 1
        self._handing += 1  # counted as waiting until `hand_over` has queued it
        return answer, scored_group(group.samples, group.scores)

    async def hand_over(self, group: ScoredGroup) -> None:
        """Journal a complete group (before the reward call is answered), then queue it for the fetcher."""
        seq = None
        if self.journal is not None:
            batch = RolloutBatch(groups=[group], source="sessions")
            with anyio.CancelScope(shield=True):  # on disk or known not to be, never half way
                async with self._journal_lock:
                    try:
                        seq = await anyio.to_thread.run_sync(self.journal.append, batch)
                    except OSError as e:
                        log.error("journal: cannot write a sessions group (%s); it is trained but not crash-safe", e)
        self._handing -= 1
        self._send.send_nowait(RolloutBatch(groups=[group], source="sessions", journal_seq=seq))

    def waiting(self) -> int:
        """Complete groups queued for the fetcher or on their way there, plus unfinished group keys."""
        return self._send.statistics().current_buffer_used + self._handing + len(self.groups)

    def expire(self) -> None:
        """Drop sessions and unfinished groups idle for longer than max_age_s."""
        horizon = self.clock() - self.config.max_age_s
        old = [k for k, s in self.sessions.items() if s.last < horizon and not s.busy]
        for key in old:
            del self.sessions[key]
        old_groups = [k for k, g in self.groups.items() if g.last < horizon]
        for key in old_groups:
            del self.groups[key]
        self.counts["expired_sessions"] += len(old)
        self.counts["expired_groups"] += len(old_groups)
        if old or old_groups:
            log.info(
                "dropped %d session(s) and %d unfinished group(s) idle for over %gs (rl_training.sessions.max_age_s)",
                len(old),
                len(old_groups),
                self.config.max_age_s,
            )

    # --- the rollout source -------------------------------------------------------------------------------------

    async def batches(self) -> AsyncIterator[RolloutBatch]:
        """Complete groups, one batch each, in the order they completed."""
        async with self._receive:
            async for batch in self._receive:
                self.counts["groups_fetched"] += 1
                yield batch

    def stats(self) -> dict[str, Any]:
        """/control/status "source" (and the dashboard)."""
        self.expire()
        return {
            "source": "sessions",
            "open_sessions": len(self.sessions),
            "turns_in_flight": sum(s.busy for s in self.sessions.values()),
            "unfinished_groups": len(self.groups),
            "groups_waiting": self._send.statistics().current_buffer_used,
            **self.counts,
        }
