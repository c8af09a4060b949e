"""`paraloop plot RUN_DIR`: the learning curves of a run (RUN_DIR/metrics.jsonl) as one PNG."""

import argparse
import json
import sys
from pathlib import Path

PANELS = (
    ("reward_mean", "reward (mean over the batch)"),
    ("loss", "loss"),
    ("kl", "KL to reference"),
    ("entropy", "entropy"),
    ("clip_fraction", "clip fraction"),
    ("tokens_per_s", "learner tokens/s"),
)


def read_metrics(run_dir: str | Path) -> list[dict]:
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
    by_step = {row["step"]: row for row in rows}  # a resumed run may repeat steps: the newest wins
    return [by_step[s] for s in sorted(by_step)]


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    output = Path(output) if output else Path(run_dir) / "metrics.png"
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), constrained_layout=True)
    for ax, (key, title) in zip(axes.flat, PANELS, strict=True):
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", markersize=3)
        if key == "reward_mean" and points:
            std = {r["step"]: r.get("reward_std", 0.0) or 0.0 for r in rows}
            xs, ys = zip(*points, strict=True)
            ax.fill_between(xs, [y - std[x] for x, y in points], [y + std[x] for x, y in points], alpha=0.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
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
