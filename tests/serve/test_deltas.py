"""Under expert parallelism a rank sends each output as what is new since that request's previous one
(dsr1/serve/distributed.py: Deltas); rank 0 joins the pieces back into exactly the engine's outputs."""

from __future__ import annotations

import random

from dsr1.engine.engine import RequestOutput, TokenLogprob
from dsr1.serve.distributed import Deltas


def outputs(seed: int) -> list[RequestOutput]:
    """Several requests' outputs over steps, interleaved, as an engine emits them: tokens, text and logprobs grow,
    prompt logprobs come with the first output, and each request ends once (stop, length or abort)."""
    rng = random.Random(seed)
    state = {f"r{i}": ([], "", []) for i in range(5)}
    out = []
    while state:
        rid = rng.choice(sorted(state))
        tokens, text, lps = state[rid]
        new = [rng.randrange(100) for _ in range(rng.choice([0, 1, 1, 2]))]
        tokens, text = tokens + new, text + "".join(chr(97 + t % 26) for t in new) + rng.choice(["", "é", "中"])
        lps = lps + [TokenLogprob(t, -rng.random(), [(t, -0.1)]) for t in new]
        done = rng.random() < 0.15
        out.append(RequestOutput(rid, [1, 2, 3], tokens, new, text, done, rng.choice(["stop", "length", "abort"]) if done else None,
                                 lps, [None, TokenLogprob(2, -1.0, [])], 0))
        if done:
            del state[rid]
        else:
            state[rid] = (tokens, text, lps)
    return out


def test_cut_then_join_gives_the_outputs_back():
    for seed in range(20):
        sent, received = Deltas(), Deltas()
        originals = outputs(seed)
        pieces = [sent.cut(o) for o in originals]
        assert sum(len(p.token_ids) for p in pieces) == sum(len(o.new_token_ids) for o in originals)  # each token crosses once
        assert all(p.prompt_token_ids == [] for p in pieces)
        joined = [received.join(p, [1, 2, 3]) for p in pieces]
        assert joined == originals
        assert not sent.seen and not received.seen  # every request finished: nothing kept
