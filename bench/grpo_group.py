"""GRPO group generation: one request with n=8 against 8 concurrent requests of the same prompt.

A GRPO group is G completions of one prompt. paraloop takes it as one request (`n=8`: the prompt is prefilled once
and decoded as 8 rows); a server without `n` (mlx_lm.server) needs 8 requests. Lines: paraloop n=8 over paraloop
8 x n=1 (target >= 2x tokens/s), and paraloop n=8 over mlx_lm.server's 8 requests (its faster model form, as found
by the HTTP benchmark, else float32). Rollout-like length: max_tokens 24 (the demo's), EOS off, temperature 1.0;
the three ways alternate for a few rounds and each line compares summed tokens over summed wall time.
"""

from bench import servers
from bench.harness import Context, Line

NAME = "group"
TITLE = "2. GRPO group generation (n=8 in one request)"
BUDGET_S = 90
USES_SERVERS = True
GROUP, MAX_TOKENS = 8, 24


def best_mlx_lm(ctx: Context) -> str:
    at32 = ctx.shared.get("http_tokens_per_s", {}).get(32)
    if not at32:
        return "mlx_lm_f32"
    return max(("mlx_lm_q4", "mlx_lm_f32"), key=lambda k: at32[k])


def run(ctx: Context) -> list[Line]:
    rounds = 1 if ctx.quick else 3
    theirs_kind = best_mlx_lm(ctx)
    ours, theirs = servers.server(ctx, "paraloop"), servers.server(ctx, theirs_kind)
    ways = {
        "paraloop n=8": lambda: servers.closed_loop(ours, clients=1, per_client=1, max_tokens=MAX_TOKENS, n=GROUP),
        "paraloop 8 x n=1": lambda: servers.closed_loop(ours, clients=GROUP, per_client=1, max_tokens=MAX_TOKENS,
                                                         same_prompt=True),
        "mlx_lm 8 requests": lambda: servers.closed_loop(theirs, clients=GROUP, per_client=1, max_tokens=MAX_TOKENS,
                                                          same_prompt=True),
    }  # fmt: skip
    ways["paraloop n=8"]()  # warm-up
    totals = {name: [0, 0.0, 0] for name in ways}  # tokens, seconds, failed
    for _ in range(rounds):
        for name, way in ways.items():
            r = way()
            totals[name][0] += r.tokens
            totals[name][1] += r.wall_s
            totals[name][2] += r.failed
    rate = {name: t[0] / t[1] for name, t in totals.items()}
    detail = {"rounds": rounds, "max_tokens": MAX_TOKENS, "group": GROUP, "mlx_lm_form": theirs_kind,
              "tokens_s_failed": totals}  # fmt: skip
    failed = sum(t[2] for t in totals.values())
    note = f"{failed} failed requests" if failed else ""
    return [
        Line(NAME, "paraloop n=8 over paraloop 8 concurrent n=1 requests", rate["paraloop n=8"],
             rate["paraloop 8 x n=1"], "tok/s", ">= 2.0", note, detail),
        Line(NAME, f"paraloop n=8 over 8 requests to {servers.KINDS[theirs_kind]}", rate["paraloop n=8"],
             rate["mlx_lm 8 requests"], "tok/s", None, note),
    ]  # fmt: skip
