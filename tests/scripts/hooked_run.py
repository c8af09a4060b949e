"""`paraloop run ARGS...` with test hooks on the trainer, set by environment variables, for subprocess tests:

PARALOOP_TEST_TRAINED_LOG=PATH   append {"pid", "step", "tags"} to PATH after each step (tags: each group's first
                                 token), so a test can tell which groups each life of a run trained
PARALOOP_TEST_SLOW_STEP=N:S      learner step N first sleeps S seconds
PARALOOP_TEST_HANG_STEP=N        learner step N never returns (a stuck learner thread)
"""

import json
import os
import sys
import time

import paraloop  # noqa: F401  (OpenBLAS before mlx)
from paraloop.cli import main
from paraloop.learn.trainer import Trainer

original_step = Trainer.step


def step(self, batch):
    n = self.step_count + 1
    slow = os.environ.get("PARALOOP_TEST_SLOW_STEP")
    if slow and int(slow.split(":")[0]) == n:
        time.sleep(float(slow.split(":")[1]))
    if os.environ.get("PARALOOP_TEST_HANG_STEP") == str(n):
        while True:
            time.sleep(3600)
    result = original_step(self, batch)
    log = os.environ.get("PARALOOP_TEST_TRAINED_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "step": n, "tags": [g.tokens[0][0] for g in batch.groups]}) + "\n")
    return result


Trainer.step = step

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
