"""paraloop's benchmarks: side-by-side ratios against mlx-lm, one small module per benchmark.

`python -m bench.run_all [--only NAME] [--quick]` runs them, prints one table, writes bench/results/*.json and the
table in docs/benchmarks.md. Every line is a ratio measured in the same run (absolute times on a shared machine are
noise); harness.py holds the shared pieces (result lines, machine facts, child processes, memory readings).
"""
