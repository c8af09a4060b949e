"""Atropos environments' own evaluations, read back into the run's metrics.

atroposlib runs an environment's `evaluate()` itself, whenever the API's step (one per batch the trainer takes)
crosses a multiple of the environment's `steps_per_eval`; `evaluate_log` then writes DATA_DIR/metrics.json in
lighteval's layout ({"results": {"all": {name: value}}}). `paraloop launch-atropos` sets both from [eval]
(`--env.steps_per_eval`, `--env.data_dir_to_save_evals RUN_DIR/atropos_evals/<script>`), and the monitor asks
`AtroposEvals.new()` after each learner step for files written since it last looked. Files are bounded in size
and read defensively: they come from another process.
"""

import json
import logging
import math
from pathlib import Path

log = logging.getLogger("paraloop.atropos")

EVAL_DIR = "atropos_evals"
MAX_BYTES = 1 << 20


class AtroposEvals:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.seen = {path: mtime for path, mtime in self._files()}  # a resumed run has recorded these already

    def _files(self) -> list[tuple[Path, int]]:
        if not self.root.is_dir():
            return []
        return [(p, p.stat().st_mtime_ns) for p in sorted(self.root.glob("*/metrics.json")) if p.is_file()]

    def new(self) -> list[tuple[str, dict[str, float]]]:
        """(environment, numeric metrics) for every metrics.json written since the last call."""
        out = []
        for path, mtime in self._files():
            if self.seen.get(path) == mtime:
                continue
            self.seen[path] = mtime
            metrics = read_metrics(path)
            if metrics:
                out.append((path.parent.name, metrics))
        return out


def read_metrics(path: Path) -> dict[str, float]:
    """The numeric metrics of one evaluate_log file ({} with a warning when it is unusable)."""
    try:
        if path.stat().st_size > MAX_BYTES:
            raise ValueError(f"larger than {MAX_BYTES} bytes")
        results = json.loads(path.read_text())["results"]["all"]
        if not isinstance(results, dict):
            raise ValueError("results.all is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring the Atropos evaluation in %s: %s", path, e)
        return {}
    return {
        str(k): float(v)
        for k, v in results.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }
