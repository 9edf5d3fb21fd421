"""Per-request sampling for the serving engine: the parameters a request carries, the draw of its next token,
and the logprobs it asked for.

Each request samples with its own torch.Generator (seeded from its `seed`), so its tokens depend on its own
logits and seed only, never on which other requests share the batch.

b rows, v vocabulary, n positions
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from dsr1.engine.generation import sample


@dataclass
class SamplingParams:
    """How one request is sampled and when it stops (the OpenAI API's fields)."""

    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings, not included in the returned text
    # Stop strings count only in the text after this marker's first occurrence, e.g. R1's "</think>", so that one
    # inside the reasoning does not end the answer (None: anywhere). Stop token ids are not affected.
    stop_only_after: str | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; N >= 0: the chosen token's logprob and the top N
    prompt_logprobs: int | None = None  # the same for prompt tokens (the first prompt token gets None)

    def __post_init__(self):
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)  # OpenAI's `stop` may be one string
        self.stop_token_ids = tuple(self.stop_token_ids)
        _check(self.max_tokens >= 1, "max_tokens", "an integer >= 1", self.max_tokens)
        _check(math.isfinite(self.temperature) and self.temperature >= 0, "temperature", "a number >= 0 (0 = greedy)", self.temperature)
        _check(0 < self.top_p <= 1, "top_p", "a number in (0, 1]", self.top_p)
        _check(self.top_k >= 0, "top_k", "an integer >= 0 (0 = off)", self.top_k)
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings", self.stop)
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", "token ids >= 0", self.stop_token_ids)
        _check(self.stop_only_after is None or (isinstance(self.stop_only_after, str) and self.stop_only_after), "stop_only_after", "None or a non-empty string", self.stop_only_after)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or value >= 0, name, "None or an integer >= 0", value)


@dataclass
class TokenLogprob:
    """One position's chosen (or prompt) token with its logprob under the model, and the top N alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token_id, logprob), best first, N entries


def new_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The request's own generator when it is seeded (None: the global one; greedy requests draw nothing)."""
    return None if params.seed is None else torch.Generator(device).manual_seed(params.seed)


def choose(logits: Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    """logits [v] of one request -> its next token: argmax at temperature 0 (generation.sample's greedy), else a
    draw from the top-k tokens' top-p nucleus at the request's temperature."""
    logits = logits.unsqueeze(0)  # [1, v]
    if params.top_k and params.temperature > 0 and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]  # [1, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(sample(logits, params.temperature, params.top_p, gen)[0])


def logprobs_of(logits: Tensor, token_ids: Tensor, top_n: int) -> list[TokenLogprob]:
    """logits [n, v] and the token each position is scored for, token_ids [n] -> one TokenLogprob per position:
    log_softmax of the raw logits (before temperature, top-k and top-p), as the OpenAI API reports them."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [n, v]
    chosen = logprobs.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1).tolist()  # [n]
    top_values, top_ids = logprobs.topk(top_n, dim=-1)  # [n, N]
    return [
        TokenLogprob(int(t), lp, list(zip(ids, values)))
        for t, lp, ids, values in zip(token_ids.tolist(), chosen, top_ids.tolist(), top_values.tolist())
    ]


def _check(ok: bool, field: str, expected: str, found) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{field} must be {expected}, found {found!r}")
