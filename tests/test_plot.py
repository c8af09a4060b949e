"""`paraloop plot RUN_DIR`: the learning curves of metrics.jsonl as one PNG; bad input is one error line."""

import json
import sys

from support import procs
from paraloop.plot import main, read_metrics


def write_metrics(run_dir, rows) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def row(step: int, reward: float) -> dict:
    return {
        "step": step,
        "reward_mean": reward,
        "reward_std": 0.1,
        "loss": 0.01,
        "kl": 0.0,
        "entropy": 2.0,
        "clip_fraction": 0.0,
        "tokens_per_s": 100.0,
    }


def test_plot_writes_a_png_of_the_run(tmp_path):
    run_dir = tmp_path / "run"
    # a run resumed from step 2: steps 3 and 4 were trained twice, the newer lines win
    write_metrics(run_dir, [row(1, 0.1), row(2, 0.2), row(3, 0.0), row(4, 0.0), row(3, 0.3), row(4, 0.4)])
    assert [r["reward_mean"] for r in read_metrics(run_dir)] == [0.1, 0.2, 0.3, 0.4]
    done = procs.run([sys.executable, "-m", "paraloop", "plot", str(run_dir)], timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"wrote {run_dir / 'metrics.png'}\n"
    png = (run_dir / "metrics.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000  # six panels, not an empty canvas
    assert main([str(run_dir), "--output", str(tmp_path / "other.png")]) == 0
    assert (tmp_path / "other.png").read_bytes().startswith(b"\x89PNG")


def test_plot_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"paraloop: error: no metrics.jsonl in {tmp_path / 'nowhere'}\n"
    (tmp_path / "metrics.jsonl").write_text(json.dumps(row(1, 0.5)) + "\n{not json\n")
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"paraloop: error: {tmp_path / 'metrics.jsonl'}:2: not JSON\n"


def test_eval_lines_are_their_own_panel_and_never_a_training_step(tmp_path):
    from paraloop.plot import plot_run, read_evals

    run_dir = tmp_path / "run"
    evals = [
        {"kind": "eval", "step": s, "version": s, "task": "one_word", "reward_mean": r, "pass@1": r / 2, "pass@4": r}
        for s, r in ((0, 0.1), (2, 0.5))
    ]
    write_metrics(run_dir, [evals[0], row(1, 0.2), row(2, 0.3), evals[1], {**row(2, 0.3), "mismatch_abs_mean": 0.0}])
    assert [(r["step"], r["reward_mean"]) for r in read_metrics(run_dir)] == [(1, 0.2), (2, 0.3)]
    assert [(e["version"], e["reward_mean"]) for e in read_evals(run_dir)] == [(0, 0.1), (2, 0.5)]
    assert plot_run(run_dir).read_bytes().startswith(b"\x89PNG")
