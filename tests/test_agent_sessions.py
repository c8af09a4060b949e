"""Agent sessions' store (run/agent_sessions.py): turns recorded into samples by token ids, bounds, groups formed
by reward, journaled before the reward is answered."""

import logging

import anyio
import pytest

from paraloop.config import AgentSessionsConfig
from paraloop.engine import RowAccumulator
from paraloop.messages import PROMPT_MASK, RolloutBatch
from paraloop.run.agent_sessions import AgentSessions
from paraloop.run.journal import Journal
from paraloop.server.errors import APIError


def row(tokens, *, version=0, finish="stop"):
    r = RowAccumulator(finish_reason=finish)
    r.tokens, r.logprobs = list(tokens), [-0.5 - i for i in range(len(tokens))]
    r.versions, r.kept = [version] * len(tokens), [0] * len(tokens)
    return r


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def store(**config):
    clock = Clock()
    return AgentSessions(AgentSessionsConfig(**config), batch_size=8, clock=clock), clock


def turn(sessions, sid, prompt, completion, *, temperature=1.0, version=0):
    sessions.begin(sid, prompt, 16)
    try:
        sessions.record(sid, prompt, row(completion, version=version), temperature)
    finally:
        sessions.end(sid)


def group_of(sessions, sid, reward=1.0, key="g"):
    answer, group = sessions.reward(sid, reward, key)
    return answer, group


def test_a_turn_whose_prompt_extends_the_last_is_one_sample_with_the_environments_tokens_masked():
    sessions, _ = store(group_size=1)
    turn(sessions, "s", [1, 2, 3], [10, 11], version=3)
    turn(sessions, "s", [1, 2, 3, 10, 11, 4, 5], [12, 13, 14], version=4)
    _, group = group_of(sessions, "s", 0.5)
    assert group.tokens == [[1, 2, 3, 10, 11, 4, 5, 12, 13, 14]]
    m = PROMPT_MASK
    assert group.masks == [[m, m, m, 10, 11, m, m, 12, 13, 14]]
    assert group.inference_logprobs == [[1.0, 1.0, 1.0, -0.5, -1.5, 1.0, 1.0, -0.5, -1.5, -2.5]]
    assert group.sampling_kept == [[0] * 10]
    assert group.versions == [3]  # the oldest trained token's
    assert group.scores == [0.5]
    assert group.overrides == [{"temperature": 1.0}]


def test_a_rewritten_history_makes_separate_samples_and_the_log_says_so_once(caplog):
    sessions, _ = store(group_size=1)
    with caplog.at_level(logging.INFO, logger="paraloop.sessions"):
        turn(sessions, "s", [1, 2, 3], [10, 11])
        turn(sessions, "s", [1, 2, 3, 99, 4], [12])  # the template dropped 10, 11 (past reasoning) and wrote 99
        turn(sessions, "s", [1, 2, 7], [13])  # rewritten again: a third sample, no second log line
    assert sum("separate sample" in r.message for r in caplog.records) == 1
    _, group = group_of(sessions, "s", 2.0)
    m = PROMPT_MASK
    assert group.tokens == [[1, 2, 3, 10, 11], [1, 2, 3, 99, 4, 12], [1, 2, 7, 13]]
    assert group.masks == [[m, m, m, 10, 11], [m, m, m, m, m, 12], [m, m, m, 13]]
    assert group.scores == [2.0, 2.0, 2.0]
    assert sessions.stats()["split_samples"] == 2


def test_another_temperature_starts_a_new_sample():
    sessions, _ = store(group_size=1)
    turn(sessions, "s", [1], [10], temperature=1.0)
    turn(sessions, "s", [1, 10, 2], [11], temperature=0.7)
    _, group = group_of(sessions, "s")
    assert group.tokens == [[1, 10], [1, 10, 2, 11]]
    assert group.overrides == [{"temperature": 1.0}, {"temperature": 0.7}]


def test_an_aborted_turn_is_not_recorded_and_a_session_with_nothing_recorded_is_forgotten():
    sessions, _ = store()
    sessions.begin("s", [1, 2], 8)
    sessions.record("s", [1, 2], row([5], finish="abort"), 1.0)
    sessions.end("s")
    assert sessions.stats()["open_sessions"] == 0
    with pytest.raises(APIError) as e:
        sessions.reward("s", 1.0, "g")
    assert e.value.status == 404 and e.value.param == "session_id"


def test_group_size_sessions_of_one_key_form_a_group_and_other_keys_wait():
    sessions, _ = store(group_size=3)
    for i, sid in enumerate(["a", "b", "x", "c"]):
        turn(sessions, sid, [1, 2], [10 + i])
    assert group_of(sessions, "a", 1.0)[1] is None
    assert group_of(sessions, "x", 1.0, key="other")[1] is None
    answer, none = group_of(sessions, "b", 0.0)
    assert none is None and answer["sessions_in_group"] == 2 and not answer["group_complete"]
    answer, group = group_of(sessions, "c", 0.5)
    assert answer["group_complete"] and answer["group_size"] == 3
    assert group.tokens == [[1, 2, 10], [1, 2, 11], [1, 2, 13]]
    assert group.scores == [1.0, 0.0, 0.5]
    stats = sessions.stats()
    assert (stats["unfinished_groups"], stats["rewarded_sessions"], stats["groups_formed"]) == (1, 4, 1)


def test_bounds_refuse_before_anything_is_recorded():
    sessions, clock = store(max_open=2, max_session_tokens=32, max_waiting_groups=1, group_size=2)
    turn(sessions, "a", [1] * 8, [2] * 8)
    turn(sessions, "b", [1], [2])
    with pytest.raises(APIError) as e:  # a third open session
        sessions.begin("c", [1], 4)
    assert e.value.status == 429 and e.value.param == "metadata.paraloop_session"
    with pytest.raises(APIError) as e:  # 16 recorded + 4 new + 16 max_tokens > 32
        sessions.begin("a", [1] * 8 + [2] * 8 + [3] * 4, 16)
    assert e.value.status == 400 and e.value.param == "max_tokens"
    sessions.begin("a", [1] * 8 + [2] * 8 + [3] * 4, 12)  # exactly 32 fits
    with pytest.raises(APIError) as e:  # one turn of a session at a time
        sessions.begin("a", [1] * 20, 1)
    assert e.value.status == 409
    with pytest.raises(APIError) as e:  # nor a reward while it is in flight
        sessions.reward("a", 1.0, "g")
    assert e.value.status == 409
    sessions.end("a")
    with pytest.raises(APIError) as e:
        sessions.reward("a", float("nan"), "g")
    assert e.value.status == 400 and e.value.param == "reward"
    group_of(sessions, "a", 1.0, key="g")  # one unfinished group key: max_waiting_groups reached
    with pytest.raises(APIError) as e:
        sessions.reward("b", 1.0, "h")
    assert e.value.status == 429 and e.value.param == "group"
    assert sessions.stats()["open_sessions"] == 1  # refused: "b" stays open, its reward can be sent again


def test_idle_sessions_and_unfinished_groups_expire_and_are_counted():
    sessions, clock = store(max_age_s=60, group_size=2)
    turn(sessions, "a", [1], [2])
    turn(sessions, "b", [1], [2])
    group_of(sessions, "b", 1.0)
    clock.now += 61
    stats = sessions.stats()
    assert (stats["open_sessions"], stats["unfinished_groups"]) == (0, 0)
    assert (stats["expired_sessions"], stats["expired_groups"]) == (1, 1)
    with pytest.raises(APIError) as e:
        sessions.reward("a", 1.0, "g")
    assert e.value.status == 404


def test_a_group_with_more_samples_than_a_batch_is_dropped_and_counted():
    sessions, _ = store(group_size=1)
    sessions.batch_size = 2
    turn(sessions, "s", [1], [2])
    turn(sessions, "s", [9], [2])
    turn(sessions, "s", [8], [2])
    answer, group = group_of(sessions, "s")
    assert group is None and "dropped" in answer
    assert sessions.stats()["dropped_oversize"] == 1


def test_a_complete_group_is_journaled_before_it_is_queued_and_comes_out_of_batches(tmp_path):
    journal = Journal(tmp_path)
    sessions = AgentSessions(AgentSessionsConfig(group_size=2), batch_size=8, journal=journal)

    async def main():
        with anyio.fail_after(10):
            for sid in ("a", "b"):
                turn(sessions, sid, [1, 2], [3])
            _, group = sessions.reward("a", 1.0, "g")
            _, group = sessions.reward("b", 0.0, "g")
            await sessions.hand_over(group)
            assert journal.entries() == [0]  # on disk before the fetcher has seen it
            assert sessions.stats()["groups_waiting"] == 1
            batches = sessions.batches()
            batch = await anext(batches)
            await batches.aclose()
            return batch

    batch = anyio.run(main)
    assert isinstance(batch, RolloutBatch) and batch.source == "sessions" and batch.journal_seq == 0
    assert journal.read(0).groups == batch.groups
    assert batch.groups[0].scores == [1.0, 0.0]


def test_staleness_acts_on_the_oldest_trained_tokens_version_in_both_modes():
    from paraloop.config import RLTrainingConfig
    from paraloop.run.buffer import RolloutBuffer

    for mode in ("sync", "async"):
        rl = RLTrainingConfig(source="sessions", mode=mode, max_staleness=1)
        assert rl.staleness.max_versions == 1 and rl.staleness.drops
    sessions, _ = store(group_size=1)
    turn(sessions, "old", [1], [2], version=3)
    turn(sessions, "old", [1, 2, 5], [6], version=5)  # one sample; its oldest trained token is v3
    turn(sessions, "new", [1], [2], version=4)
    old, new = group_of(sessions, "old")[1], group_of(sessions, "new", key="h")[1]
    assert (old.versions, new.versions) == ([3], [4])
    buffer = RolloutBuffer(batch_size=1, max_staleness=1, stale_policy="drop")
    buffer.put(old, source="sessions")
    buffer.put(new, source="sessions")
    batch = buffer.take(version=5)
    assert batch.groups == [new] and batch.dropped_stale == 1


def test_the_source_key_must_agree_with_atropos_api_url():
    from pydantic import ValidationError

    from paraloop.config import RLTrainingConfig

    assert RLTrainingConfig().rollout_source == "mock"
    assert RLTrainingConfig(atropos={"api_url": "http://x:1"}).rollout_source == "atropos"
    assert RLTrainingConfig(source="sessions").rollout_source == "sessions"
    with pytest.raises(ValidationError, match="atropos.api_url"):
        RLTrainingConfig(source="sessions", atropos={"api_url": "http://x:1"})
    with pytest.raises(ValidationError, match="needs atropos.api_url"):
        RLTrainingConfig(source="atropos")


class SlowJournal:
    """A journal whose writes take a while (a slow disk): rewards arrive while a group is being written."""

    def __init__(self):
        self.batches = []

    def append(self, batch):
        import time

        time.sleep(0.3)
        self.batches.append(batch)
        return len(self.batches) - 1


def test_a_group_being_journaled_counts_as_waiting_so_the_queue_never_overflows():
    sessions = AgentSessions(AgentSessionsConfig(group_size=1, max_waiting_groups=1), batch_size=8)
    sessions.journal = SlowJournal()
    for sid in ("a", "b"):
        turn(sessions, sid, [1], [2])
    refused = []

    async def reward(sid, key):
        try:
            _, group = sessions.reward(sid, 1.0, key)
        except APIError as e:
            refused.append((sid, e.status, e.param))
            return
        await sessions.hand_over(group)

    async def main():
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(reward, "a", "g")
                await anyio.sleep(0.05)  # a's group is being written
                tg.start_soon(reward, "b", "h")

    anyio.run(main)
    assert refused == [("b", 429, "group")]
    assert sessions.stats()["groups_waiting"] == 1 and sessions.stats()["open_sessions"] == 1


def test_preflight_refuses_what_sessions_mode_cannot_honour():
    from paraloop.config import load_config
    from paraloop.run.preflight import settings_problems

    def problems(**rl):
        data = {"model": {"base_path": "m", "auto_init_lora": True}, "rl_training": {"source": "sessions", **rl}}
        return settings_problems(load_config(None, data))

    assert not [p for p in problems() if "sessions" in p]
    assert any("group_size = 8 sessions can never fit" in p for p in problems(batch_size=4, sessions={"group_size": 8}))
    data = {"model": {"base_path": "m"}, "rl_training": {"source": "sessions"}, "distill": {"teacher": "t"}}
    assert any(
        "not supported with rl_training.source = 'sessions'" in p for p in settings_problems(load_config(None, data))
    )
