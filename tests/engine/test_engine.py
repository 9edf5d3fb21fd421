"""The serving engine (dsr1/engine/engine.py) against generation.generate one prompt at a time: any arrival
order, mixed batches, prefix-cache hits, chunked prefill, preemption, aborts, and the errors it raises."""

from __future__ import annotations

import pytest
import torch

from dsr1 import GenerationConfig, load_model
from dsr1.engine.engine import Engine, EngineConfig, SamplingParams
from dsr1.engine.generation import generate

NO_EOS = -1
PREFIX = [0, *range(100, 112)]  # 13 tokens: three full blocks of 4
PROMPTS = [
    [0, 5, 6, 7, 8, 9, 10],
    [0, 11, 12],
    [*PREFIX, 40, 41, 42],
    [0, *range(20, 41)],  # 22 tokens
    [*PREFIX, 50],
    [0, 13],
]
MAX_TOKENS = [6, 4, 5, 7, 3, 8]


@pytest.fixture(scope="module")
def model(make_checkpoint):
    torch.set_num_threads(1)
    return load_model(make_checkpoint(), device="cpu", dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def reference(model):
    """Greedy tokens of generation.generate, one prompt at a time, for any prompt and length asked."""
    memo = {}

    def ref(prompt: list[int], n: int, eos_id: int = NO_EOS) -> list[int]:
        key = (tuple(prompt), n, eos_id)
        if key not in memo:
            memo[key] = generate(model, [prompt], GenerationConfig(n, eos_id=eos_id))[0]
        return memo[key]

    return ref


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)


def run(engine: Engine, schedule: dict[int, list[int]]) -> dict[str, object]:
    """Step the engine to the end, adding prompt i (greedy, MAX_TOKENS[i]) before step s for each i in schedule[s]
    -> final output by request id (named after the prompt's index)."""
    final, step = {}, 0
    while engine.has_unfinished_requests() or step <= max(schedule):
        for i in schedule.get(step, []):
            engine.add_request(PROMPTS[i], greedy(MAX_TOKENS[i]), request_id=str(i))
        final.update((o.request_id, o) for o in engine.step() if o.finished)
        step += 1
    return final


def assert_pool_idle(engine: Engine) -> None:
    """No block referenced or leaked: every usable block is empty or cached-free; no block pending."""
    bm = engine.blocks
    assert not any(bm.refs) and bm.n_free == bm.n_usable and not engine.scheduler.pending
    assert sorted([*bm.empty, *bm.evictable]) == list(range(1, bm.n_blocks))
    assert {bm.hash_of[b]: b for b in bm.evictable} == bm.cached


@pytest.mark.parametrize("schedule", [
    {0: [0, 1, 2, 3, 4, 5]},  # all at once
    {0: [3], 1: [0, 5], 3: [1], 4: [2, 4]},  # arriving while others prefill and decode
    {0: [5, 4, 3, 2, 1, 0]},  # reverse order
], ids=["together", "staggered", "reversed"])
def test_greedy_equals_generate_one_prompt_at_a_time(model, reference, schedule):
    engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=64, max_num_seqs=4))
    final = run(engine, schedule)
    for i, prompt in enumerate(PROMPTS):
        out = final[str(i)]
        assert out.token_ids == reference(prompt, MAX_TOKENS[i]), i
        assert out.finish_reason == "length" and out.prompt_token_ids == prompt
    assert engine.stats().finished == len(PROMPTS) and engine.stats().generated_tokens == sum(MAX_TOKENS)
    assert_pool_idle(engine)


def test_eos_stops_as_generate_does(model, reference):
    """Without ignore_eos a request stops at the model's EOS, as generate does; stopping at a chosen token that
    does occur checks that the stop fires."""
    ref = reference(PROMPTS[3], 7)
    engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=64))
    eos = model.cfg.eos_token_id
    got = engine.generate(PROMPTS, [SamplingParams(max_tokens=n) for n in MAX_TOKENS])
    assert [o.token_ids for o in got] == [reference(p, n, eos) for p, n in zip(PROMPTS, MAX_TOKENS)]
    stop = engine.generate([PROMPTS[3]], SamplingParams(max_tokens=7, stop_token_ids=(ref[4],), ignore_eos=True))[0]
    assert stop.token_ids == ref[: ref.index(ref[4])] and stop.finish_reason == "stop"


def test_prefix_hits_skip_cached_blocks_and_change_nothing(model, reference):
    engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=64))
    first = engine.generate([PROMPTS[2]], greedy(5))[0]
    later = engine.generate([PROMPTS[4], PROMPTS[2], PROMPTS[0]], [greedy(3), greedy(5), greedy(6)])
    assert first.num_cached_tokens == 0
    # PREFIX's three full blocks; the repeated prompt (16 tokens) also hits its fourth block but computes its last token
    assert [o.num_cached_tokens for o in later] == [12, 12, 0]
    assert [o.token_ids for o in [first, *later]] == [reference(PROMPTS[2], 5), reference(PROMPTS[4], 3), reference(PROMPTS[2], 5), reference(PROMPTS[0], 6)]
    stats = engine.stats()
    assert stats.cached_prompt_tokens == 24 and stats.prompt_tokens == 2 * len(PROMPTS[2]) + len(PROMPTS[4]) + len(PROMPTS[0])
    assert_pool_idle(engine)
    off = Engine(model, config=EngineConfig(block_size=4, num_blocks=64, enable_prefix_caching=False))
    off.generate([PROMPTS[2]], greedy(5))
    assert off.generate([PROMPTS[4]], greedy(3))[0].num_cached_tokens == 0 and not off.blocks.cached


def test_requests_arriving_together_compute_a_shared_prefix_once(model, reference):
    prompts = [[*PREFIX, 60 + i] for i in range(8)]  # PREFIX: three full blocks of 4, then a token of their own
    engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=64, max_num_seqs=8))
    got = engine.generate(prompts, greedy(4))
    assert [o.num_cached_tokens for o in got] == [0] + [12] * 7
    assert [o.token_ids for o in got] == [reference(p, 4) for p in prompts]
    assert_pool_idle(engine)


def test_a_request_waits_for_prefix_blocks_being_computed_and_not_for_an_aborted_request(model, reference):
    """Prefilling 4 positions a step, the first request computes the shared prefix block by block while the
    second waits for each; aborted after two blocks, it leaves those cached and the second computes the rest."""
    first, second = [*PREFIX, 40], [*PREFIX, 50]

    def started(abort_after: int | None) -> tuple[Engine, list[int]]:
        """Both requests added, the first aborted after abort_after steps -> the engine after 4 steps, and
        how many requests ran in each."""
        engine, running = Engine(model, config=EngineConfig(block_size=4, num_blocks=64, max_num_batched_tokens=4)), []
        engine.add_request(first, greedy(3), request_id="first")
        engine.add_request(second, greedy(3), request_id="second")
        for step in range(4):
            if step == abort_after:
                engine.abort_request("first")
            engine.step()
            running.append(engine.stats().running)
        return engine, running

    def finish(engine: Engine) -> dict[str, object]:
        final = {}
        while engine.has_unfinished_requests():
            final.update((o.request_id, o) for o in engine.step())
        assert_pool_idle(engine)
        return final

    engine, running = started(None)
    assert running == [1, 1, 1, 2]  # the first's 14 prompt positions: 4, 4, 4, then 2 with the second's last 2
    final = finish(engine)
    assert [final[r].num_cached_tokens for r in ("first", "second")] == [0, 12]
    assert [final[r].token_ids for r in ("first", "second")] == [reference(first, 3), reference(second, 3)]
    engine, running = started(2)
    assert running == [1, 1, 1, 1]
    final = finish(engine)
    assert final["second"].num_cached_tokens == 8 and final["second"].token_ids == reference(second, 3)


def test_chunked_prefill_keeps_to_the_token_budget(model, reference):
    engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=64, max_num_batched_tokens=5))
    schedule, per_step = engine.scheduler.schedule, []

    def recorded():
        plan = schedule()
        per_step.append(sum(n for _, n in plan.prefill))
        return plan

    engine.scheduler.schedule = recorded
    got = engine.generate(PROMPTS, [greedy(n) for n in MAX_TOKENS])
    assert [o.token_ids for o in got] == [reference(p, n) for p, n in zip(PROMPTS, MAX_TOKENS)]
    # every prompt position not from the prefix cache, but maybe the last (a decode row when a chunk leaves one),
    # went through prefill rows
    assert max(per_step) == 5 and sum(per_step) >= sum(len(p) - 1 - o.num_cached_tokens for p, o in zip(PROMPTS, got))


def test_decode_steps_admit_requests_in_batches(model, reference):
    """With admit_batch=2 and two sequences at most, a step whose rows only decode admits waiting requests only
    when two slots are free (or one request waits), so prefill forwards come in pairs; the tokens are the same."""
    engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=64, max_num_seqs=2, admit_batch=2))
    schedule, admissions = engine.scheduler.schedule, []

    def recorded():
        running, waiting = len(engine.scheduler.running), len(engine.scheduler.waiting)
        plan = schedule()
        decoding = [req for req in plan.decode if req.num_computed > len(req.prompt_token_ids)]  # running before this step
        admitted = len(engine.scheduler.running) - running
        admissions.append((bool(decoding), 2 - running, waiting, admitted))
        return plan

    engine.scheduler.schedule = recorded
    got = engine.generate(PROMPTS, [greedy(n) for n in MAX_TOKENS])
    assert [o.token_ids for o in got] == [reference(p, n) for p, n in zip(PROMPTS, MAX_TOKENS)]
    for decoding, free, waiting, admitted in admissions:
        if decoding and admitted:
            assert free >= min(2, waiting), (free, waiting, admitted)
    assert any(decoding and free == 1 and waiting >= 2 and not admitted for decoding, free, waiting, admitted in admissions), "a slot was never held back"


def test_preemption_recomputes_and_gives_the_same_tokens(model, reference):
    """Seven blocks of 4 positions for six requests of 7-22 prompt tokens: requests are preempted (and later
    recomputed, partly from their own cached blocks) instead of running out of memory."""
    engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=9, max_num_batched_tokens=8))
    got = engine.generate(PROMPTS, [greedy(n) for n in MAX_TOKENS])
    assert engine.stats().preemptions > 0
    assert [o.token_ids for o in got] == [reference(p, n) for p, n in zip(PROMPTS, MAX_TOKENS)]
    assert_pool_idle(engine)


def test_abort_frees_blocks_and_reports_once(model, reference):
    engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=64))
    for i in (0, 3, 1):
        engine.add_request(PROMPTS[i], greedy(MAX_TOKENS[i]), request_id=str(i))
    engine.step()
    engine.step()
    engine.abort_request("3")
    engine.abort_request("unknown")  # ignored
    outs = engine.step()
    aborted = [o for o in outs if o.request_id == "3"]
    assert len(aborted) == 1 and aborted[0].finish_reason == "abort" and aborted[0].finished
    final = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            assert o.request_id != "3"
            final[o.request_id] = o
    assert final["0"].token_ids == reference(PROMPTS[0], 6) and final["1"].token_ids == reference(PROMPTS[1], 4)
    assert_pool_idle(engine)


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(logprobs=-1), "logprobs"),
    (dict(prompt_logprobs=-2), "prompt_logprobs"),
    (dict(stop=("",)), "stop"),
    (dict(stop_token_ids=(-3,)), "stop_token_ids"),
    (dict(stop_only_after=""), "stop_only_after"),
])
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field} must be .*, found"):
        SamplingParams(**kwargs)


def test_requests_that_cannot_run_are_refused(make_checkpoint, model):
    engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=9, max_model_len=40))
    with pytest.raises(ValueError, match=r"prompt_token_ids has 30 tokens; with max_tokens=11 .* 41 positions, beyond max_model_len=40"):
        engine.add_request([0] * 30, greedy(11))
    with pytest.raises(ValueError, match=r"needs 9 cache blocks, but the pool has 8 \(EngineConfig.num_blocks\)"):
        engine.add_request([0] * 30, greedy(6))
    with pytest.raises(ValueError, match=r"prompt_token_ids must be a non-empty list"):
        engine.add_request([], greedy(2))
    with pytest.raises(ValueError, match=r"prompt_token_ids must be .* in \[0, 129280\)"):
        engine.add_request([0, 129280], greedy(2))
    with pytest.raises(ValueError, match=r"stop=\('x',\) needs the engine to have a tokenizer"):
        engine.add_request([0, 5], SamplingParams(stop=("x",)))
    engine.add_request([0] * 30, greedy(2), request_id="a")
    with pytest.raises(ValueError, match=r"request_id 'a' is already in use"):
        engine.add_request([0, 5], greedy(2), request_id="a")
    with pytest.raises(ValueError, match=r"EngineConfig.max_num_seqs must be >= 1, found 0"):
        EngineConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match=r"max_model_len=5000 exceeds the model's max_seq_len=4096"):
        Engine(model, config=EngineConfig(max_model_len=5000, num_blocks=4))
    naive = load_model(make_checkpoint(), device="cpu", dtype=torch.float32, attn_impl="naive", progress=False)
    with pytest.raises(ValueError, match=r"build the model with attn_impl='absorb', not 'naive'"):
        Engine(naive, config=EngineConfig(num_blocks=4))
