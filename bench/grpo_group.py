"""GRPO group generation: one request with n=8 against 8 concurrent requests of the same prompt.

A GRPO group is G completions of one prompt. paraloop takes it as one request (`n=8`: the prompt is prefilled once
and decoded as 8 rows); a server without `n` (mlx_lm.server) needs 8 requests. Without a prefix cache these
prefill the prompt 8 times; with paraloop's, 7 of them wait for the first one's prefill and start from its KV. So
the gains are the prefill saved, and they grow with the prompt: measured with the demo's rollout shape (a ~40-token
chat prompt, max_tokens 24) and with a ~400-token prompt (a task with context or few-shot examples), EOS off,
temperature 1.0. Lines per prompt: paraloop n=8 over 8 concurrent n=1 requests to paraloop with its prefix cache
off (target >= 2x tokens/s at ~400 tokens), 8 concurrent requests with the prefix cache over without it, and n=8
over mlx_lm.server's 8 requests (its faster model form as found by the HTTP benchmark, else float32). The ways
alternate for a few rounds; every way of every round gets its own prompt (a tag at its start), so no way starts
from what an earlier one left in a cache; a line compares summed tokens over summed time.
"""

from bench import servers
from bench.harness import Context, Line

NAME = "group"
TITLE = "2. GRPO group generation (n=8 in one request)"
BUDGET_S = 150
USES_SERVERS = True
GROUP, MAX_TOKENS = 8, 24
PROMPTS = {"~40-token prompt": 0, "~400-token prompt": 250}  # label -> words of context before the question


def best_mlx_lm(ctx: Context) -> str:
    at32 = ctx.shared.get("http_tokens_per_s", {}).get(32)
    if not at32:
        return "mlx_lm_f32"
    return max(("mlx_lm_q4", "mlx_lm_f32"), key=lambda k: at32[k])


def measure(running: dict[str, servers.Server], theirs: str, *, context: str, rounds: int) -> dict:
    ours, uncached = running["paraloop"], running["paraloop_nocache"]

    def ways() -> dict:
        return {
            "paraloop n=8": lambda **c: servers.closed_loop(ours, clients=1, per_client=1, n=GROUP, **c),
            "paraloop 8 x n=1": lambda **c: servers.closed_loop(
                ours, clients=GROUP, per_client=1, same_prompt=True, **c
            ),
            "paraloop 8 x n=1, cache off": lambda **c: servers.closed_loop(
                uncached, clients=GROUP, per_client=1, same_prompt=True, **c
            ),
            "mlx_lm 8 requests": lambda **c: servers.closed_loop(
                running[theirs], clients=GROUP, per_client=1, same_prompt=True, **c
            ),
        }

    totals: dict[str, servers.LoadResult] = {}
    for r in range(rounds):
        for w, (name, way) in enumerate(ways().items()):
            tag = f"Request set {r}.{w}. "  # a prompt of its own: nothing cached by an earlier way helps
            got = way(max_tokens=MAX_TOKENS, first=2000 + r, prefix=tag + context)
            totals[name] = totals[name] + got if name in totals else got
    return totals


def run(ctx: Context) -> list[Line]:
    theirs_kind = best_mlx_lm(ctx)
    running = {kind: servers.server(ctx, kind) for kind in ("paraloop", "paraloop_nocache", theirs_kind)}
    for kind in ("paraloop", "paraloop_nocache"):
        servers.closed_loop(running[kind], clients=1, per_client=1, max_tokens=4, n=GROUP)  # warm-up
    lines = []
    for label, words in PROMPTS.items():
        rounds = 1 if ctx.quick else 3 if words == 0 else 2
        totals = measure(running, theirs_kind, context=servers.long_context(words) if words else "", rounds=rounds)
        rate = {name: t.tokens_per_s for name, t in totals.items()}
        failed = sum(t.failed for t in totals.values())
        note = f"{failed} failed requests" if failed else ""
        detail = {
            "rounds": rounds,
            "max_tokens": MAX_TOKENS,
            "group": GROUP,
            "mlx_lm_form": theirs_kind,
            "context_words": words,
            **{name: vars(t) for name, t in totals.items()},
        }
        lines += [
            Line(
                NAME,
                f"{label}: paraloop n=8 over 8 concurrent n=1 requests, prefix cache off",
                rate["paraloop n=8"],
                rate["paraloop 8 x n=1, cache off"],
                "tok/s",
                ">= 2.0" if words else None,
                note,
                detail,
            ),
            Line(
                NAME,
                f"{label}: 8 concurrent n=1 requests, prefix cache on over off",
                rate["paraloop 8 x n=1"],
                rate["paraloop 8 x n=1, cache off"],
                "tok/s",
                None,
                note,
            ),
            Line(
                NAME,
                f"{label}: paraloop n=8 over 8 requests to {servers.KINDS[theirs_kind]}",
                rate["paraloop n=8"],
                rate["mlx_lm 8 requests"],
                "tok/s",
                None,
                note,
            ),
        ]
    return lines
