"""generate_until's stopping on the engine (dsr1/eval/until.py): with strip_thinking, a stop string inside the
reasoning does not end the generation and one after `</think>` does, as StopStrings stops the static path."""

from __future__ import annotations

import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from dsr1 import GenerationConfig  # noqa: E402
from dsr1.engine.generation import generate  # noqa: E402
from dsr1.eval import lm_eval as adapter  # noqa: E402
from dsr1.eval.lm_eval import DSR1LM  # noqa: E402
from dsr1.eval.until import run_requests  # noqa: E402
from tests.eval.static_stops import StopStrings  # noqa: E402

CONTEXT = "The capital of France is"


def test_stop_strings_count_only_after_the_think_end(make_checkpoint, monkeypatch):
    lm = DSR1LM(ckpt_path=str(make_checkpoint()), device="cpu", dtype="float32", max_length=128, batch_size=2)
    prompt = lm.tok_encode(CONTEXT)
    ids = generate(lm.model, [prompt], GenerationConfig(12, eos_id=-1))[0]
    full = lm.tok_decode(ids)
    think_end, early, late = lm.tok_decode(ids[5:7]), lm.tok_decode(ids[1:3]), lm.tok_decode(ids[9:11])
    answer_start = full.index(think_end) + len(think_end)
    assert full.index(think_end) >= len(lm.tok_decode(ids[:5])) and early not in full[answer_start:]  # early: only in the reasoning
    assert full.index(late, answer_start) >= len(lm.tok_decode(ids[:9]))
    monkeypatch.setattr(lm, "think_end_token", think_end)
    lengths = []
    monkeypatch.setattr(adapter, "run_requests", lambda *a: [lengths.append(len(o)) or o for o in run_requests(*a)])
    args = [(CONTEXT, {"until": [early], "max_gen_toks": 12}), (CONTEXT, {"until": [early, late], "max_gen_toks": 12})]
    got = lm.generate_until([Instance(request_type="generate_until", doc={}, arguments=a, idx=i) for i, a in enumerate(args)])
    assert got == [full[answer_start:].lstrip(), full[answer_start : full.index(late, answer_start)].lstrip()]
    static = [len(generate(lm.model, [prompt], GenerationConfig(12, eos_id=-1), should_stop=StopStrings(lm.tokenizer, stops, think_end))[0])
              for stops in ([early], [early, late])]
    assert lengths == static == [12, 11]
