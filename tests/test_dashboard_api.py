"""The dashboard's data: rollout samples as a person reads them, runs' files read incrementally and bounded, and the
JSON API (bounds answered 400 naming the parameter, an allowlist of static files, the token gate)."""

import json
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from anyio.from_thread import start_blocking_portal
import support

from paraloop.dashboard.command import make_files_app
from paraloop.dashboard.sources import MAX_ROWS, MetricsFile, RunFiles, read_rollout_tail, run_state
from paraloop.learn.advantages import group_advantages
from paraloop.messages import RolloutBatch, ScoredGroup
from paraloop.run.samples import rollout_samples
from paraloop.server.app import serve_http


class ByteTokenizer:
    """Token id = one UTF-8 byte, so a multi-byte character spans tokens (as with real BPE vocabularies)."""

    def decode(self, tokens, skip_special_tokens=False):
        return bytes(tokens).decode("utf-8", errors="replace")


def group(prompt: str, completions: list[str], scores: list[float], version: int = 4) -> ScoredGroup:
    """The texts as byte tokens; a completion's i-th token was sampled with log-prob -0.1 (i + 1)."""
    rows = [list(c.encode()) for c in completions]
    return support.group(
        scores,
        prompt=list(prompt.encode()),
        completions=rows,
        version=version,
        logprobs=[[-0.1 * (i + 1) for i in range(len(row))] for row in rows],
    )


def test_samples_are_the_best_and_worst_of_each_group_with_grpo_advantages():
    batch = RolloutBatch(
        source="mock",
        groups=[
            group("Q1: ", ["café", "no", "tea"], [0.5, 0.0, 1.0]),
            group("Q2: ", ["x", "y"], [1.0, 1.0]),
        ],
    )
    grpo = lambda scores, index: group_advantages(scores, index, scale="group", eps=1e-4)  # noqa: E731
    samples = rollout_samples(batch, ByteTokenizer(), step=7, version=5, k=3, advantages=grpo, max_tokens=64)
    assert [(s["group"], s["row"]) for s in samples] == [(0, 2), (0, 1), (1, 1)]
    best, worst, tie = samples
    assert best["prompt"] == "Q1: " and "".join(best["tokens"]) == "tea" and best["reward"] == 1.0
    expected = group_advantages(np.array([0.5, 0.0, 1.0]), np.zeros(3, int), scale="group", eps=1e-4)
    assert best["advantage"] == pytest.approx(expected[2]) and worst["advantage"] == pytest.approx(expected[1])
    assert tie["advantage"] == 0.0, "equal scores carry no signal"
    assert best["logprobs"] == pytest.approx([-0.1, -0.2, -0.3]), "each token keeps its engine log-prob"
    assert (best["step"], best["adapter_version"], best["rollout_version"]) == (7, 5, 4)
    cafe = rollout_samples(
        RolloutBatch(source="mock", groups=[group("Q: ", ["café"], [1.0])]),
        ByteTokenizer(),
        step=1,
        version=1,
        k=1,
        advantages=grpo,
        max_tokens=64,
    )[0]
    assert cafe["tokens"] == ["c", "a", "f", "", "é"], "a character split across tokens shows once, whole"
    assert len(cafe["tokens"]) == len(cafe["logprobs"])


def test_samples_are_bounded_whatever_the_environment_sends():
    long = "z" * 5000
    batch = RolloutBatch(source="atropos", groups=[group("P" * 3000, [long, "a"], [1.0, 0.0])])
    grpo = lambda scores, index: group_advantages(scores, index, scale="group", eps=1e-4)  # noqa: E731
    s = rollout_samples(batch, ByteTokenizer(), step=1, version=1, k=4, advantages=grpo, max_tokens=100)[0]
    assert len(s["tokens"]) == 100 and s["completion_truncated"]
    assert len(s["prompt"]) == 100 and s["prompt_truncated"]
    assert rollout_samples(batch, ByteTokenizer(), step=1, version=1, k=0, advantages=grpo, max_tokens=100) == []


def write_rows(path: Path, steps, **extra) -> None:
    with path.open("a") as f:
        for step in steps:
            f.write(json.dumps({"step": step, "reward_mean": step / 10, **extra}) + "\n")


def test_metrics_file_is_read_incrementally_and_a_rewritten_step_bumps_rev(tmp_path):
    path = tmp_path / "metrics.jsonl"
    f = MetricsFile(path)
    f.refresh()
    assert f.history == [] and "does not exist" in f.note
    write_rows(path, [1, 2])
    with path.open("a") as out:
        out.write('{"step": 3, "reward_m')  # a line still being written
    f.refresh()
    assert [r["step"] for r in f.history] == [1, 2]
    rev = f.rev
    with path.open("a") as out:
        out.write('ean": 0.3}\nnot json\n')
    f.refresh()
    assert [r["step"] for r in f.history] == [1, 2, 3] and f.rev == rev and "skipped a line" in f.note
    write_rows(path, [2], resumed=True)  # a resumed run writes step 2 again: the newest wins
    f.refresh()
    assert f.rev == rev + 1 and f.history[1]["resumed"] is True and len(f.history) == 3
    path.write_text("")  # replaced by a new run
    write_rows(path, [1])
    f.refresh()
    assert [r["step"] for r in f.history] == [1]


def write_eval(path: Path, step: int, task: str = "mock:arithmetic", reward: float = 0.5) -> None:
    with path.open("a") as f:
        f.write(
            json.dumps(
                {
                    "kind": "eval",
                    "time": 1.0,
                    "step": step,
                    "version": step,
                    "task": task,
                    "reward_mean": reward,
                    "pass@1": reward / 2,
                }
            )
            + "\n"
        )


def test_held_out_evaluations_are_kept_apart_from_the_steps_one_per_step_and_task(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_eval(path, 0, reward=0.1)  # the starting adapter, before step 1
    write_rows(path, [1, 2])
    write_eval(path, 2, reward=0.4)
    write_eval(path, 2, task="gsm8k", reward=0.2)
    f = MetricsFile(path)
    f.refresh()
    assert [r["step"] for r in f.history] == [1, 2] and "kind" not in f.history[1], "an evaluation is not a step"
    assert [(e["step"], e["task"], e["reward_mean"]) for e in f.evals] == [
        (0, "mock:arithmetic", 0.1),
        (2, "gsm8k", 0.2),
        (2, "mock:arithmetic", 0.4),
    ]
    write_eval(path, 2, reward=0.6)  # a resumed run evaluated step 2 again: the newest wins
    f.refresh()
    assert [e["reward_mean"] for e in f.evals if e["task"] == "mock:arithmetic"] == [0.1, 0.6]
    path.write_text("")
    write_rows(path, [1])
    f.refresh()
    assert f.evals == [], "a new run's file: the old evaluations are gone"


def test_the_run_state_says_pausing_until_the_pause_holds():
    assert run_state({"step": 3, "total_steps": 10}) == "training"
    assert run_state({"step": 3, "total_steps": 10, "paused": True, "learner_held": False}) == "pausing"
    assert run_state({"step": 4, "total_steps": 10, "paused": True, "learner_held": True}) == "paused"
    assert run_state({"step": 4, "total_steps": 10, "paused": True, "stopping": True}) == "stopping"


def test_rollout_tail_keeps_the_last_steps_and_skips_junk(tmp_path):
    path = tmp_path / "rollouts.jsonl"
    lines = [json.dumps({"step": s, "samples": [{"reward": s}]}) for s in range(1, 30)]
    path.write_text("\n".join(lines[:10] + ["garbage", '{"step": "x"}'] + lines[10:]) + "\n")
    entries = read_rollout_tail(path, keep=5)
    assert [e["step"] for e in entries] == [25, 26, 27, 28, 29]
    assert read_rollout_tail(tmp_path / "missing.jsonl", keep=5) == []


def test_a_long_history_arrives_in_bounded_pages(tmp_path):
    run = tmp_path / "big"
    run.mkdir()
    write_rows(run / "metrics.jsonl", range(1, MAX_ROWS + 11))
    source = RunFiles([run])
    first = source.metrics(0, -1, None)
    assert len(first["rows"]) == MAX_ROWS and first["more"]
    rest = source.metrics(0, first["rows"][-1]["step"], first["rev"])
    assert [r["step"] for r in rest["rows"]] == list(range(MAX_ROWS + 1, MAX_ROWS + 11)) and not rest["more"]


@contextmanager
def files_app(dirs, token=None):
    with start_blocking_portal("asyncio") as portal:
        future, port = portal.start_task(serve_http, make_files_app(dirs, token=token), "127.0.0.1", 0)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            future.cancel()


def get(url: str, token: str | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def make_run(root: Path, name: str, steps: int, token: str | None = None) -> Path:
    run = root / name
    (run / "checkpoints" / "step_000002").mkdir(parents=True)
    write_rows(run / "metrics.jsonl", range(1, steps + 1), loss=0.5)
    (run / "rollouts.jsonl").write_text(json.dumps({"step": steps, "samples": [{"reward": 1.0}]}) + "\n")
    config = {"server": {"control_token": token}, "rl_training": {"learning_rate": 0.001}}
    (run / "checkpoints" / "step_000002" / "trainer_state.json").write_text(json.dumps({"config": config}))
    return run


def test_files_api_answers_two_runs_and_bounds_its_parameters(tmp_path):
    a, b = make_run(tmp_path, "a", 3, token="s3cret"), make_run(tmp_path, "b", 5)
    write_eval(a / "metrics.jsonl", 0)
    with files_app([a, b]) as base:
        status, headers, body = get(f"{base}/dashboard")
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        assert b'content="none"' in body, "no token: the page does not ask for one"
        info = json.loads(get(f"{base}/dashboard/api/info")[2])
        assert info["mode"] == "files" and [r["name"] for r in info["runs"]] == ["a", "b"]
        assert info["runs"][0]["config"]["server"]["control_token"] == "<redacted>", "a run's token is never shown"
        assert info["runs"][1]["config"]["rl_training"]["learning_rate"] == 0.001
        page = json.loads(get(f"{base}/dashboard/api/metrics?run=1&since=2")[2])
        assert [r["step"] for r in page["rows"]] == [3, 4, 5]
        assert json.loads(get(f"{base}/dashboard/api/rollouts?run=1")[2])["steps"][0]["step"] == 5
        assert json.loads(get(f"{base}/dashboard/api/status")[2]) is None
        evals = json.loads(get(f"{base}/dashboard/api/evals?run=0")[2])
        assert evals == {
            "run": 0,
            "more": False,
            "evals": [{"step": 0, "version": 0, "task": "mock:arithmetic", "reward_mean": 0.5, "pass@1": 0.25}],
        }
        assert json.loads(get(f"{base}/dashboard/api/evals?run=1")[2])["evals"] == []
        for route, query, param in (
            ("metrics", "run=7", "run"),
            ("metrics", "run=-1", "run"),
            ("metrics", "since=abc", "since"),
            ("metrics", "since=-2", "since"),
            ("metrics", "rev=x", "rev"),
            ("evals", "run=2", "run"),
            ("evals", "run=1e999", "run"),
        ):
            status, _, body = get(f"{base}/dashboard/api/{route}?{query}")
            error = json.loads(body)["error"]
            assert status == 400 and error["param"] == param, (route, query, error)
        status, _, body = get(f"{base}/dashboard/static/vendor/uPlot.iife.min.js")
        assert status == 200 and b"uPlot" in body
        for bad in ("../routes.py", "..%2Froutes.py", "vendor/../../sources.py", "nope.js"):
            assert get(f"{base}/dashboard/static/{bad}")[0] == 404, bad
        assert get(f"{base}/dashboard/static/vendor/uPlot.LICENSE.txt")[0] == 200


def test_files_api_behind_a_token(tmp_path):
    run = make_run(tmp_path, "a", 2)
    with files_app([run], token="t0k") as base:
        status, _, body = get(f"{base}/dashboard")
        assert status == 200 and b'content="token"' in body and b"t0k" not in body
        assert get(f"{base}/dashboard/static/app.js")[0] == 200
        assert get(f"{base}/dashboard/api/info")[0] == 401
        assert get(f"{base}/dashboard/api/info", token="wrong")[0] == 401
        assert get(f"{base}/dashboard/api/info", token="t0k")[0] == 200


def test_dashboard_command_refuses_bad_input(tmp_path, capsys, monkeypatch):
    from paraloop.dashboard.command import main

    monkeypatch.delenv("PARALOOP_DASHBOARD_TOKEN", raising=False)
    assert main([str(tmp_path / "nope")]) == 2 and "not a directory" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2 and "no metrics.jsonl" in capsys.readouterr().err
    run = str(make_run(tmp_path, "a", 1))
    assert main([run, "--host", "0.0.0.0"]) == 2 and "--token" in capsys.readouterr().err
    assert main([run, "--port", "70000"]) == 2 and "--port" in capsys.readouterr().err


def test_a_resumed_live_run_shows_the_steps_before_the_resume_point(tmp_path):
    from collections import deque

    from paraloop.dashboard.sources import LiveRun
    from paraloop.messages import EvalFinished, StepFinished
    from paraloop.run.status import RunStatus

    write_rows(tmp_path / "metrics.jsonl", range(1, 6))  # the earlier process got to step 5, checkpointed at 3
    for step in (0, 2, 4):
        write_eval(tmp_path / "metrics.jsonl", step, reward=step / 10)
    (tmp_path / "rollouts.jsonl").write_text(
        "".join(json.dumps({"step": s, "samples": [{"reward": s}]}) + "\n" for s in (2, 3, 4))
    )
    status = RunStatus(total_steps=10, mode="sync", run_dir=str(tmp_path), step=3, rollouts=deque(maxlen=3))
    live = LiveRun(status, {}, name="r", resumed_at=3, rollout_steps=3)
    for step in (4, 5):
        status.record_step(StepFinished(step=step, version=step, metrics={"reward_mean": 1.0}))
    status.rollouts.append({"step": 4, "samples": [{"reward": 40}]})
    rows = live.metrics(0, -1, None)["rows"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[3]["reward_mean"] == 1.0, "this run's steps win"
    assert [r["step"] for r in live.metrics(0, 3, None)["rows"]] == [4, 5]
    steps = live.rollouts(0, -1)["steps"]
    assert [e["step"] for e in steps] == [2, 3, 4] and steps[-1]["samples"][0]["reward"] == 40
    status.record_eval(EvalFinished(step=4, version=4, task="mock:arithmetic", metrics={"reward_mean": 0.9}))
    evals = live.evals(0)["evals"]
    assert [(e["step"], e["reward_mean"]) for e in evals] == [(0, 0.0), (2, 0.2), (4, 0.9)], "this run's step 4"
