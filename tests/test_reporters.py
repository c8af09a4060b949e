"""The loggers behind `[logging] report_to`: metrics.jsonl, TensorBoard and W&B (offline) get the same metric names
and the rollout samples; a missing package stops the run before it starts; a failing optional logger is dropped."""

import json
import os
import struct
import sys
import textwrap
from pathlib import Path

from support import procs
import pytest

from paraloop.config import load_config
from paraloop.run import reporters
from paraloop.run.reporters import JsonlReporter, MissingExtra, close_all, log_all, open_reporters

ROW = {
    "step": 3,
    "reward_mean": 0.5,
    "loss": -0.25,
    "kl": 0.01,
    "skipped": False,
    "swap_pause_ms": None,
    "time": 1.0e9,
    "version": 3,
}
SAMPLE = {
    "step": 3,
    "adapter_version": 3,
    "rollout_version": 2,
    "group": 0,
    "row": 1,
    "reward": 1.0,
    "advantage": 0.7,
    "prompt": "Name a fruit | in one word",
    "prompt_truncated": False,
    "tokens": [" ban", "ana"],
    "logprobs": [-0.5, -0.1],
    "completion_truncated": False,
}


def settings_for(tmp_path: Path, *report_to: str, **logging_keys):
    return load_config(
        None, {"checkpoint": {"dir": str(tmp_path)}, "logging": {"report_to": list(report_to), **logging_keys}}
    )


def read_tb_events(log_dir: Path) -> list:
    """Every Event in the TensorBoard files of log_dir (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    events = []
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            events.append(Event.FromString(data[pos + 12 : pos + 12 + length]))
            pos += 12 + length + 4
    return events


def test_scalars_are_the_numbers_of_a_row_under_their_own_names():
    assert reporters.scalars(ROW) == {"reward_mean": 0.5, "loss": -0.25, "kl": 0.01, "version": 3.0}


def test_jsonl_appends_metrics_and_rollouts(tmp_path):
    for step in (1, 2):
        r = JsonlReporter(tmp_path)  # reopened like a resumed run: both files continue
        r.log({**ROW, "step": step}, [{**SAMPLE, "step": step}] if step == 2 else [])
        r.close()
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and metrics[0]["reward_mean"] == 0.5
    rollouts = [json.loads(line) for line in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert rollouts == [{"step": 2, "samples": [{**SAMPLE, "step": 2}]}]


def test_tensorboard_gets_every_scalar_and_the_samples_as_text(tmp_path):
    settings = settings_for(tmp_path, "jsonl", "tensorboard")
    opened = open_reporters(settings, tmp_path)
    assert [r.name for r in opened] == ["jsonl", "tensorboard"]
    log_all(opened, ROW, [SAMPLE])
    log_all(opened, {**ROW, "step": 4, "reward_mean": 0.75}, [])
    close_all(opened)
    assert opened == [], "close_all closes each reporter once"
    events = read_tb_events(tmp_path / "tensorboard")
    scalars = {(e.step, v.tag): v.simple_value for e in events for v in e.summary.value if v.HasField("simple_value")}
    assert scalars[(3, "reward_mean")] == 0.5 and scalars[(4, "reward_mean")] == 0.75
    assert scalars[(3, "loss")] == -0.25 and (3, "swap_pause_ms") not in scalars and (3, "skipped") not in scalars
    texts = [v.tensor.string_val[0].decode() for e in events for v in e.summary.value if v.tag.startswith("rollouts")]
    assert len(texts) == 1 and "banana" in texts[0] and "Name a fruit \\| in one word" in texts[0]
    metrics = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert set(reporters.scalars(metrics)) <= {tag for _, tag in scalars}, "the same names in every logger"


WANDB_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from paraloop.config import load_config
    from paraloop.run.reporters import close_all, log_all, open_reporters
    run_dir = Path(sys.argv[1])
    sample = json.loads(sys.argv[2])
    settings = load_config(None, {"checkpoint": {"dir": str(run_dir)}, "server": {"control_token": "hunter2"},
                                  "logging": {"report_to": ["wandb"], "wandb_mode": "offline"}})
    opened = open_reporters(settings, run_dir)
    log_all(opened, {"step": 1, "reward_mean": 0.25, "loss": 0.5}, [sample])
    log_all(opened, {"step": 2, "reward_mean": 0.75, "loss": 0.25}, [])
    assert [r.name for r in opened] == ["wandb"], "no error dropped the logger"
    close_all(opened)
""")


@pytest.mark.timeout(120)
def test_wandb_offline_run_holds_the_metrics_and_a_rollouts_table(tmp_path):
    env = {**os.environ, "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"}
    env.pop("WANDB_API_KEY", None)
    # W&B starts a service process of its own: the whole process group goes with the test
    done = procs.run([sys.executable, "-c", WANDB_SCRIPT, str(tmp_path), json.dumps(SAMPLE)], timeout=90, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    run_id = (tmp_path / "wandb-run-id").read_text().strip()
    [run_dir] = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}")
    record = (run_dir / f"run-{run_id}.wandb").read_bytes()
    assert b"reward_mean" in record and b"loss" in record
    assert b"hunter2" not in record, "the control token never reaches W&B"
    [table] = (run_dir / "files" / "media" / "table").glob("rollouts_*.table.json")
    body = json.loads(table.read_text())
    assert body["columns"] == list(reporters.SAMPLE_COLUMNS)
    assert body["data"][0][4] == SAMPLE["prompt"] and body["data"][0][5] == " banana"


def test_a_missing_extra_stops_before_anything_opens(tmp_path, monkeypatch):
    real = reporters.importlib.util.find_spec
    monkeypatch.setattr(reporters.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(MissingExtra, match=r"pip install 'paraloop\[wandb\]'"):
        open_reporters(settings_for(tmp_path, "jsonl", "wandb"), tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


class Broken:
    name, essential = "broken", False
    closed = False

    def log(self, row, samples):
        raise OSError("disk full")

    def close(self):
        self.closed = True


class BrokenEssential(Broken):
    name, essential = "essential", True


def test_a_failing_optional_logger_is_dropped_and_an_essential_one_ends_the_run(tmp_path, caplog):
    jsonl, broken = JsonlReporter(tmp_path), Broken()
    active = [broken, jsonl]
    log_all(active, ROW, [])
    log_all(active, {**ROW, "step": 4}, [])
    assert active == [jsonl] and broken.closed
    assert "broken logging failed at step 3" in caplog.text
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2, "the run's own record goes on"
    jsonl.close()
    with pytest.raises(OSError, match="disk full"):
        log_all([BrokenEssential()], ROW, [])


def test_metrics_lines_that_cannot_be_written_wait_and_go_out_once_they_can(tmp_path, caplog):
    """metrics.jsonl never ends a run: while it cannot be written (here: a directory in its place) its lines wait
    in memory and `error` says why; the next step that can write writes them all, in order, once."""
    jsonl = JsonlReporter(tmp_path)
    jsonl.log({**ROW, "step": 1}, [])
    (tmp_path / "metrics.jsonl").unlink()
    (tmp_path / "metrics.jsonl").mkdir()
    jsonl.log({**ROW, "step": 2}, [])
    jsonl.log({**ROW, "step": 3}, [])
    assert jsonl.error is not None and "2 line(s) waiting" in jsonl.error
    assert caplog.text.count("could not write") == 1, "said once, not per step"
    (tmp_path / "metrics.jsonl").rmdir()
    jsonl.log({**ROW, "step": 4}, [])
    assert jsonl.error is None
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 3, 4]
    jsonl.close()


def test_report_to_accepts_only_known_loggers(tmp_path):
    from paraloop.config import ConfigError

    with pytest.raises(ConfigError, match="logging.report_to"):
        settings_for(tmp_path, "jsonl", "mlflow")


def test_paraloop_run_names_the_missing_extra_and_exits_2(tiny_model_path, tmp_path, monkeypatch, capsys):
    from paraloop.run import main as run_main

    real = reporters.importlib.util.find_spec
    monkeypatch.setattr(
        reporters.importlib.util, "find_spec", lambda name: None if name == "tensorboardX" else real(name)
    )
    code = run_main.main(
        [
            "--model-path",
            str(tiny_model_path),
            "--run-dir",
            str(tmp_path / "run"),
            "--set",
            'logging.report_to=["jsonl", "tensorboard"]',
            "--no-plot",
        ]
    )
    assert code == 2
    assert "pip install 'paraloop[tensorboard]'" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists(), "stopped before loading the model"
