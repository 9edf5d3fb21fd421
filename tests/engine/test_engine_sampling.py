"""Per-request sampling in the engine: seeded draws independent of the batch, top-k, stop strings, and logprobs
equal to log_softmax of one full forward's logits."""

from __future__ import annotations

import pytest
import torch

from dsr1 import load_model
from dsr1.engine.engine import Engine, EngineConfig, SamplingParams

PROMPTS = [[0, 5, 6, 7, 8, 9, 10], [0, 11, 12], [0, *range(20, 41)], [0, 13, 14, 15, 16]]
CONFIG = EngineConfig(block_size=4, num_blocks=64)


class AngleTokenizer:
    """Each id decodes to "<id>": stop strings can be built from known tokens and match only whole ones."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f"<{i}>" for i in ids)


@pytest.fixture(scope="module")
def model(make_checkpoint):
    torch.set_num_threads(1)
    return load_model(make_checkpoint(), device="cpu", dtype=torch.float32, progress=False)


def test_seeded_requests_ignore_the_batch_mix(model):
    seeded = SamplingParams(max_tokens=6, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    alone = Engine(model, config=CONFIG).generate([PROMPTS[0]], seeded)[0].token_ids
    others = [SamplingParams(max_tokens=4, temperature=0.8, seed=s, ignore_eos=True) for s in (1, 2, 3)]
    mixed = Engine(model, config=CONFIG).generate([PROMPTS[2], PROMPTS[1], PROMPTS[0], PROMPTS[3]], [others[0], others[1], seeded, others[2]])
    assert mixed[2].token_ids == alone
    other_seed = Engine(model, config=CONFIG).generate([PROMPTS[0]], SamplingParams(max_tokens=6, temperature=1.0, top_p=0.9, seed=8, ignore_eos=True))
    assert other_seed[0].token_ids != alone  # the draws do depend on the seed


def test_top_k_one_is_greedy(model):
    engine = Engine(model, config=CONFIG)
    greedy = engine.generate(PROMPTS, SamplingParams(max_tokens=5, ignore_eos=True))
    top1 = engine.generate(PROMPTS, SamplingParams(max_tokens=5, temperature=2.0, top_k=1, seed=0, ignore_eos=True))
    assert [o.token_ids for o in top1] == [o.token_ids for o in greedy]
    wide = engine.generate(PROMPTS, SamplingParams(max_tokens=5, temperature=2.0, top_k=50, seed=0, ignore_eos=True))
    assert [o.token_ids for o in wide] != [o.token_ids for o in greedy]


def test_stop_strings_are_trimmed_from_the_text(model):
    engine = Engine(model, AngleTokenizer(), config=CONFIG)
    ref = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert ref.text == AngleTokenizer().decode(ref.token_ids) and ref.finish_reason == "length"
    decode = AngleTokenizer().decode
    stop = f"{ref.token_ids[3]}><{ref.token_ids[4]}"  # spans two tokens: matched on the text, not on ids
    m = next(j for j in range(1, 9) if stop in decode(ref.token_ids[:j]))  # the token that completes it
    out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=8, stop=("never", stop), ignore_eos=True))[0]
    assert m < 8 and out.finish_reason == "stop" and out.token_ids == ref.token_ids[:m]
    assert out.text == ref.text[: ref.text.find(stop)]


def full_forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)  # [s, v]


@pytest.mark.parametrize("config", [CONFIG, EngineConfig(block_size=4, num_blocks=64, max_num_batched_tokens=6)], ids=["one-chunk", "chunked"])
def test_logprobs_equal_log_softmax_of_a_full_forward(model, config):
    engine = Engine(model, config=config)
    engine.generate([PROMPTS[2][:13]], SamplingParams(max_tokens=2))  # caches the prompt's first blocks
    params = SamplingParams(max_tokens=5, logprobs=3, prompt_logprobs=2, ignore_eos=True)
    out, other = engine.generate([PROMPTS[2], PROMPTS[1]], [params, SamplingParams(max_tokens=3, ignore_eos=True)])
    assert out.num_cached_tokens == 0  # prompt logprobs need every prompt position's logits: no prefix hit
    assert other.logprobs is None and other.prompt_logprobs is None
    ids = PROMPTS[2] + out.token_ids
    want = full_forward_logprobs(model, ids)  # [s, v]
    n = len(PROMPTS[2])
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == n and len(out.logprobs) == 5
    scored = out.prompt_logprobs[1:] + out.logprobs  # position p's logits score token p + 1
    for p, entry in enumerate(scored):
        assert entry.token_id == ids[p + 1]
        torch.testing.assert_close(entry.logprob, float(want[p, ids[p + 1]]), rtol=1e-4, atol=1e-4)
        top = want[p].topk(2 if p < n - 1 else 3)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        torch.testing.assert_close([lp for _, lp in entry.top], top.values.tolist(), rtol=1e-4, atol=1e-4)
