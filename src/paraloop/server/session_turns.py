"""A request's agent session: the tag that makes a chat or completion request one recorded turn of a training
run's session (docs/agents.md), and the recorder the run plugs in (run/agent_sessions.py).

The tag: the header `X-Paraloop-Session: <id>` or OpenAI's `metadata: {"paraloop_session": "<id>"}` (both given:
they must agree); an id is 1 to 128 characters of `A-Z a-z 0-9 . _ : -`. A tagged request asks one completion
(n = 1) of the policy (another adapter's tokens are not the policy's to train). Without a recorder (`paraloop
serve`, a run of another rollout source) a tagged request is a 400: nothing would record it.
"""

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from aiohttp import web

from paraloop.engine import RowAccumulator
from paraloop.server.errors import bad_request
from paraloop.server.prepare import Prepared
from paraloop.server.schemas import OpenAISampling
from paraloop.server.state import TurnRecorder

SESSION_HEADER = "X-Paraloop-Session"
SESSION_KEY = "paraloop_session"
SESSION_PARAM = f"metadata.{SESSION_KEY}"
SESSION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def session_of(request: web.Request, body: OpenAISampling) -> str | None:
    """The request's session id, or None when it is not tagged (a 400 naming the field when malformed)."""
    header = request.headers.get(SESSION_HEADER)
    tagged = (body.metadata or {}).get(SESSION_KEY)
    if header is not None and not SESSION_ID.fullmatch(header):
        raise bad_request(SESSION_HEADER, "must be 1 to 128 characters of A-Z a-z 0-9 . _ : -")
    if tagged is not None and not SESSION_ID.fullmatch(tagged):
        raise bad_request(SESSION_PARAM, "must be 1 to 128 characters of A-Z a-z 0-9 . _ : -")
    if header is not None and tagged is not None and header != tagged:
        raise bad_request(SESSION_PARAM, f"names another session than the {SESSION_HEADER} header")
    return header if header is not None else tagged


@contextmanager
def recorded_turn(
    recorder: TurnRecorder | None, session_id: str | None, prepared: Prepared
) -> Iterator[Callable[[list[RowAccumulator]], None]]:
    """Around a tagged request's generation: refuses it before any work when it cannot be a turn, and yields the
    function that records its finished rows (a no-op for an untagged request)."""
    if session_id is None:
        yield lambda rows: None
        return
    if recorder is None:
        raise bad_request(
            SESSION_PARAM, "this server records no sessions (a paraloop run with rl_training.source = 'sessions' does)"
        )
    gen = prepared.request
    if gen.n != 1:
        raise bad_request("n", "a session's turn is one completion (n = 1)")
    if gen.adapter not in (None, "policy"):
        raise bad_request("model", f"a session's turns are the policy's; {gen.adapter!r} is another adapter")
    recorder.begin(session_id, gen.prompt_tokens, gen.params.max_tokens)
    ended = False

    def record(rows: list[RowAccumulator]) -> None:
        # The turn ends with its record, before the answer's last bytes go out: an agent that sends its next turn
        # the moment it has read `[DONE]` must not find this one still in flight (a 409).
        nonlocal ended
        try:
            recorder.record(session_id, gen.prompt_tokens, rows[0], gen.params.temperature)
        finally:
            ended = True
            recorder.end(session_id)

    try:
        yield record
    finally:
        if not ended:  # an error or a disconnect before the record; ended at most once, never a later turn's
            recorder.end(session_id)
