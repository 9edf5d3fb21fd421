"""generate_until on the serving engine (dsr1/engine/engine.py): every request in one Engine, each stopped by
its own stop strings (counted only after `</think>` when the run strips the reasoning: SamplingParams'
stop_only_after), and its text cut to the answer lm-eval scores.
"""

from __future__ import annotations

from typing import Callable

from lm_eval.models.utils import postprocess_generated_text

from dsr1.engine.engine import Engine, SamplingParams

THINK_CUTOFFS = ("empty", "keep")  # a generation with no think_end_token: no answer, or all of it (lm-eval's own)


def run_requests(engine: Engine, prompts: list[list[int]], params: list[SamplingParams], on_done: Callable[[], None] = lambda: None) -> list[list[int]]:
    """Generate every prompt (row i with params[i]) in `engine` -> the generated ids per row, as
    dsr1.engine.generation.generate returns them: EOS excluded, the token that completed a stop string kept.
    on_done() runs as each row finishes. Under expert parallelism every rank calls this with the same requests
    (Engine.generate keeps the ranks in lockstep)."""
    outputs = engine.generate(prompts, params, on_output=lambda out: out.finished and on_done())
    return [out.token_ids for out in outputs]


def answer(text: str, until: list[str], think_end_token: str | None, think_cutoff: str) -> str:
    """The text lm-eval scores: after the last think_end_token (if set), cut at the first stop string. A
    generation cut off inside its reasoning (no think_end_token) has no answer ("") unless think_cutoff="keep"."""
    if think_end_token and think_end_token not in text and think_cutoff == "empty":
        return ""
    return postprocess_generated_text(text, until, think_end_token)
