"""paraloop.children: output forwarded line by line (stdout and stderr apart when asked, long lines in pieces), a
child sharing our process group stopped alone, and every waiter woken by a stop or by the group closing."""

import sys

import anyio
import anyio.abc
import pytest

from paraloop.children import Children, forward_lines

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


class Chunks(anyio.abc.ByteReceiveStream):
    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if not self.chunks:
            raise anyio.EndOfStream
        return self.chunks.pop(0)

    async def aclose(self) -> None:
        pass


def test_lines_are_forwarded_whole_across_chunks_and_long_ones_in_pieces():
    lines: list[bytes] = []
    chunks = Chunks(b"ab", b"c\nde", b"f\n", b"0123456789", b"xyz")
    anyio.run(lambda: forward_lines(chunks, lines.append, limit=4), backend="asyncio")
    assert lines == [b"abc\n", b"def\n", b"0123", b"4567", b"89xy", b"z"]


@pytest.mark.timeout(60)
def test_stdout_and_stderr_go_to_their_sinks_and_a_child_in_our_group_is_stopped_alone():
    out: list[bytes] = []
    err: list[bytes] = []
    script = "import sys, time; print('o1', flush=True); print('e1', file=sys.stderr, flush=True); time.sleep(60)"

    async def scenario():
        both = anyio.Event()

        def sink(lines: list[bytes]):
            def write(line: bytes) -> None:
                lines.append(line)
                if out and err:
                    both.set()

            return write

        with anyio.fail_after(30):
            async with Children(grace=5, notices=False) as children:
                child = await children.start(
                    "c", [sys.executable, "-c", script], own_group=False, stdout=sink(out), stderr=sink(err)
                )
                await both.wait()
                assert await children.stop("c") == -15
                assert await children.wait_any() == ("c", -15) and children.unreported() == 0
                return child

    child = anyio.run(scenario, backend="asyncio")
    assert (out, err) == ([b"o1\n"], [b"e1\n"]) and child.done.is_set()


@pytest.mark.timeout(60)
def test_a_stop_wakes_one_waiter_with_the_exit_and_closing_the_group_wakes_the_other():
    """Two tasks wait for the one child: the stop at the group's end reports its exit to one, and the other is not
    left waiting for an exit that will never come."""
    woken: list[object] = []

    async def waiter(children: Children) -> None:
        try:
            woken.append(await children.wait_any())
        except RuntimeError as e:
            woken.append(str(e))

    async def scenario():
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                async with Children(grace=5, notices=False) as children:
                    await children.start("sleeper", SLEEPER)
                    tg.start_soon(waiter, children)
                    tg.start_soon(waiter, children)
                    await anyio.wait_all_tasks_blocked()

    anyio.run(scenario, backend="asyncio")
    assert sorted(woken, key=str) == [("sleeper", -15), "the children's group closed while waiting"]
