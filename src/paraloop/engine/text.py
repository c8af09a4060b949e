"""Turn one row's tokens into text as they arrive, and cut it at stop strings.

In: token ids one at a time (the row's prompt tail as context), the request's stop strings. Out: the text each
token adds. A stop string is matched on decoded text, so it is found however the tokenizer splits it; text that
might be the start of a stop string is held back until the next tokens settle it, and the stop string itself is
never returned.

The detokenizer decodes a short window of tokens (vLLM's incremental scheme) rather than using mlx-lm's streaming
detokenizers: those drop the first token's leading space, so a completion's text would not equal
decode(prompt + completion) minus decode(prompt).
"""

from typing import Any

CONTEXT_TOKENS = 4  # prompt tokens decoded ahead of the completion so the first word's spacing comes out right


class IncrementalDetokenizer:
    """Text of a growing token list, one delta per added token ("" while a multi-byte character is pending)."""

    def __init__(self, tokenizer: Any, prompt_tail: list[int]) -> None:
        self._decode = tokenizer.decode
        self._tokens = list(prompt_tail[-CONTEXT_TOKENS:])
        self._prefix = 0  # window start
        self._read = len(self._tokens)  # tokens before this are already returned as text

    def _text(self, start: int, end: int) -> str:
        return self._decode(self._tokens[start:end], skip_special_tokens=True)

    def add(self, token: int) -> str:
        self._tokens.append(token)
        prefix_text = self._text(self._prefix, self._read)
        new_text = self._text(self._prefix, len(self._tokens))
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence (or a token without text): wait for more
        self._prefix, self._read = self._read, len(self._tokens)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Whatever is still pending (an incomplete character decodes to U+FFFD)."""
        prefix_text = self._text(self._prefix, self._read)
        new_text = self._text(self._prefix, len(self._tokens))
        self._prefix = self._read = len(self._tokens)
        return new_text[len(prefix_text) :]


class StopStrings:
    """Releases text up to a stop string; `stopped` turns True once one is seen."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add text; return what can be released now (never part of a stop string)."""
        if not self._stops:
            return text
        buf = self._pending + text
        hits = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            self._pending = ""
            return buf[: min(hits)]
        hold = self._held(buf)
        self._pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        """The held-back text, once the row ends for another reason (it did not complete a stop string)."""
        out, self._pending = self._pending, ""
        return out

    def _held(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:k]):
                    best = k
                    break
        return best
