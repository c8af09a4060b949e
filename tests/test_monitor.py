"""The monitor: metrics.jsonl gets one line per step and one per evaluation (kind "eval"); a train/inference
mismatch over the threshold is a warning in the log and an alert in /control/status until a step is back under it;
an Atropos environment's own evaluation files become eval lines too."""

import io
import json
import logging

import anyio

from paraloop.atropos.evals import AtroposEvals
from paraloop.messages import EvalFinished, StepFinished
from paraloop.run.control import run_families
from paraloop.run.monitor import eval_table, run_monitor
from paraloop.run.reporters import JsonlReporter
from paraloop.run.status import RunStatus
from paraloop.server.metrics import Metrics


def prometheus_text(status: RunStatus) -> str:
    metrics = Metrics()
    metrics.add_collector(lambda: run_families(status))
    return metrics.text().decode()


def monitor(tmp_path, messages, *, atropos_evals=None, between=None) -> tuple[RunStatus, list[dict], str]:
    status = RunStatus(total_steps=10, mode="sync", run_dir=str(tmp_path))
    out = io.StringIO()

    async def main():
        send, receive = anyio.create_memory_object_stream[StepFinished | EvalFinished](10)
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(
                    lambda: run_monitor(
                        receive,
                        status=status,
                        reporters=[JsonlReporter(tmp_path)],
                        out=out,
                        mismatch_threshold=0.01,
                        atropos_evals=atropos_evals,
                    )
                )
                async with send:
                    for message in messages:
                        await send.send(message)
                        await anyio.wait_all_tasks_blocked()
                        if between is not None:
                            between(message, status)

    anyio.run(main, backend="asyncio")
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return status, lines, out.getvalue()


def step(n: int, gap: float | None) -> StepFinished:
    metrics = {"reward_mean": 0.5, "loss": 0.1}
    if gap is not None:
        metrics.update(mismatch_abs_mean=gap, mismatch_abs_max=3 * gap, mismatch_tokens=64.0)
    return StepFinished(step=n, version=n, metrics=metrics)


def test_a_mismatch_over_the_threshold_warns_once_and_is_an_alert_until_it_clears(tmp_path, caplog):
    seen, gauges = [], []

    def look(message, status):
        seen.append("mismatch" in status.alerts)
        gauges.append('paraloop_alert{topic="mismatch"} 1.0' in prometheus_text(status))

    with caplog.at_level(logging.WARNING, logger="paraloop.monitor"):
        status, lines, out = monitor(
            tmp_path, [step(1, 1e-6), step(2, 0.08), step(3, 0.09), step(4, None), step(5, 2e-6)], between=look
        )
    assert seen == [False, True, True, True, False], "a step without the metric leaves the alert as it is"
    assert gauges == seen
    assert caplog.text.count("train/inference mismatch") == 1 and "mismatch_threshold = 0.01" in caplog.text
    assert "MISMATCH 0.08 nats" in out
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5]


def test_evaluations_are_lines_of_their_own_in_the_status_and_the_table(tmp_path):
    metrics = {"reward_mean": 0.25, "pass@1": 0.125, "pass@4": 0.5, "prompts": 8.0, "samples": 4.0, "time_s": 1.5}
    later = {**metrics, "reward_mean": 0.75, "pass@1": 0.625}
    status, lines, out = monitor(
        tmp_path,
        [
            EvalFinished(step=0, version=0, task="one_word", metrics=metrics),
            step(1, None),
            EvalFinished(step=1, version=1, task="one_word", metrics=later),
        ],
    )
    assert [(line.get("kind"), line["step"]) for line in lines] == [("eval", 0), (None, 1), ("eval", 1)]
    assert lines[2]["reward_mean"] == 0.75 and lines[2]["task"] == "one_word"
    snapshot = status.snapshot()
    assert snapshot["eval"]["first"]["reward_mean"] == 0.25 and snapshot["eval"]["last"]["pass@4"] == 0.5
    assert "eval v1 (one_word) | reward_mean 0.750 | pass@1 0.625 | pass@4 0.500 | 1.5 s" in out
    assert 'paraloop_eval{name="reward_mean"} 0.75' in prometheus_text(status)
    table = eval_table(status.evals)
    assert "held-out eval (one_word, 8 prompts x 4 samples)" in table and "0.7500" in table


def test_atropos_environment_evaluations_are_picked_up_after_a_step(tmp_path):
    root = tmp_path / "atropos_evals"
    (root / "gsm8k").mkdir(parents=True)
    old = root / "gsm8k" / "metrics.json"
    old.write_text(json.dumps({"results": {"all": {"eval/percent_correct": 0.1}}}))
    evals = AtroposEvals(root)  # files from before (a resumed run) were recorded already

    def write(message, status):
        if message.step == 1:
            old.write_text(json.dumps({"results": {"all": {"eval/percent_correct": 0.4, "note": "x", "n": True}}}))
            (root / "broken").mkdir()
            (root / "broken" / "metrics.json").write_text("{not json")

    status, lines, _ = monitor(
        tmp_path, [step(1, None), step(2, None), step(3, None)], atropos_evals=evals, between=write
    )
    got = [line for line in lines if line.get("kind") == "eval"]
    assert [(g["step"], g["task"], g["eval/percent_correct"]) for g in got] == [(2, "atropos:gsm8k", 0.4)]
    assert "note" not in got[0] and "n" not in got[0], "only numbers are metrics"
