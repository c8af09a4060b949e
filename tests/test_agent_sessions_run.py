"""A real `paraloop run` in sessions mode on the tiny model (rl_training.source = "sessions"), driven the way an
agent drives it: the official openai client sends tagged turns, rewards form groups, the adapter version advances;
/control/status shows the sessions; a kill -9 after rewards were answered, then --resume, trains every rewarded
group exactly once in the run's lineage (the journal)."""

import os
import signal
import sys
import urllib.request
from pathlib import Path


import pytest
from openai import OpenAI
from support.chromium import find_chromium
from support.agent_sessions import play, play_group, reward, sessions_config, sessions_run, status, trained, wait
from support.runs import call

from support import procs

from paraloop.checkpoint import latest_checkpoint, read_checkpoint

pytestmark = pytest.mark.timeout(400)
REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "agent_sessions.py"


def test_the_openai_client_drives_a_sessions_run_whose_adapter_version_advances(tiny_model_path, tmp_path):
    run_dir = tmp_path / "run"
    config = sessions_config(tmp_path, tiny_model_path, steps=100, batch_size=8)  # up to 3 samples a session
    with sessions_run(config, run_dir) as (proc, base, log):
        client = OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=60)

        def session(sid: str) -> None:
            messages = [{"role": "user", "content": "What is the capital of France?"}]
            first = client.chat.completions.create(
                model="policy", messages=messages, max_tokens=6, metadata={"paraloop_session": sid}
            )
            assert first.choices[0].message.content is not None
            messages += [
                {"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "Are you sure?"},
            ]
            client.chat.completions.create(
                model="policy", messages=messages, max_tokens=6, extra_headers={"X-Paraloop-Session": sid}
            )
            client.completions.create(  # a completions turn of the same session, tagged by the header
                model="policy", prompt="Paris", max_tokens=3, extra_headers={"X-Paraloop-Session": sid}
            )

        for i in range(2):
            session(f"a{i}")
        source = status(base)["source"]
        assert (source["source"], source["open_sessions"], source["turns"]) == ("sessions", 2, 6)
        samples = reward(base, "a0", 1.0, "q1")["samples"]
        assert reward(base, "a1", 0.0, "q1")["group_complete"]
        # The completions turn renders no chat, so it never extends the chat turns: at least two samples
        assert 2 <= samples <= 3
        source = status(base)["source"]
        assert (source["open_sessions"], source["groups_formed"], source["dropped_oversize"]) == (0, 1, 0)
        with urllib.request.urlopen(f"{base}/metrics", timeout=60) as response:  # Prometheus has them too
            page = response.read().decode().splitlines()
        assert 'paraloop_agent_sessions{name="groups_formed"} 1.0' in page
        # Groups of 4 to 6 samples: the batch of 8 closes short when no choice of them fills it exactly
        for tag in range(2, 10):
            if status(base)["serving_version"] >= 2:
                break
            for i in range(2):
                session(f"b{tag}{i}")
            for i in range(2):
                reward(base, f"b{tag}{i}", float((tag + i) % 2), f"q{tag}")
            wait(lambda: status(base)["source"]["groups_waiting"] == 0, "the group to be fetched", proc, log)
        assert status(base)["serving_version"] >= 2, "two steps trained from agent sessions, their adapter served"
        assert call(f"{base}/control/stop", "POST")[0] == 200
        proc.wait(timeout=120)
        assert proc.returncode == 0, log.read_text()[-3000:]
    assert "trained as a separate sample" in log.read_text()  # said once per session whose history did not extend
    final = read_checkpoint(latest_checkpoint(run_dir))
    assert final.step >= 2 and final.trainer_state["trainer"]["version"] >= 2


def test_kill_9_after_rewards_were_answered_then_resume_trains_every_group_exactly_once(tiny_model_path, tmp_path):
    run_dir, trained_log = tmp_path / "run", tmp_path / "trained.jsonl"
    config = sessions_config(tmp_path, tiny_model_path, steps=6)  # two groups of two one-sample sessions a step
    env = {"PARALOOP_TEST_TRAINED_LOG": str(trained_log)}
    options = ("--checkpoint-interval", "2", "--set", "checkpoint.keep_last=1")
    with sessions_run(config, run_dir, *options, env=env, log="first.log") as (first, base, log):
        for tag in range(1, 7):  # steps 1-3; the checkpoint after step 2
            play_group(base, tag, 2)
        wait(lambda: status(base)["step"] == 3, "three steps", first, log)
        assert call(f"{base}/control/pause", "POST")[0] == 200
        for tag in (7, 8):  # rewarded, so journaled before the answer; never trained by this life
            play_group(base, tag, 2)
        wait(
            lambda: (
                (s := status(base))["journal"]["appended"] == 8 and (s["last_checkpoint"] or "").endswith("step_000002")
            ),
            "eight journaled groups and checkpoint 2",
            first,
            log,
        )
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    assert read_checkpoint(latest_checkpoint(run_dir)).step == 2
    with sessions_run(config, run_dir, *options, "--resume", str(run_dir), env=env, log="second.log") as (
        second,
        base,
        log,
    ):
        for tag in range(9, 13):
            play_group(base, tag, 2)
        second.wait(timeout=300)
        assert second.returncode == 0, log.read_text()[-3000:]
    lives: dict[int, list[dict]] = {}
    for line in trained(trained_log):
        lives.setdefault(line["pid"], []).append(line)
    life1, life2 = lives.values()
    assert [s["step"] for s in life1] == [1, 2, 3] and [s["step"] for s in life2] == [3, 4, 5, 6]
    lineage = [t for s in life1[:2] + life2 for t in s["tags"]]
    assert sorted(lineage) == list(range(1, 13)), "every rewarded group trained exactly once in the lineage"
    assert sorted(life2[0]["tags"]) == [5, 6] and sorted(life2[1]["tags"]) == [7, 8]
    assert "replaying 4 journaled group(s)" in log.read_text()


def test_the_agents_sdk_example_trains_a_sessions_run_through_its_own_traffic(tiny_model_path, tmp_path):
    """examples/agent_sessions.py, the real Agents SDK with a calculator function tool and tool_choice "required",
    as the agent: each agent run is one session (the SDK sends the tag as a header on every model call), a
    question's sessions one group; the run trains on them and serves the new adapter."""
    run_dir = tmp_path / "run"
    config = sessions_config(tmp_path, tiny_model_path, steps=100, batch_size=8)
    options = ("--set", "engine.max_tokens_limit=64", "--set", "engine.max_prompt_tokens=2048")  # tools: ~700
    with sessions_run(config, run_dir, *options) as (proc, base, log):
        agent = [
            sys.executable,
            str(EXAMPLE),
            "--url",
            base,
            "--questions",
            "4",
            "--group-size",
            "2",
            "--max-turns",
            "2",
        ]
        done = procs.run(agent, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("group complete: True") == 4, done.stdout
        wait(lambda: status(base)["serving_version"] >= 1, "an adapter trained on the agent's sessions", proc, log)
        source = status(base)["source"]
        assert source["turns"] >= 8 and source["groups_formed"] == 4 and source["dropped_oversize"] == 0
        assert call(f"{base}/control/stop", "POST")[0] == 200
        proc.wait(timeout=120)
        assert proc.returncode == 0, log.read_text()[-3000:]


def test_the_dashboard_shows_the_agent_sessions(tiny_model_path, tmp_path):
    """The page's "Agent sessions" card reads /control/status's source: open sessions, unfinished groups, groups
    waiting for the learner and everything dropped."""
    executable, why = find_chromium()
    if executable is None:
        if os.environ.get("CI"):  # CI installs chromium (make browser): a missing one there is a failure
            pytest.fail(f"CI: {why}", pytrace=False)
        pytest.skip(why)
    from playwright.sync_api import expect, sync_playwright

    run_dir = tmp_path / "run"
    config = sessions_config(tmp_path, tiny_model_path, steps=100, group_size=2)
    with sessions_run(config, run_dir) as (proc, base, log):
        play(base, "open-one", 3)
        play(base, "rewarded", 4)
        reward(base, "rewarded", 1.0, "half-a-group")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=executable, args=["--headless", "--no-sandbox"], timeout=60_000)
            try:
                page = browser.new_page()
                page.set_default_timeout(60_000)
                page.goto(f"{base}/dashboard")
                card = page.locator('[data-kpi="sessions"]')
                expect(card.locator(".value")).to_have_text("1 open")
                expect(card.locator(".sub")).to_have_text("1 unfinished · 0 groups waiting · 0 dropped")
            finally:
                browser.close()
        assert proc.poll() is None, log.read_text()[-3000:]
