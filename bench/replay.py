"""Sampling-mask replay: how far the learner's log-probs are from the engine's when rollouts use top_p or top_k.

The engine samples G = 8 completions of 8 chat prompts with SmolLM2 (4-bit, temperature 1.0, 48 tokens, EOS off) at
top_p = 0.8 and at top_k = 20, recording each token's log-prob under the distribution it sampled from and its
kept-set size. The learner (the same weights, no adapter: any gap is the sampling mask or numerics) rescores every
token through its chunked LM head twice: over the recorded kept sets (replay) and over the full vocabulary (what a
learner without the record does). A line per filter: the fraction of rollout ratios exp(learner - engine) outside
[0.8, 1.25] (the band of the live `rollout_ratio_outside` metric) with replay over without; details add the
fraction outside [0.9, 1.1] and the mean |log ratio|. An unfiltered run (top_p = 1) is the numerics floor.
"""

from bench.harness import Context, Line

NAME = "replay"
TITLE = "13. Sampling-mask replay: rollout ratios outside [0.8, 1.25] at top_p / top_k"
BUDGET_S = 600
GROUP, PROMPTS, MAX_TOKENS = 8, 8, 48
QUESTIONS = [
    "Name one animal that lives in the sea.",
    "What is a good name for a cat?",
    "Describe the colour of the sky.",
    "Give me a word that rhymes with light.",
    "What do people eat for breakfast?",
    "Name a musical instrument.",
    "Which fruit is yellow?",
    "Tell me something about winter.",
]
SETTINGS = {"top_p = 0.8": {"top_p": 0.8}, "top_k = 20": {"top_k": 20}, "no filter": {}}


def rollouts(model_path, settings: dict[str, dict], *, quick: bool):
    """{setting: (prompts, completions per prompt)} from paraloop's engine, seeded."""
    import anyio
    import msgspec

    from paraloop.config import EngineConfig
    from paraloop.engine import Engine
    from paraloop.messages import GenerateRequest, SamplingParams
    from paraloop.model import load_model

    model, tokenizer, _, _ = load_model(model_path)
    count = 2 if quick else PROMPTS
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        for q in QUESTIONS[:count]
    ]
    out = {}
    for s, (name, filters) in enumerate(settings.items()):
        params = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, ignore_eos=True, **filters)
        requests = [
            GenerateRequest(
                request_id=f"{s}-{i}",
                prompt_tokens=p,
                n=GROUP,
                params=msgspec.structs.replace(params, seed=100 * s + i),
            )
            for i, p in enumerate(prompts)
        ]

        async def main(requests=requests):
            engine = Engine(model, tokenizer, config=EngineConfig(), batch_size=GROUP * count, adapter=None)
            with anyio.fail_after(600):
                async with anyio.create_task_group() as tg:
                    await tg.start(engine.run)
                    results = await engine.complete_many(requests)
                    tg.cancel_scope.cancel()
            return results

        out[name] = (prompts, anyio.run(main, backend="asyncio"))
    return out


def ratio_stats(model, head, prompts, completions, *, replay: bool) -> dict:
    """Fractions of exp(learner - engine) outside [0.8, 1.25] and [0.9, 1.1], and the mean |log ratio|."""
    import mlx.core as mx
    import numpy as np

    from paraloop.envs.mock import scored_group
    from paraloop.learn.batch import collate
    from paraloop.learn.logprobs import forward_logprobs
    from paraloop.messages import RolloutBatch

    groups = [scored_group(p, c, [0.0] * len(c), temperature=1.0) for p, c in zip(prompts, completions, strict=True)]
    tb = collate(RolloutBatch(groups=groups, source="bench"))
    logs = []
    for row in range(0, tb.rows, GROUP):  # a group at a time; the chunked head holds one chunk's logits
        sl = slice(row, row + GROUP)
        kept = mx.array(tb.kept[sl]) if replay and tb.kept is not None else None
        logp, _ = forward_logprobs(
            model,
            mx.array(tb.input_ids[sl]),
            mx.array(tb.targets[sl]),
            mx.array(tb.temperature[sl]),
            with_entropy=False,
            head=head,
            positions=np.flatnonzero(tb.mask[sl]),
            kept=kept,
        )
        mx.eval(logp)
        logs.append((np.array(logp) - tb.inference_logprobs[sl])[tb.mask[sl]])
    log_ratio = np.concatenate(logs).astype(np.float64)
    ratio = np.exp(log_ratio)
    return {
        "outside_0.8_1.25": float(((ratio < 0.8) | (ratio > 1.25)).mean()),
        "outside_0.9_1.1": float(((ratio < 0.9) | (ratio > 1.1)).mean()),
        "mean_abs_log_ratio": float(np.abs(log_ratio).mean()),
        "tokens": int(ratio.size),
        "kept_median": float(np.median(tb.kept[tb.mask])) if tb.kept is not None else 0.0,
    }


def run(ctx: Context) -> list[Line]:
    from paraloop.logits_head import logits_head
    from paraloop.model import load_model

    sampled = rollouts(ctx.model_q4, SETTINGS, quick=ctx.quick)
    model, _, _, _ = load_model(ctx.model_q4)
    head = logits_head(model)
    lines = []
    floor = ratio_stats(model, head, *sampled["no filter"], replay=False)
    for name in ("top_p = 0.8", "top_k = 20"):
        with_replay = ratio_stats(model, head, *sampled[name], replay=True)
        without = ratio_stats(model, head, *sampled[name], replay=False)
        lines.append(
            Line(
                NAME,
                f"{name}: ratios outside [0.8, 1.25], replay / full vocabulary",
                with_replay["outside_0.8_1.25"],
                without["outside_0.8_1.25"],
                "",
                note=f"[0.9, 1.1]: {with_replay['outside_0.9_1.1']:.4f} with replay, {without['outside_0.9_1.1']:.4f} "
                f"without; no filter: {floor['outside_0.8_1.25']:.4f}",
                detail={"replay": with_replay, "full_vocabulary": without, "no_filter": floor},
            )
        )
    return lines
