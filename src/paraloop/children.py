"""Child processes, supervised: the one home of `paraloop launch` and `paraloop launch-atropos`'s children.

In: named argvs to start (`anyio.open_process`), each by default in a process group of its own, so its own children
stop with it. Out: each child's output, line by line, to a sink the caller chooses (by default `[name] line` on
`out`), and each exit, reported once by `wait_any` in the order they happen. Stops: `stop(name)` sends SIGTERM to
the child's group (to the child alone when it shares the launcher's group), then SIGKILL after `grace` seconds;
leaving `async with Children(...)` stops every child still running, even on cancellation or error. A child's exit
wakes its waiters (`wait_any`, `Child.done`); closing the group wakes any `wait_any` still waiting, with an error.
"""

import contextlib
import math
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import anyio
import anyio.abc

LINE_LIMIT = 1 << 20  # longer lines (environments print long rich tables) are passed on in pieces of this size
OUTPUT_AFTER_EXIT_S = 5.0  # how long output is still read after a child exits (a grandchild may hold its pipe)

Sink = Callable[[bytes], None]  # receives one line, newline included (the last one may lack it)


@dataclass(eq=False)
class Child:
    name: str
    process: anyio.abc.Process
    own_group: bool  # in a process group of its own (its pid is the group id)
    done: anyio.Event = field(default_factory=anyio.Event)  # exited, and its output read (or given up on)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def signal(self, sig: int) -> None:
        """Send `sig` to the child's process group (or to the child alone when it shares ours)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self.own_group:
                os.killpg(self.pid, sig)
            elif self.returncode is None:
                self.process.send_signal(sig)


class Children:
    """Named child processes; `async with Children(grace=10) as children:` stops every one still running on exit."""

    def __init__(self, *, grace: float = 10.0, out: TextIO | None = None, notices: bool = True) -> None:
        self.grace = grace
        self.out = out or sys.stdout
        self.notices = notices  # say "started ..." and "... SIGKILL" on `out` as [launch]
        self.children: dict[str, Child] = {}
        self._exits_in, self._exits = anyio.create_memory_object_stream[Child](math.inf)  # one per start at most
        self._reported = 0
        self._tasks: anyio.abc.TaskGroup | None = None

    async def __aenter__(self) -> "Children":
        self._tasks = anyio.create_task_group()
        await self._tasks.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> bool:
        assert self._tasks is not None
        self._tasks.cancel_scope.shield = True  # children are stopped before a cancellation goes on
        try:
            await self.stop_all()
            self._tasks.cancel_scope.cancel()  # what start_soon started ends with the children
        finally:
            self._exits_in.close()
            # The body's own exception (or cancellation) goes on as it is, not wrapped in an ExceptionGroup.
            await self._tasks.__aexit__(None, None, None)
            self._exits.close()
        return False

    def say(self, name: str, line: str) -> None:
        self.out.write(f"[{name}] {line.rstrip()}\n")
        self.out.flush()

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run `fn(*args)` beside the children until the group closes (it is cancelled then)."""
        assert self._tasks is not None, "use Children in `async with`"
        self._tasks.start_soon(fn, *args)

    async def start(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        own_group: bool = True,
        stdout: Sink | None = None,
        stderr: Sink | None = None,
    ) -> Child:
        """Start `argv` as child `name`. `env` is its whole environment (None: ours). Output goes line by line to
        `stdout` (None: `[name] line` on `out`); stderr to `stderr`, or with stdout when it is None."""
        assert self._tasks is not None, "use Children in `async with`"
        if name in self.children and self.children[name].returncode is None:
            raise ValueError(f"a child named {name!r} is already running")
        process = await anyio.open_process(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if stderr is None else subprocess.PIPE,
            env=env,
            start_new_session=own_group,
        )
        child = Child(name, process, own_group)
        self.children[name] = child
        if self.notices:
            self.say("launch", f"started {name} (pid {child.pid}): {' '.join(argv)}")
        out = stdout or (lambda line: self.say(name, line.decode(errors="replace")))
        self._tasks.start_soon(self._watch, child, out, stderr)
        return child

    async def _watch(self, child: Child, stdout: Sink, stderr: Sink | None) -> None:
        try:
            async with anyio.create_task_group() as pumps:
                assert child.process.stdout is not None
                pumps.start_soon(forward_lines, child.process.stdout, stdout)
                if stderr is not None:
                    assert child.process.stderr is not None
                    pumps.start_soon(forward_lines, child.process.stderr, stderr)
                await child.process.wait()
                pumps.cancel_scope.deadline = anyio.current_time() + OUTPUT_AFTER_EXIT_S
            await child.process.aclose()
        finally:
            child.done.set()
            with contextlib.suppress(anyio.ClosedResourceError):
                self._exits_in.send_nowait(child)

    def unreported(self) -> int:
        """How many children's exits `wait_any` has yet to return."""
        return len(self.children) - self._reported

    async def wait_any(self) -> tuple[str, int]:
        """Wait until a child exits (its output read) and return its name and return code; each exit once."""
        if not self.unreported():
            raise RuntimeError("no child left to wait for")
        try:
            child = await self._exits.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise RuntimeError("the children's group closed while waiting") from None
        self._reported += 1
        return child.name, child.returncode or 0

    async def stop(self, name: str) -> int | None:
        """SIGTERM the child (its group), SIGKILL after `grace` seconds; return its return code."""
        child = self.children[name]
        if child.returncode is None:
            child.signal(signal.SIGTERM)
            with anyio.move_on_after(self.grace):
                await child.process.wait()
            if child.returncode is None:
                if self.notices:
                    self.say("launch", f"{name} did not stop within {self.grace:g} s: SIGKILL")
                child.signal(signal.SIGKILL)
                await child.process.wait()
        if child.own_group:
            child.signal(signal.SIGKILL)  # leftovers of the group (e.g. a grandchild that ignored SIGTERM) go too
        with anyio.move_on_after(OUTPUT_AFTER_EXIT_S + 1):
            await child.done.wait()
        return child.returncode

    async def stop_all(self) -> None:
        async with anyio.create_task_group() as tg:
            for name in list(self.children):
                tg.start_soon(self.stop, name)


async def forward_lines(stream: anyio.abc.ByteReceiveStream, sink: Sink, *, limit: int = LINE_LIMIT) -> None:
    """Pass `stream` on to `sink` a line at a time (pieces of `limit` bytes for longer lines) until it ends."""
    pending = b""
    with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
        async for chunk in stream:
            pending += chunk
            while (end := pending.find(b"\n") + 1) or len(pending) >= limit:
                end = min(end or limit, limit)
                sink(pending[:end])
                pending = pending[end:]
    if pending:
        sink(pending)
