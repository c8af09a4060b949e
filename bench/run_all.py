"""`python -m bench.run_all [--only NAME ...] [--quick]`: run the benchmarks, print one table, record the results.

Full runs write bench/results/<name>.json and refresh the generated table in docs/benchmarks.md; `--quick` (a smoke
run of a few minutes: fewer tokens, swaps and steps) writes bench/results/quick/ and leaves the docs alone. Each
benchmark has a time budget; past three times its budget it is stopped (SIGALRM) and recorded as an error, and the
rest still run. Every child process is killed at the end, also on Ctrl-C or SIGTERM. Exit status: 0 when every
benchmark ran (missed targets are results, not failures), 1 otherwise.
"""

import argparse
import dataclasses
import importlib
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import FrameType

import paraloop  # noqa: F401  (the OpenBLAS preload, before anything imports mlx.core)
from bench import report
from bench.harness import RESULTS, ROOT, Context, Line, machine, table, write_json

MODULES = [
    "http_serving",
    "multi_lora",
    "grpo_group",
    "multi_turn",
    "swap_pause",
    "learner",
    "paraloop_run",
    "cpu_path",
    "decode_step",
    "constrained",
    "distributed",
    "learner_memory",
    "replay",
    "tinker_sdk",
    "teacher_scoring",
]  # benchmarks sharing servers stay next to each other
HARD_LIMIT_FACTOR = 3
DOCS = ROOT / "docs" / "benchmarks.md"


class BenchTimeout(Exception):
    pass


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise BenchTimeout("over its hard time limit")


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def select(only: list[str]) -> list:
    modules = [importlib.import_module(f"bench.{m}") for m in MODULES]
    if not only:
        return modules
    wanted = {n for item in only for n in item.split(",") if n}
    unknown = wanted - {m.NAME for m in modules}
    if unknown:
        names = ", ".join(m.NAME for m in modules)
        raise SystemExit(f"bench.run_all: unknown benchmark {', '.join(sorted(unknown))} (choose from {names})")
    return [m for m in modules if m.NAME in wanted]


def run_one(module, ctx: Context, facts: dict) -> tuple[dict, list[Line]]:
    print(f"\n== {module.TITLE} (budget {module.BUDGET_S} s)", flush=True)
    start = time.perf_counter()
    lines, error = [], None
    signal.alarm(int(module.BUDGET_S * HARD_LIMIT_FACTOR))
    try:
        lines = module.run(ctx)
    except BenchTimeout as e:
        error = f"{module.NAME}: {e} ({module.BUDGET_S * HARD_LIMIT_FACTOR} s)"
    except Exception as e:  # one broken benchmark must not hide the others' numbers
        error = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    finally:
        signal.alarm(0)
    elapsed = time.perf_counter() - start
    if error:
        print(f"   ERROR: {error}", file=sys.stderr, flush=True)
    else:
        print(table(lines), flush=True)
    over = " (OVER BUDGET)" if elapsed > module.BUDGET_S else ""
    print(f"   {elapsed:.0f} s{over}", flush=True)
    rec = report.record(
        module,
        lines,
        machine=facts,
        quick=ctx.quick,
        elapsed_s=elapsed,
        error=error,
        load_after=[round(x, 2) for x in os.getloadavg()],
    )
    return rec, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="run only these benchmarks (repeat or comma-separate): http, group, swap, learner, run, cpu, turns, "
        "decode, constrained, distributed, memory, multilora, replay, tinker, teacher",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few minutes (results not kept in docs)")
    args = parser.parse_args(argv)
    modules = select(args.only)
    out_dir = RESULTS / "quick" if args.quick else RESULTS
    log_dir = tempfile.mkdtemp(prefix="paraloop-bench-logs-")
    signal.signal(signal.SIGALRM, _alarm)
    signal.signal(signal.SIGTERM, _terminate)
    started = time.perf_counter()
    ctx = Context(quick=args.quick, log_dir=Path(log_dir))
    facts = machine()
    print(report.machine_text(facts), f"\nchild logs: {log_dir}", sep="\n", flush=True)
    every: list[Line] = []
    errors = 0
    try:
        for i, module in enumerate(modules):
            facts["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
            rec, lines = run_one(module, ctx, dict(facts))
            if kernel := report.chosen_kernel(facts):  # a second kernel's rows sit beside the own kernel's
                lines = [dataclasses.replace(line, bench=f"{line.bench} ({kernel})") for line in lines]
                rec = {**rec, "bench": f"{module.NAME}@{kernel}", "lines": [line.as_dict() for line in lines]}
            write_json(out_dir / f"{rec['bench']}.json", rec)
            every += lines
            errors += rec["error"] is not None
            following = modules[i + 1] if i + 1 < len(modules) else None
            if not (getattr(module, "USES_SERVERS", False) and getattr(following, "USES_SERVERS", False)):
                ctx.stop_all()  # servers live on only into the next benchmark that uses them
    finally:
        ctx.stop_all()
    print(f"\n== all ({time.perf_counter() - started:.0f} s)\n{table(every)}")
    if not args.quick:
        report.update_docs(DOCS, report.block(report.load_records(RESULTS, [m.NAME for m in select([])])))
        print(f"\nwrote {out_dir}/*.json and the table in {DOCS.relative_to(ROOT)}")
    else:
        print(f"\nwrote {out_dir}/*.json (quick run: docs left alone)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
