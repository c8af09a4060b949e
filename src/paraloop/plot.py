"""`paraloop plot RUN_DIR`: the learning curves of a run (RUN_DIR/metrics.jsonl) as one PNG.

Training steps give one point per step; held-out evaluations (lines marked `"kind": "eval"`) get their own panel,
the starting adapter at step 0 (the base model when training starts from a fresh LoRA) and the last one labelled.
"""

import argparse
import json
import sys
from pathlib import Path

PANELS = (
    ("reward_mean", "reward (mean over the batch)"),
    ("eval", "held-out eval"),
    ("loss", "loss"),
    ("kl", "KL to reference"),
    ("entropy", "entropy"),
    ("clip_fraction", "clip fraction"),
    ("mismatch_abs_mean", "|engine - learner| log-prob (mean)"),
    ("rollout_ratio_outside", "rollout ratio outside [0.8, 1.25]"),
    ("tokens_per_s", "learner tokens/s"),
)


def read_lines(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{n}: not JSON") from None
    return rows


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The training steps, one row per step (a resumed run may repeat steps: the newest wins)."""
    by_step = {row["step"]: row for row in read_lines(run_dir) if row.get("kind", "train") == "train"}
    return [by_step[s] for s in sorted(by_step)]


def read_evals(run_dir: str | Path) -> list[dict]:
    """The held-out evaluations, one per adapter version (the newest wins), by version."""
    by_version = {row["version"]: row for row in read_lines(run_dir) if row.get("kind") == "eval"}
    return [by_version[v] for v in sorted(by_version)]


def _eval_panel(ax, evals: list[dict]) -> None:
    if not evals:
        ax.text(0.5, 0.5, "no evaluation\n([eval] every_steps)", ha="center", va="center", transform=ax.transAxes)
        return
    xs = [e["step"] for e in evals]
    passes = [k for k in evals[-1] if k.startswith("pass@")]
    keys = ["reward_mean", *passes[:1], *passes[1:][-1:]]  # reward, pass@1 and the largest k
    for key in keys:
        ax.plot(xs, [e.get(key) for e in evals], marker="o", markersize=4, label=key)
    first, last = evals[0], evals[-1]
    ax.annotate(
        f"start {first['reward_mean']:.2f}",
        (first["step"], first["reward_mean"]),
        textcoords="offset points",
        xytext=(6, 4),
        fontsize=8,
    )
    if len(evals) > 1:
        ax.annotate(
            f"end {last['reward_mean']:.2f}",
            (last["step"], last["reward_mean"]),
            textcoords="offset points",
            xytext=(-40, 8),
            fontsize=8,
        )
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"held-out eval: {first.get('task', '')}")


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    evals = read_evals(run_dir)
    output = Path(output) if output else Path(run_dir) / "metrics.png"
    fig, axes = plt.subplots(3, 3, figsize=(14, 10), constrained_layout=True)
    for ax, (key, title) in zip(axes.flat, PANELS, strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key == "eval":
            _eval_panel(ax, evals)
            continue
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if key == "mismatch_abs_mean":  # float rounding (1e-7) up to a bug (1e-1): a log scale, exact zeros left out
            points = [(x, y) for x, y in points if y > 0]
            ax.set_yscale("log")
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", markersize=3)
        if key == "reward_mean" and points:
            std = {r["step"]: r.get("reward_std", 0.0) or 0.0 for r in rows}
            xs, ys = zip(*points, strict=True)
            ax.fill_between(xs, [y - std[x] for x, y in points], [y + std[x] for x, y in points], alpha=0.2)
    fig.suptitle(f"paraloop run: {Path(run_dir).resolve().name}")
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="paraloop plot", description=__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--output", "-o", help="PNG path (default RUN_DIR/metrics.png)")
    args = parser.parse_args(argv)
    try:
        path = plot_run(args.run_dir, args.output)
    except (FileNotFoundError, ValueError) as e:
        print(f"paraloop: error: {e}", file=sys.stderr)
        return 2
    except ImportError:
        print("paraloop: error: plotting needs matplotlib (pip install 'paraloop[plot]')", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
