"""The one summary of a device check: `python3 scripts/device_summary.py LOG_DIR` (stdlib only).

Reads what scripts/device-check.sh leaves in LOG_DIR and prints one block (also written to LOG_DIR/summary.txt):

    facts.txt     key=value lines: the GPU, its driver, mlx and its backend, the budget
    steps.tsv     one line per step: name, status (ok / failed / skipped / timeout), seconds, note
    pytest.xml    the core suite's JUnit report (counts, and the name of each failed test)
    bench/*.json  the benchmark records of `python -m bench.run_all --quick` (one line per measured ratio)

Exit status: 0 when every step that ran passed, 1 otherwise (2 for a LOG_DIR that is not one).
"""

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

FACTS = ("gpu", "driver", "python", "mlx", "backend", "budget_s")


def read_facts(log_dir: Path) -> dict[str, str]:
    path = log_dir / "facts.txt"
    facts: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep:
                facts[key.strip()] = value.strip()
    return facts


def read_steps(log_dir: Path) -> list[tuple[str, str, float, str]]:
    steps = []
    for line in (log_dir / "steps.tsv").read_text().splitlines():
        if not line.strip():
            continue
        name, status, seconds, *note = line.split("\t")
        steps.append((name, status, float(seconds), note[0] if note else ""))
    return steps


def read_tests(path: Path) -> dict | None:
    """Counts and failed test ids from a JUnit XML file (pytest's --junitxml), or None when absent or unreadable."""
    if not path.is_file():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return {"error": f"unreadable {path.name}: {e}"}
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time": 0.0}
    failed = []
    for suite in suites:
        for key in counts:
            counts[key] += type(counts[key])(suite.get(key, 0))
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname', '')}::{case.get('name', '')}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed"] = failed
    return counts


def read_bench(log_dir: Path) -> list[dict]:
    records = []
    for path in sorted((log_dir / "bench").glob("*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            records.append({"bench": path.stem, "error": f"unreadable: {e}", "lines": []})
    return records


def number(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    text = f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{text} {unit}".strip()


def summary(log_dir: Path) -> tuple[str, bool]:
    """(the text, whether everything that ran passed)."""
    facts, steps = read_facts(log_dir), read_steps(log_dir)
    total = sum(seconds for _, _, seconds, _ in steps)
    ok = all(status in ("ok", "skipped") for _, status, _, _ in steps)
    out = ["== paraloop device check: " + ("PASSED" if ok else "FAILED")]
    out += [f"   {key}: {facts[key]}" for key in FACTS if key in facts]
    budget = float(facts.get("budget_s", 0) or 0)
    out.append(f"   time: {total:.0f} s" + (f" of a {budget:.0f} s budget" + (" (OVER)" if total > budget else "")
                                             if budget else ""))
    out.append("-- steps")
    for name, status, seconds, note in steps:
        out.append(f"   {status:<8} {name:<10} {seconds:6.0f} s" + (f"  {note}" if note else ""))
    tests = read_tests(log_dir / "pytest.xml")
    if tests is not None:
        out.append("-- core suite")
        if "error" in tests:
            out.append(f"   {tests['error']}")
        else:
            out.append(f"   {tests['passed']} passed, {len(tests['failed'])} failed, {tests['skipped']} skipped "
                       f"in {tests['time']:.0f} s")
            out += [f"   FAILED {name}" for name in tests["failed"]]
    records = read_bench(log_dir)
    if records:
        out.append("-- benchmarks (ours / baseline = ratio)")
        for rec in records:
            if rec.get("error"):
                out.append(f"   {rec['bench']}: ERROR {str(rec['error']).splitlines()[0]}")
            for line in rec.get("lines", []):
                ours, base, unit = line.get("ours"), line.get("baseline"), line.get("unit", "")
                ratio = f" = {ours / base:.2f}x" if ours is not None and base else ""
                out.append(f"   {line['bench']}: {line['name']}: {number(ours, unit)} / {number(base, unit)}{ratio}")
    return "\n".join(out) + "\n", ok


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python3 scripts/device_summary.py LOG_DIR", file=sys.stderr)
        return 2
    log_dir = Path(argv[0])
    if not (log_dir / "steps.tsv").is_file():
        print(f"device_summary: {log_dir} has no steps.tsv (not a device-check log dir)", file=sys.stderr)
        return 2
    text, ok = summary(log_dir)
    (log_dir / "summary.txt").write_text(text)
    print(text, end="")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
