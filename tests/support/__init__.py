"""What many tests share: a free TCP port, waiting for a condition under a deadline, waiting for `paraloop run`
to serve, a rollout group (and its wire form).

The layout of tests/: `test_*.py` hold tests only, and no test module imports another. What several of them use
lives here, one module per concern, imported as `support.<module>`: procs (child processes and their groups),
runs (`paraloop run` as a subprocess), serving (`paraloop serve` as a subprocess), http_harness (an in-process
server), engines, trainers, checkpoints, episodes, loss_reference and tinker_losses (float64 references),
tinker_models (the model the Tinker SDK tests train), tinker_server (`paraloop tinker` as a subprocess),
compute_paths and kernels (the numerics tests' tolerances and second BLAS kernel), run_fakes, fuzz_requests and
tinker_fuzz_requests (hypothesis strategies of requests to `paraloop run` and `paraloop tinker`),
doc_tables, hf_cache, adapter_files, chromium. conftest.py re-exports the one shared fixture (trainers.base).

Programs the tests start as child processes live apart, in tests/scripts/, because they are not modules a test
imports: two of them run under the Atropos venv's Python, which has neither paraloop nor this package's imports,
and each is started by its path. One that needs this package (distributed_trainer_script.py) is given tests/ on
its PYTHONPATH by the test that starts it.

Wait for the event that makes a check true (`until`), never for a fixed time: a sleep followed by a check that
something did *not* happen passes vacuously on a machine too slow for the thing to have happened yet.
"""

import json
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import anyio
import msgspec

from paraloop.messages import PROMPT_MASK, ScoredGroup

T = TypeVar("T")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a process that must be told its port before it starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def until(predicate: Callable[[], Any], what: str, *, within: float = 20.0, every: float = 0.01) -> None:
    """Return once `predicate()` is true; AssertionError naming `what` after `within` seconds."""
    deadline = anyio.current_time() + within
    while not predicate():
        if anyio.current_time() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {within} s")
        await anyio.sleep(every)


def until_blocking(
    predicate: Callable[[], T],
    what: str,
    *,
    within: float = 20.0,
    every: float = 0.1,
    ignoring: tuple[type[BaseException], ...] = (),
) -> T:
    """`until` for a test without an event loop (waiting on a subprocess): returns the predicate's first true
    value; an exception in `ignoring` (e.g. OSError while a server starts) counts as not yet."""
    deadline = time.monotonic() + within
    while True:
        try:
            if value := predicate():
                return value
        except ignoring:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {within} s")
        time.sleep(every)


def served_port(proc: subprocess.Popen, run_dir: Path, *, within: float = 120.0, log: Path | None = None) -> int:
    """The port `paraloop run` (`proc`) serves on, once RUN_DIR/server.json names it; AssertionError if it exits
    first, with the end of its output (its stderr pipe, else the `log` file it writes to)."""

    def served() -> int | None:
        if proc.poll() is not None:
            err = proc.stderr.read()[-3000:] if proc.stderr else log.read_text()[-3000:] if log else ""
            raise AssertionError(f"paraloop run exited early ({proc.returncode}): {err}")
        info = json.loads((run_dir / "server.json").read_text())  # absent or half-written: not yet
        return int(info["port"]) if info.get("pid") == proc.pid else None

    return until_blocking(served, "paraloop run to serve", within=within, ignoring=(OSError, ValueError))


def wait_for_server(proc: subprocess.Popen, run_dir: Path, *, within: float = 120.0) -> str:
    """`paraloop run`'s base URL, once it serves (`served_port`)."""
    return f"http://127.0.0.1:{served_port(proc, run_dir, within=within)}"


def group(
    scores: Sequence[float] | None = None,
    *,
    prompt: Sequence[int] = (1,),
    completion: Sequence[int] = (5, 6),
    completions: Sequence[Sequence[int]] | None = None,
    logprobs: Sequence[Sequence[float]] | None = None,
    version: int | None = None,
    **fields: Any,
) -> ScoredGroup:
    """A rollout group in Atropos' convention: each row is `prompt` (masked out of the loss), then its completion.
    The rows: one per `completions` (scored 0.0 unless `scores` says), else one per score, each ending `completion`.

    `logprobs`: the completions' sampling log-probs (the prompt gets Atropos' 1.0 placeholders). `version`: the
    adapter version every row was sampled with (None: unknown, as from Atropos). `fields`: further ScoredGroup
    fields, set as given over the built ones (so a test can build a malformed group too)."""
    if completions is None and scores is None:
        raise TypeError("group() needs scores or completions")
    rows = [list(c) for c in completions] if completions is not None else [list(completion)] * len(scores)
    built = {
        "tokens": [[*prompt, *row] for row in rows],
        "masks": [[PROMPT_MASK] * len(prompt) + row for row in rows],
        "scores": [0.0] * len(rows) if scores is None else [float(s) for s in scores],
        "inference_logprobs": None if logprobs is None else [[1.0] * len(prompt) + list(lp) for lp in logprobs],
        "versions": None if version is None else [version] * len(rows),
    }
    return ScoredGroup(**{**built, **fields})


def scored_data(group: ScoredGroup, **changes: Any) -> dict[str, Any]:
    """`group` as an environment POSTs it to Atropos' /scored_data (its fields that are set), then `changes`."""
    return {**{k: v for k, v in msgspec.structs.asdict(group).items() if v is not None}, **changes}


def wire_group(**changes):
    """A group as ManagedServer-based envs send it: 3 prompt tokens, then 2 and 3 generated tokens."""
    group = {
        "tokens": [[11, 12, 13, 40, 41], [11, 12, 13, 50, 51, 52]],
        "masks": [[-100, -100, -100, 40, 41], [-100, -100, -100, 50, 51, 52]],
        "scores": [1.0, 0.0],
        "advantages": [],
        "ref_logprobs": None,
        "messages": [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "hi"}]],
        "generation_params": {"temperature": 0.7},
        "inference_logprobs": [[1.0, 1.0, 1.0, -0.5, -0.25], [1.0, 1.0, 1.0, -1.5, -0.125, -2.0]],
        "overrides": [],
        "group_overrides": {},
        "images": [],
        "env_id": 3,
        "distill_token_ids": None,
        "distill_logprobs": None,
    }
    group.update(changes)
    return group
