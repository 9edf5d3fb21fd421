"""The static path's stopping rule, the oracle of the engine's stop strings in the lm-eval tests: should_stop for
dsr1.engine.generation.generate, which stops a row once its text holds a stop string (after think_end_token,
when given)."""

from __future__ import annotations

from dsr1.tokenizer import decode


class StopStrings:
    """should_stop(row, ids) for generation.generate: a row stops once its text holds any stop string.

    Only a tail of the generated ids is decoded each step (long enough to hold the longest stop string
    at one byte per token). With think_end_token, stop strings count only after it: the reasoning
    before it is dropped before scoring and may contain them.
    """

    def __init__(self, tokenizer, until: list[str], think_end_token: str | None):
        self.tokenizer, self.until, self.think_end_token = tokenizer, [s for s in until if s], think_end_token
        self.window = 4 * max(map(len, [*self.until, think_end_token or ""]), default=1) + 2
        self.answer_start: dict[int, int] = {}  # row -> index of its first token after think_end_token

    def __call__(self, row: int, ids: list[int]) -> bool:
        if self.think_end_token and row not in self.answer_start:
            if self.think_end_token in decode(self.tokenizer, ids[-self.window :]):
                self.answer_start[row] = len(ids)
            return False
        tail = decode(self.tokenizer, ids[max(self.answer_start.get(row, 0), len(ids) - self.window) :])
        return any(s in tail for s in self.until)
