"""`paraloop serve` as a user runs it: a subprocess in its own process group, its port read from the line it logs."""

import http.client
import json
import os
import subprocess
import sys

from support.procs import Lines, kill_group, spawn

DEADLINE_S = 120  # generous: only bounds a hang, never asserted on


class Serve:
    """A running `python -m paraloop serve ...` in its own process group, its port read from the line it logs."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, port: int = 0) -> None:
        cmd = [sys.executable, "-m", "paraloop", "serve", "--port", str(port), *args]
        self.proc = spawn(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        self.lines = Lines(self.proc.stderr)
        self.port = port

    def wait_serving(self) -> "Serve":
        m = self.lines.expect(r"serving .* on http://127\.0\.0\.1:(\d+)", timeout=DEADLINE_S)
        self.port = int(m.group(1))
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "Serve":
        try:
            return self.wait_serving() if self.port == 0 else self
        except BaseException:
            kill_group(self.proc)
            raise

    def __exit__(self, *exc: object) -> None:
        kill_group(self.proc)  # a no-op after a clean stop; the whole group otherwise

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=DEADLINE_S)
        try:
            conn.request(method, path, body=json.dumps(body) if body is not None else None)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    def stop(self, sig: int) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=DEADLINE_S)
