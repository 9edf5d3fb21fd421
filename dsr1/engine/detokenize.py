"""Incremental detokenization and stop strings: one request's output text, grown a few tokens at a time.

Decoding the whole output after every token costs time quadratic in its length (R1 thinks for thousands of
tokens). As vLLM does, each step decodes only a short window: the tokens since `read` (not yet turned into
text) after the tokens [prefix, read) decoded last step, which give them their context (a tokenizer may render
a token differently at the start of a text, e.g. SentencePiece's leading space); the new text is what the
window adds to its context. A window whose text ends in U+FFFD ends inside a UTF-8 character that the next
token completes: the text before it is shown, and the window stays open until the character is complete. For
a byte-level tokenizer (R1's) the pieces join to exactly tokenizer.decode(all ids).

Stop strings are looked for only where the new text could complete one, and, with `stop_only_after`, only in
the text after the first occurrence of that marker (R1's "</think>": a stop string inside the reasoning does
not end the answer). A text that ends in the start of a stop string would lose it if the stop string came, so a
stream is shown the text without it (`shown`): what a stream has sent is never taken back.
"""

from __future__ import annotations

INCOMPLETE = "\ufffd"  # what a UTF-8 decoder makes of a character whose bytes have not all come


class Detokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...], stop_only_after: str | None):
        """tokenizer: anything with decode(ids, skip_special_tokens)."""
        self.tokenizer, self.stop, self.stop_only_after = tokenizer, stop, stop_only_after
        self.text = ""  # the output's text so far (a character still incomplete held back)
        self.prefix = self.read = 0  # output ids [prefix, read) are the window's context, [read, ...) its new tokens
        self.read_chars = 0  # len(text) of the ids before `read`
        self.answer_start = 0 if stop_only_after is None else None  # where stop strings may start; None: marker not seen

    def update(self, ids: list[int], final: bool) -> bool:
        """Take the output ids so far (the last call's and any new ones) -> whether a stop string ended the text,
        which is then cut before it. `final` (no token follows) shows an incomplete character as U+FFFD."""
        decode = self.tokenizer.decode
        context = decode(ids[self.prefix : self.read], skip_special_tokens=True)
        new = decode(ids[self.prefix :], skip_special_tokens=True)[len(context) :]
        searched = len(self.text)
        if final or not new.endswith(INCOMPLETE):
            self.text = self.text[: self.read_chars] + new
            self.prefix, self.read, self.read_chars = self.read, len(ids), len(self.text)
        else:
            self.text = self.text[: self.read_chars] + new.rstrip(INCOMPLETE)
        cut = self._find_stop(searched)
        if cut >= 0:
            self.text = self.text[:cut]
        return cut >= 0

    def shown(self) -> str:
        """The text less a tail that may begin a stop string, for a request that is still running."""
        if self.answer_start is None:
            return self.text
        start = self.answer_start
        held = max((k for stop in self.stop for k in range(1, len(stop)) if self.text.endswith(stop[:k], start)), default=0)
        return self.text[: len(self.text) - held]

    def _find_stop(self, searched: int) -> int:
        """The first stop string that text[searched:] completes, counting from answer_start -> its index or -1."""
        if self.answer_start is None:
            marker = self.stop_only_after
            at = self.text.find(marker, max(0, searched - len(marker) + 1))
            if at < 0:
                return -1
            self.answer_start = at + len(marker)
        found = (self.text.find(s, max(self.answer_start, searched - len(s) + 1)) for s in self.stop)
        return min((i for i in found if i >= 0), default=-1)
