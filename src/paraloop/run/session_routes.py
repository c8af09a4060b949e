"""POST /v1/sessions/{session_id}/reward: an agent session's reward, and the group it scores with (docs/agents.md).

Body: {"reward": <finite number>, "group": "<key>"} (a key of 1 to 128 characters; sessions of one key form a GRPO
group). Answer: the session's samples and where its group stands; a group complete with this reward is journaled
before the answer (run/agent_sessions.py), so an answered reward is never lost by a crash. Errors are OpenAI's JSON
naming the field: 400 a malformed body, 404 an unknown session, 409 a turn in flight, 429 too many groups waiting.
The bearer token (server.control_token) is enforced by the app's gate, as for every route but /health.
"""

from aiohttp import web

from paraloop.run.agent_sessions import AgentSessions
from paraloop.server.responses import json_response
from paraloop.server.schemas import SessionRewardBody, decode
from paraloop.server.state import STATE


def session_routes(sessions: AgentSessions) -> list[web.RouteDef]:
    async def reward(request: web.Request) -> web.Response:
        max_depth = request.app[STATE].settings.server.max_json_depth
        body = decode(await request.read(), SessionRewardBody, max_depth=max_depth)
        answer, group = sessions.reward(request.match_info["session_id"], body.reward, body.group)
        if group is not None:
            await sessions.hand_over(group)
        return json_response(answer)

    return [web.post("/v1/sessions/{session_id}/reward", reward)]
