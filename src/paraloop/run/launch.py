"""`paraloop launch`: start one paraloop command as N ranks of MLX's ring backend, here or over ssh.

    paraloop launch -n 2 -- run configs/tiny.toml                  two ranks on this machine (loopback)
    paraloop launch --hostfile hosts.json -- run config.toml       one rank per host entry, over ssh

The hostfile is mlx.launch's: a JSON list of {"ssh": name, "ips": [ip, ...]} (or {"hosts": [...]}); each rank
listens on its first IP at --starting-port + rank. Every rank gets MLX_RANK and MLX_HOSTFILE, as mlx.launch sets
them; its output comes back with a `[rank r]` prefix. The launcher exits with the first non-zero exit code of a rank
(0 when all succeed). A rank that fails makes the others end by themselves (run/peers.py); any still running
`--grace` seconds later are terminated. Ctrl-C reaches every local rank (one process group); SIGTERM to the
launcher is passed on to each rank. JACCL, NCCL and MPI: use mlx.launch itself (docs/distributed.md).
"""

import argparse
import json
import os
import random
import shlex
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import anyio

from paraloop.children import Children

LOCAL = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class Host:
    ssh: str
    ip: str

    @property
    def local(self) -> bool:
        return self.ssh in LOCAL


def read_hosts(args: argparse.Namespace) -> list[Host]:
    if args.hostfile:
        try:
            data = json.loads(Path(args.hostfile).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"paraloop launch: error: cannot read hostfile {args.hostfile}: {e}") from None
        entries = data.get("hosts", []) if isinstance(data, dict) else data
        hosts = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("ssh"), str):
                raise SystemExit(f'paraloop launch: error: {args.hostfile}: host {i} needs an "ssh" name')
            ips = entry.get("ips") or [entry["ssh"]]
            hosts.append(Host(entry["ssh"], ips[0]))
    else:
        hosts = [Host(h, h) for h in args.hosts.split(",") if h]
    hosts = [h for h in hosts for _ in range(args.n)]
    if len(hosts) < 2:
        raise SystemExit("paraloop launch: error: a distributed run needs at least 2 ranks (-n, --hosts or --hostfile)")
    return hosts


def free_ports(count: int) -> int:
    """A first port such that `count` consecutive ports are free here (ranks on one machine share it). Taken below
    Linux's ephemeral range (32768-60999), where outgoing connections would take a port between this check and the
    ranks binding it."""
    rng = random.Random()
    for _ in range(200):
        first = rng.randrange(20000, 32000 - count)
        try:
            for port in range(first, first + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise SystemExit("paraloop launch: error: no free ports for the ring backend")


def ring_hostfile(hosts: list[Host], first_port: int) -> str:
    return json.dumps([[f"{h.ip}:{first_port + rank}"] for rank, h in enumerate(hosts)])


def rank_command(rank: int, host: Host, ring: str, args: argparse.Namespace, command: list[str]) -> list[str]:
    """The argv that starts `rank`: directly for this machine, through ssh for another."""
    python = args.python or sys.executable
    if host.local:
        return [python, "-m", "paraloop", *command]
    script = (
        f"f=$(mktemp) && echo {shlex.quote(ring)} > $f && export MLX_HOSTFILE=$f MLX_RANK={rank} && "
        + (f"cd {shlex.quote(args.cwd)} && " if args.cwd else "")
        + shlex.join([python, "-m", "paraloop", *command])
    )
    return ["ssh", "-tt", "-o", "LogLevel=QUIET", host.ssh, script]


def exit_code(returncode: int) -> int:
    """A child's return code as a shell reports it (killed by signal N: 128 + N)."""
    return returncode if returncode >= 0 else 128 - returncode


def prefixed(out: BinaryIO, prefix: str) -> Callable[[bytes], None]:
    def write(line: bytes) -> None:
        out.write(prefix.encode() + line)
        out.flush()

    return write


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="paraloop launch",
        description="start a paraloop command (usually `run`) as the ranks of one "
        "distributed run, over MLX's ring backend",
        epilog="example: paraloop launch -n 2 -- run configs/tiny.toml",
    )
    parser.add_argument("-n", type=int, default=1, help="ranks per host (default 1)")
    parser.add_argument("--hosts", default="127.0.0.1", help="comma-separated IPs (default 127.0.0.1)")
    parser.add_argument("--hostfile", help='mlx.launch\'s JSON hostfile: [{"ssh": ..., "ips": [...]}, ...]')
    parser.add_argument(
        "--starting-port",
        "-p",
        type=int,
        default=None,
        help="ring port of rank 0, +1 per rank (default: free ports here, 32323 across machines)",
    )
    parser.add_argument("--python", help="python on the remote hosts (default: this one's path)")
    parser.add_argument("--cwd", help="working directory on the remote hosts")
    parser.add_argument(
        "--grace",
        type=float,
        default=60.0,
        help="seconds the other ranks get to end by themselves after one fails (default 60)",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the paraloop command, e.g. run config.toml")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command: paraloop launch [options] -- run config.toml")
    hosts = read_hosts(args)
    first = args.starting_port or (free_ports(len(hosts)) if all(h.local for h in hosts) else 32323)
    ring = ring_hostfile(hosts, first)
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="paraloop-ring-", delete=False) as f:
        f.write(ring)
    try:
        return anyio.run(supervise, hosts, ring, f.name, args, command)
    finally:
        os.unlink(f.name)


async def supervise(hosts: list[Host], ring: str, ring_path: str, args: argparse.Namespace, command: list[str]) -> int:
    """Start every rank, forward signals to them, wait for them all; after a failure the others get --grace seconds
    to end by themselves, then SIGTERM (SIGKILL 10 s later)."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with Children(grace=10.0, notices=False) as ranks:
            ranks.start_soon(forward_signals, signals, ranks, hosts)
            for rank, host in enumerate(hosts):
                env = {**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": ring_path}
                # Ranks share the launcher's process group: Ctrl-C (and whoever kills the group) reaches them all.
                await ranks.start(
                    str(rank),
                    rank_command(rank, host, ring, args, command),
                    env=env,
                    own_group=False,
                    stdout=prefixed(sys.stdout.buffer, f"[rank {rank}] "),
                    stderr=prefixed(sys.stderr.buffer, f"[rank {rank}] "),
                )
            code = 0
            with anyio.CancelScope() as waiting:
                while ranks.unreported():
                    name, returncode = await ranks.wait_any()
                    if returncode != 0 and not code:
                        code = exit_code(returncode)
                        print(f"paraloop launch: rank {name} exited with code {returncode}", file=sys.stderr)
                        waiting.deadline = anyio.current_time() + args.grace
            await ranks.stop_all()
        return code


async def forward_signals(signals: AsyncIterator[int], ranks: Children, hosts: list[Host]) -> None:
    """Ctrl-C reached every local rank already (one process group): pass on SIGTERM to all, SIGINT to remote ones."""
    async for signum in signals:
        for rank, host in enumerate(hosts):
            child = ranks.children.get(str(rank))
            if child is not None and (signum == signal.SIGTERM or not host.local):
                child.signal(signum)
