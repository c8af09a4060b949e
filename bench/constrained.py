"""Constrained decoding: tokens/s of 32 streams sampling within a JSON-schema grammar over 32 free streams.

In this process: the Engine on SmolLM2 (decode_step.py's loop, given the grammar) decodes 32 rows past ~40-token
chat prompts at temperature 1.0, once free (EOS off) and once with `response_format`'s grammar (engine/grammar.py: a
JSON object
whose one string property must be 2,000-4,000 characters long, so no row ends early), alternating, on both decode
paths (`engine.decode = "cpu"` and `"mlx-lm"`). A step is the median time between two consecutive tokens of one row
after the prefill. Lines: constrained tokens/s over free tokens/s per path (target >= 0.85). The constrained rows
each have their own sampler (their own grammar state), the free rows share one (unseeded), as HTTP requests do.
"""

import statistics

from bench.decode_step import ROWS, engine_steps
from bench.harness import Context, Line

NAME = "constrained"
TITLE = "14. Constrained decoding (JSON schema) at 32 streams over free decoding"
BUDGET_S = 240
SCHEMA = {
    "type": "object",
    "properties": {"story": {"type": "string", "minLength": 2000, "maxLength": 4000}},
    "required": ["story"],
    "additionalProperties": False,
}


def run(ctx: Context) -> list[Line]:
    from paraloop.engine.grammar import compile_grammar, json_schema_grammar
    from paraloop.model import load_model

    model, tokenizer, _, _ = load_model(ctx.model_q4)
    grammar = compile_grammar(json_schema_grammar(SCHEMA), tokenizer)
    steps = 12 if ctx.quick else 40
    rounds = 1 if ctx.quick else 2
    step: dict[tuple[str, bool], list[float]] = {(d, c): [] for d in ("cpu", "mlx-lm") for c in (False, True)}
    for _ in range(rounds):
        for decode, constrained in step:  # alternating: a slower stretch of the machine hits both kinds
            got, _ = engine_steps(
                model,
                tokenizer,
                decode=decode,
                grammar=grammar if constrained else None,
                steps=steps,
                prompt="Tell a long story about topic {i}.",
            )
            step[(decode, constrained)].append(statistics.median(got))
    best = {k: min(v) for k, v in step.items()}
    detail = {f"{d}/{'constrained' if c else 'free'}": v for (d, c), v in step.items()} | {"rows": ROWS}
    return [
        Line(
            NAME,
            f"constrained tokens/s over free, engine.decode = {d} ({ROWS} streams)",
            ROWS / best[(d, True)],
            ROWS / best[(d, False)],
            "tok/s",
            ">= 0.85",
            "min step of the rounds",
            detail,
        )
        for d in ("cpu", "mlx-lm")
    ]
