"""Engine over HTTP: paraloop serve vs mlx_lm.server, SmolLM2-135M, 1 / 8 / 32 concurrent clients.

Same chat prompts, same max_tokens, temperature 1.0, EOS off on both (see servers.py), generated tokens counted
from `usage`. mlx_lm.server runs twice: on the 4-bit model and on the float32 copy (its fastest form on this CPU);
paraloop serves the 4-bit model, which it dequantizes to float32 on the CPU (model.compute = auto). The three
servers run side by side and each concurrency level is measured on all three in turn, so load from other
processes falls on all of them alike. Before measuring, each server answers a greedy question (the sanity check,
recorded in the JSON) and a warm-up burst. paraloop and the float32 mlx_lm.server, whose race is close, are measured
three times per level (fresh prompts each round) and compared on summed tokens over summed time.
"""

from bench import servers
from bench.harness import Context, Line

NAME = "http"
TITLE = "1. Engine over HTTP (tokens/s, SmolLM2-135M)"
BUDGET_S = 300
USES_SERVERS = True
QUESTION = "What is the capital of France?"


def levels(quick: bool) -> list[tuple[int, int, int]]:
    """(clients, requests per client, max_tokens) per concurrency level."""
    if quick:
        return [(1, 1, 8), (8, 1, 8), (32, 1, 8)]
    return [(1, 2, 24), (8, 1, 32), (32, 1, 32)]


def rounds(kind: str, quick: bool) -> int:
    """Repeats per level: the close race (paraloop vs float32 mlx_lm) three times; the 4-bit server, ~10x slower
    on this CPU, once."""
    return 1 if quick or kind == "mlx_lm_q4" else 3


def run(ctx: Context) -> list[Line]:
    kinds = list(servers.KINDS)
    running = {kind: servers.server(ctx, kind) for kind in kinds}
    sanity = {}
    for kind, srv in running.items():
        answer = servers.ask(srv, QUESTION)
        sanity[kind] = {"answer": answer, "sane": "paris" in answer.lower()}
        servers.closed_loop(srv, clients=4, per_client=1, max_tokens=4)  # warm-up
    results: dict[int, dict[str, servers.LoadResult]] = {}
    for i, (clients, per_client, max_tokens) in enumerate(levels(ctx.quick)):
        results[clients] = {}
        for r in range(max(rounds(k, ctx.quick) for k in kinds)):
            shift = (i + r) % len(kinds)
            for kind in kinds[shift:] + kinds[:shift]:  # rotate who goes first
                if r >= rounds(kind, ctx.quick):
                    continue
                # fresh prompts each round
                got = servers.closed_loop(running[kind], clients=clients, per_client=per_client,
                                          max_tokens=max_tokens, first=1000 * (r + 1))  # fmt: skip
                results[clients][kind] = results[clients][kind] + got if kind in results[clients] else got
    ctx.shared["http_tokens_per_s"] = {
        c: {k: r.tokens_per_s for k, r in rs.items()} for c, rs in results.items()
    }

    insane = [k for k, s in sanity.items() if not s["sane"]]
    lines = []
    for clients, by_kind in results.items():
        ours = by_kind["paraloop"]
        best = max(("mlx_lm_q4", "mlx_lm_f32"), key=lambda k: by_kind[k].tokens_per_s)
        for kind in ("mlx_lm_q4", "mlx_lm_f32"):
            theirs = by_kind[kind]
            target = ">= 1.0" if clients == 32 and kind == best else None
            failed = ours.failed + theirs.failed
            note = f"{failed} failed requests" if failed else ""
            if insane:
                note = (note + "; " if note else "") + f"answer not sane: {', '.join(insane)}"
            detail = {"sanity": sanity, "clients": clients,
                      "paraloop": vars(ours), kind: vars(theirs)}  # fmt: skip
            lines.append(Line(NAME, f"{clients} client{'s' * (clients > 1)}: paraloop over {servers.KINDS[kind]}",
                              ours.tokens_per_s, theirs.tokens_per_s, "tok/s", target, note, detail))  # fmt: skip
    return lines
