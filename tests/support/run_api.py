"""atroposlib's `run-api` (from the Atropos venv) as a test child: started in its own process group, returned once it
answers, killed with its group when the block is left."""

import contextlib
import os
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from support import procs

REPO = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("PARALOOP_ATROPOS_VENV", REPO / ".venv-atropos"))
RUN_API = VENV / "bin" / "run-api"
DEADLINE_S = 60  # only bounds a hang


@contextlib.contextmanager
def run_api(port: int) -> Iterator[subprocess.Popen]:
    """run-api on 127.0.0.1:`port` for the block (a restart test may stop it inside the block)."""
    argv = [str(RUN_API), "--host", "127.0.0.1", "--port", str(port)]
    log = tempfile.TemporaryFile("w+")  # not a pipe: nobody reads it while the server runs, and a full pipe blocks
    with log, procs.running(argv, stdout=log, stderr=subprocess.STDOUT, grace_s=0) as proc:
        deadline = time.monotonic() + DEADLINE_S
        while True:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).close()
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise AssertionError(f"run-api did not start: {log.read()[-2000:]}")
            time.sleep(0.1)
        yield proc
