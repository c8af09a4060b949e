"""Grammar-constrained decoding with llguidance: which tokens a row may sample next.

In: a grammar (llguidance's JSON form: a JSON schema or a Lark grammar, made by server/structured.py) and the
tokenizer. Out: `compile_grammar` -> an LLMatcher in its start state (or GrammarError naming what llguidance cannot
compile); per row a `RowGrammar` (its own copy of the matcher) whose `allowed(width)` is the bool mask of the next
token, and `advance(token)` the sampled token. The samplers (sampling.py, cpu_decode.py) mask the row's logits with
it before they sample, on both decode paths.

Why llguidance: its wheel needs nothing else (xgrammar needs PyTorch), it compiles JSON schemas and Lark with fuel
limits (a hostile schema runs out of fuel instead of hanging the server), and its mask costs tens of microseconds
per row (docs/agents.md has the measurements). Compiling happens on the HTTP side; the engine thread only copies
the compiled matcher and computes masks.
"""

import weakref
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.hf
import numpy as np
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

LIMITS = {
    "initial_lexer_fuel": 1_000_000,  # llguidance's defaults, stated: ~20 ms of regex analysis at most
    "step_lexer_fuel": 200_000,  # per token mask: a few ms at most
    "step_max_items": 50_000,
    "max_lexer_states": 50_000,  # ~1-2 kB each
    "max_grammar_size": 200_000,
}
JSON_OPTIONS = {"whitespace_flexible": False}  # compact JSON: no run of whitespace for a model to get lost in


class GrammarError(ValueError):
    """llguidance refused the grammar (an unsupported schema feature, a bad regex, a limit exceeded)."""


_TOKENIZERS: "weakref.WeakKeyDictionary[Any, llguidance.LLTokenizer]" = weakref.WeakKeyDictionary()


def grammar_tokenizer(tokenizer: Any) -> llguidance.LLTokenizer:
    """llguidance's view of a (mlx-lm wrapped) Hugging Face fast tokenizer, made once per tokenizer."""
    made = _TOKENIZERS.get(tokenizer)
    if made is None:
        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        eos = sorted(getattr(tokenizer, "eos_token_ids", None) or [hf.eos_token_id])
        made = _TOKENIZERS[tokenizer] = llguidance.hf.from_tokenizer(hf, eos_token=eos)
    return made


def limits() -> llguidance.LLParserLimits:
    return llguidance.LLParserLimits(**LIMITS, verbose_errors=False)


@dataclass(frozen=True)
class Grammar:
    """A compiled grammar: a matcher in its start state (rows copy it) over a vocabulary of `vocab` tokens."""

    matcher: llguidance.LLMatcher
    vocab: int


def compile_grammar(grammar: str, tokenizer: Any) -> Grammar:
    """The grammar compiled for `tokenizer`; GrammarError with llguidance's reason when it cannot be built."""
    llg_tokenizer = grammar_tokenizer(tokenizer)
    try:
        matcher = llguidance.LLMatcher(llg_tokenizer, grammar, log_level=0, limits=limits())
    except (ValueError, RuntimeError) as e:  # llguidance reports grammar errors in-band; this is for anything else
        raise GrammarError(str(e)) from None
    if not matcher.is_error():
        matcher.compute_bitmask()  # the first mask builds the lexer lazily: a schema no value satisfies fails here
    if matcher.is_error():
        reason = matcher.get_error().replace("<non-verbose/>", "").strip()
        if reason.startswith("NoExtension"):  # no token can start it: e.g. a $ref cycle with nothing in between
            reason = f"no JSON value satisfies it ({reason})"
        raise GrammarError(reason)
    return Grammar(matcher, llg_tokenizer.vocab_size)


def json_schema_grammar(schema: dict[str, Any]) -> str:
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)  # type: ignore[arg-type]
    except (ValueError, RecursionError) as e:
        raise GrammarError(str(e)) from None


def lark_grammar(lark: str) -> str:
    try:
        return llguidance.LLMatcher.grammar_from_lark(lark)
    except ValueError as e:  # e.g. a lone surrogate (JSON allows "\ud800"; UTF-8 does not)
        raise GrammarError(str(e)) from None


class RowGrammar:
    """One row's matcher. Engine thread only: `allowed` before a row samples, `advance` with what it sampled."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab: int, eos: list[int]) -> None:
        self.matcher = matcher
        self.eos = eos
        self._bits = allocate_token_bitmask(1, vocab)  # (1, words) int32, reused every step

    def allowed(self, width: int) -> np.ndarray:
        """(width,) bool: the tokens the grammar allows next (only EOS once it is complete)."""
        fill_next_token_bitmask(self.matcher, self._bits, 0)
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little").view(bool)
        if bits.shape[0] >= width:
            bits = bits[:width]
        else:  # logits wider than the vocabulary
            bits = np.concatenate([bits, np.zeros(width - bits.shape[0], bool)])
        if not bits.any():  # the matcher failed (it never should): end the row rather than sample anything
            bits[[t for t in self.eos if t < width]] = True
        return bits

    def advance(self, token: int) -> None:
        self.matcher.consume_token(int(token))  # a token the mask allowed (after an error: EOS, see `allowed`)


def row_grammars(grammar: Grammar, n: int, eos: list[int]) -> list[RowGrammar]:
    """`n` rows' own copies of a compiled matcher (copies share the compiled grammar)."""
    return [RowGrammar(grammar.matcher.deep_copy(), grammar.vocab, eos) for _ in range(n)]
