"""The benchmark harness's bookkeeping (no benchmark runs here: speed lives in `make bench`)."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file


from bench.harness import Line, table  # noqa: E402
from bench.paraloop_run import decode_rates, safetensors_bytes  # noqa: E402
from bench.report import BEGIN, END, block, chosen_kernel, load_records, update_docs  # noqa: E402
from bench.tinker_steps import demo_shape, step_gaps  # noqa: E402


MACHINE = {"cores": 2, "memory_gib": 1, "os": "Linux", "mlx": "0", "mlx_lm": "0", "paraloop": "0", "python": "3"}
MACHINE |= {"blas": "OpenBLAS", "blas_kernel": "Zen", "date": "2026-12-08", "load_average_at_start": [0.1], "cpu": "x"}


def test_a_target_without_unit_applies_to_the_ratio():
    assert Line("b", "faster", 2.0, 1.0, "tok/s", ">= 1.0").met is True
    assert Line("b", "slower", 0.5, 1.0, "tok/s", ">= 1.0").met is False
    assert Line("b", "memory", 3.0, 2.0, "MiB", "<= 1.5").met is True
    assert Line("b", "no baseline", 1.0, None, "tok/s", ">= 1.0").met is None
    assert Line("b", "no target", 1.0, 2.0, "tok/s").met is None


def test_a_target_with_a_unit_applies_to_paraloops_own_number_in_that_unit():
    assert Line("swap", "pause", 0.27, None, "ms", "<= 1 ms").met is True
    assert Line("swap", "pause", 1.5, 0.1, "ms", "<= 1 ms").met is False
    assert Line("swap", "pause", 0.0005, None, "s", "<= 1 ms").met is True
    assert Line("swap", "failed", 0.0, 32.0, "requests", "<= 0 requests").met is True
    assert Line("swap", "failed", 1.0, 32.0, "requests", "<= 0 requests").met is False


def test_the_table_has_one_row_per_line_and_marks_misses():
    text = table(
        [
            Line("http", "32 clients", 120.0, 100.0, "tok/s", ">= 1.0"),
            Line("run", "peak RSS", 3000.0, 1000.0, "MiB", "<= 1.5"),
        ]
    )
    rows = text.splitlines()
    assert len(rows) == 4
    assert "1.20x" in rows[2] and rows[2].endswith("| yes |")
    assert "3.00x" in rows[3] and rows[3].endswith("| **no** |")


def test_updating_the_docs_replaces_only_the_generated_block(tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text(f"# Benchmarks\nintro\n{BEGIN}\nold table\n{END}\nanalysis\n")
    update_docs(docs, "new table")
    assert docs.read_text() == f"# Benchmarks\nintro\n{BEGIN}\nnew table\n{END}\nanalysis\n"
    fresh = tmp_path / "fresh.md"
    update_docs(fresh, "first table")
    assert fresh.read_text().endswith(f"{BEGIN}\nfirst table\n{END}\n")


def test_decode_rates_split_time_by_whether_the_learner_steps():
    # (time, learner busy, generated tokens, active rows, step)
    samples = [
        (0.0, False, 0, 16, 0),
        (1.0, False, 20, 16, 0),
        (2.0, False, 30, 0, 0),
        (3.0, True, 30, 0, 0),
        (4.0, True, 34, 16, 0),
        (5.0, True, 40, 16, 1),
    ]
    rates = decode_rates(samples)
    assert rates["idle"] == 20.0  # 0 -> 1 s only: rows stopped decoding by 2 s, and 2 -> 3 s changes state
    assert rates["training"] == 5.0  # 3 -> 5 s: everything generated while the learner steps, idle rows or not
    assert rates["training_s"] == 2.0


def test_safetensors_bytes_sums_the_tensors_in_the_header(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": np.zeros((3, 4), np.float32), "b": np.zeros(5, np.int8)}, str(path))
    assert safetensors_bytes(path) == 3 * 4 * 4 + 5


def test_rows_measured_under_a_chosen_kernel_sit_beside_the_own_kernels(tmp_path, monkeypatch):
    machine = {**MACHINE, "blas_kernel": "Haswell"}
    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    assert chosen_kernel(machine) is None
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    assert chosen_kernel(machine) == "Haswell"
    for name, bench in [("decode.json", "decode"), ("decode@Haswell.json", "decode (Haswell)"), ("swap.json", "swap")]:
        line = Line(bench, "step", 1.0, 2.0, "ms").as_dict()
        rec = {"bench": name[:-5], "title": "t", "elapsed_s": 1.0, "budget_s": 1, "load_average_after": [0.1]}
        (tmp_path / name).write_text(json.dumps({**rec, "error": None, "machine": machine, "lines": [line]}))
    records = load_records(tmp_path, ["decode", "learner", "swap"])
    assert [r["bench"] for r in records] == ["decode", "decode@Haswell", "swap"]
    assert "| decode (Haswell) | step |" in block(records)


def test_rl_steps_are_the_gaps_between_step_lines_evaluations_left_out():
    lines = [{"kind": "eval", "step": 0, "time": 90.0}, {"step": 1, "time": 100.0}, {"step": 2, "time": 112.5}]
    lines += [{"kind": "eval", "step": 2, "time": 150.0}, {"step": 3, "time": 160.0}]
    assert step_gaps(lines) == [12.5, 47.5]  # the first step has no line before it; an evaluation counts in a gap
    assert step_gaps(lines[:2]) == []


def test_the_sdk_loop_gets_the_demos_step_shape():
    assert demo_shape() == {
        "task": "paraloop.envs.tasks:one_word",
        "prompts": 4,
        "group": 8,
        "max-tokens": 24,
        "rank": 16,
        "lr": pytest.approx(2.5e-4),  # 5e-5 at LoRA scale 10 is 2.5e-4 at Tinker's 32 / 16
    }
