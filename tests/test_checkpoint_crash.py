"""Kill -9 at random moments, mostly mid-write: the newest finished checkpoint always survives whole."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import paraloop  # noqa: F401  (OpenBLAS before mlx)

from support import procs
from paraloop.checkpoint import latest_checkpoint, list_checkpoints, read_checkpoint

KILLS = 15
# macOS frameworks are not fork-safe once loaded: spawn a process per life there
FORK = sys.platform == "linux"

# Each writer saves ~3 MB checkpoints (adapter, reference and optimizer moments, 1 MB each) back to back,
# resuming the step count from the latest checkpoint and keeping the last 3 (so kills also hit pruning).
# With "fork", the script is a zygote: it imports paraloop once and forks one writer per line on stdin, so the
# lives cost no interpreter start-up. It never creates an MLX array itself: a child forked after MLX work would
# hang on MLX's scheduler thread, which fork does not copy.
WRITER = """
import os, signal, sys
import paraloop
import mlx.core as mx
import numpy as np
from paraloop.checkpoint import latest_checkpoint, verify_checkpoint, write_checkpoint

run, mode = sys.argv[1:]
rng = np.random.default_rng(0)
def arrays(n):
    names = [f"model.layers.{i}.mlp.down_proj.lora_{ab}" for i in range(n) for ab in "ab"]
    return {name: rng.standard_normal((256, 128)).astype(np.float32) for name in names}
adapter, reference, moments = arrays(4), arrays(4), arrays(2)
lora = {"rank": 8, "scale": 2.0, "dropout": 0.0, "keys": ["mlp.down_proj"]}
config = {"fine_tune_type": "lora", "num_layers": 4, "lora_parameters": lora}

def write_forever():
    adapter_ = {k: mx.array(v) for k, v in adapter.items()}
    reference_ = {k: mx.array(v) for k, v in reference.items()}
    layers = [{"m": mx.array(v), "v": mx.array(v * v)} for v in moments.values()]
    latest = latest_checkpoint(run)
    step = verify_checkpoint(latest, hashes=False)["step"] + 1 if latest else 1
    while True:
        state = {"step": mx.array(step, mx.uint64), "model": {"layers": layers}}
        write_checkpoint(run, step=step, version=step, adapter=adapter_, adapter_config=config,
                         optimizer_state=state, reference=reference_, trainer_state={"metrics": {"n": step}},
                         keep_last=3)
        step += 1

if mode == "spawn":
    print(os.getpid(), flush=True)
    write_forever()
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps killed writers
while sys.stdin.readline():
    pid = os.fork()
    if pid == 0:
        try:
            write_forever()
        finally:
            os._exit(1)  # a forked child never returns into the zygote's loop
    print(pid, flush=True)
"""


class Writers:
    """Starts writer processes (forked from one zygote, or spawned) and kills them with SIGKILL."""

    def __init__(self, run: Path) -> None:
        self.run = run
        self.zygote = self._start("fork") if FORK else None
        self.spawned: subprocess.Popen | None = None

    def _start(self, mode: str) -> subprocess.Popen:
        env = {**os.environ, "PARALOOP_OPENBLAS": "0"}  # no BLAS thread pool: the writers never multiply
        cmd = [sys.executable, "-c", WRITER, str(self.run), mode]
        # its own process group: the writers forked from the zygote die with it, whatever ends the test
        return procs.spawn(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def start(self) -> int:
        if self.zygote is None:
            self.spawned = self._start("spawn")
            return int(self.spawned.stdout.readline())
        self.zygote.stdin.write("fork\n")
        self.zygote.stdin.flush()
        return int(self.zygote.stdout.readline())

    def kill(self, pid: int) -> None:
        os.kill(pid, signal.SIGKILL)
        if self.spawned is not None:
            self.spawned.wait()
            self.spawned.stdout.close()
            self.spawned.stdin.close()
            return
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the zygote reaps it; wait until the pid is gone
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.005)
        raise AssertionError(f"writer {pid} still alive after SIGKILL")

    def close(self) -> None:
        for proc in (self.zygote, self.spawned):
            if proc is not None:
                procs.kill_group(proc, grace_s=0)


def staged(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("."))


def test_kill_9_during_checkpoint_writes_never_loses_or_corrupts_a_checkpoint(tmp_path):
    rng = random.Random(0)
    run = tmp_path / "run"
    writers = Writers(run)
    mid_write, last_step = 0, 0
    try:
        for _ in range(KILLS):
            pid = writers.start()
            time.sleep(rng.uniform(0.02, 0.3))
            writers.kill(pid)

            leftovers = staged(run)
            mid_write += any(name.startswith(".tmp-step_") for name in leftovers)
            steps = list_checkpoints(run)
            latest = latest_checkpoint(run)
            assert (latest is None) == (not steps)
            if latest is None:
                continue  # killed before its first checkpoint was done
            for step_dir in steps:  # no step_ name ever holds a partial checkpoint
                ckpt = read_checkpoint(step_dir)
                assert ckpt.optimizer_state["step"].item() == ckpt.step
            newest = read_checkpoint(latest)
            # `latest` names the newest step, or the one before if the kill came between rename and pointer
            assert newest.step >= int(steps[-1].name.split("_")[1]) - 1
            # a later life resumes from here, so nothing finished is ever lost
            assert newest.step >= last_step
            # a writer that finished a write has first removed the dead writers' staging dirs
            if newest.step > last_step:
                assert all(name.endswith(f"-{pid}") for name in leftovers), leftovers
            last_step = newest.step
    finally:
        writers.close()
    assert mid_write >= 1  # the kills did land inside checkpoint writes
