"""Distributed: the all-reduce's share of a data-parallel learner step, and the scaling it allows, by arithmetic.

Two ranks on this machine (loopback, MLX's ring backend) each train half of a demo-shaped batch of SmolLM2-135M
with the demo's rank-16 LoRA and sum gradients through `Ranks.reduce`; one process trains the whole batch as the
reference. The line: the median time inside the all-reduce per step over the median 2-rank step time (target
<= 5%). Two ranks share two cores here, so the speed-up itself cannot be measured; the detail holds the bytes moved
per step and the expected step time and speed-up on 2 and 4 machines over 10 Gb Ethernet and Thunderbolt 5,
computed (not measured) from the measured single-process step time and the bytes: a ring all-reduce of S bytes
over N ranks sends and receives 2 (N - 1) / N * S per rank, in 2 (N - 1) rounds of one link latency each.
"""

import json
import sys

from bench.harness import Context, Line, free_port, median, wait_until

NAME = "distributed"
TITLE = "8. Distributed: gradient all-reduce over the learner step (2 ranks, ring backend)"
BUDGET_S = 300
LINKS = {  # usable bandwidth (bytes/s) and latency (s) per link, as assumed for the arithmetic
    "10 Gb Ethernet (ring over TCP)": (1.1e9, 50e-6),
    "Thunderbolt 5 (JACCL, RDMA)": (6.0e9, 10e-6),
}


def allreduce_s(size_bytes: float, ranks: int, bandwidth: float, latency: float) -> float:
    return 2 * (ranks - 1) / ranks * size_bytes / bandwidth + 2 * (ranks - 1) * latency


def scaling(single_step_s: float, reduce_bytes: float, exchange_bytes: float) -> dict:
    out = {}
    for link, (bandwidth, latency) in LINKS.items():
        for n in (2, 4):
            comm = allreduce_s(reduce_bytes, n, bandwidth, latency) + exchange_bytes * (n - 1) / n / bandwidth
            step = single_step_s / n + comm
            out[f"{link}, {n} machines"] = {
                "step_s": step,
                "all_reduce_s": comm,
                "speedup": single_step_s / step,
                "comm_share": comm / step,
                "step_s_at_5_percent": 19 * comm,
            }
    return out


def run(ctx: Context) -> list[Line]:
    rows, length, steps = (16, 48, 2) if ctx.quick else (32, 64, 3)
    model = str(ctx.model_q4)
    out = ctx.log_dir / "distributed.json"
    hostfile = ctx.log_dir / "ring-hosts.json"
    first = free_port()
    hostfile.write_text(json.dumps([[f"127.0.0.1:{first}"], [f"127.0.0.1:{free_port()}"]]))
    args = ["-m", "bench.distributed_rank", model, str(out), str(rows), str(length), str(steps)]
    children = [
        ctx.spawn(
            f"distributed-rank{r}", [sys.executable, *args], env={"MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)}
        )
        for r in range(2)
    ]
    wait_until(lambda: not any(c.alive() for c in children), timeout_s=BUDGET_S * 2, what="the two ranks")
    for c in children:
        if c.proc.returncode != 0:
            raise RuntimeError(f"{c.name} failed ({c.proc.returncode}):\n{c.tail()}")
    two = json.loads(out.read_text())
    single = ctx.spawn("distributed-single", [sys.executable, *args])
    wait_until(lambda: not single.alive(), timeout_s=BUDGET_S * 2, what="the single process")
    if single.proc.returncode != 0:
        raise RuntimeError(f"single process failed:\n{single.tail()}")
    one = json.loads(out.read_text())
    reduce_bytes = median(two["reduce_bytes"])
    detail = {
        "two_ranks": two,
        "single_process": one,
        "bytes_per_step": {
            "all_reduce_vector": reduce_bytes,
            "sent_and_received_per_rank_2_ranks": reduce_bytes,  # 2 (N-1)/N * S with N = 2
            "rollout_exchange": two["exchange"]["bytes"],
        },
        "transfer_only_s": two["transfer_s"],
        "expected": scaling(median(one["step_s"]), reduce_bytes, two["exchange"]["bytes"]),
        "assumed_links": {k: {"bandwidth_bytes_s": b, "latency_s": lat} for k, (b, lat) in LINKS.items()},
    }
    note = (
        f"{reduce_bytes / 2**20:.1f} MiB summed per step ({two['lora_parameters'] / 1e6:.2f} M LoRA parameters); "
        f"2 ranks share 2 cores here: speed-up by arithmetic in the detail"
    )
    return [
        Line(
            NAME,
            f"SmolLM2-135M rank-16 LoRA, {rows}x{length} tokens: all-reduce time over step time, 2 ranks",
            median(two["reduce_s"]),
            median(two["step_s"]),
            "s",
            "<= 0.05",
            note=note,
            detail=detail,
        ),
        Line(
            NAME,
            "rollout exchange of the batch: Ranks.gather (lengths + all_gather) over send/recv",
            two["exchange"]["gather_s"],
            two["exchange"]["send_recv_s"],
            "s",
            note=f"{two['exchange']['bytes'] / 1024:.0f} KiB of msgpack",
        ),
    ]
