"""One logging setup for every verb (`paraloop run`, `serve`, `launch-atropos`, the tools), and `hard_exit`.

PARALOOP_LOG sets the level: debug, info (default), warning or error. Lines go to stderr as
`time logger LEVEL message`; aiohttp's per-request access lines stay off below warning.
"""

import contextlib
import logging
import os
import sys

FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
LEVELS = ("debug", "info", "warning", "error", "critical")


def setup_logging() -> None:
    """Configure the root logger from PARALOOP_LOG (once per process; later calls change nothing)."""
    name = os.environ.get("PARALOOP_LOG", "info").strip().lower() or "info"
    if name not in LEVELS:
        print(
            f"paraloop: warning: PARALOOP_LOG={name!r} is not one of {', '.join(LEVELS)}: using info", file=sys.stderr
        )
        name = "info"
    logging.basicConfig(level=getattr(logging, name.upper()), format=FORMAT, stream=sys.stderr)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def hard_exit(code: int, message: str) -> None:
    """End the process now, skipping the orderly shutdown, after saying why (log, stderr, flushed). For what cannot
    be waited for: a second SIGINT, or a thread that will never return (stuck in a call, blocked in a collective
    whose peer is gone), which can be neither cancelled nor joined."""
    logging.getLogger("paraloop").error(message)
    print(f"paraloop: {message}", file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    logging.shutdown()
    os._exit(code)
