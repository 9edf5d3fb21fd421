"""The engine's block accounting: the paged cache's reads and writes, the block manager's prefix cache and LRU
eviction, and 1,000 random requests (some aborted) through a small pool with a stand-in model runner, checking
the reference counts after every step and that nothing leaks."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from dsr1 import load_model
from dsr1.engine.blocks import SCRATCH, BlockManager, block_hash
from dsr1.engine.engine import Engine, EngineConfig, SamplingParams
from dsr1.engine.paged import PagedLatentCache, layout
from dsr1.engine.runner import RowLogits
from dsr1.model.attention import LatentCache

VOCAB = 6  # the stand-in runner's logits: small, so EOS (id 1) and repeated prefixes are common


def test_paged_store_equals_contiguous_and_padding_stays_in_scratch():
    size, width = 4, 5
    pool = torch.zeros(10, size, width)  # [N, B, c + r]
    tables = [[3, 7, 1], [5, 2]]  # row 0 may hold 12 positions, row 1 8
    contiguous = LatentCache(torch.zeros(2, 12, width))
    gen = torch.Generator().manual_seed(0)
    for starts, lengths in [([0, 0], [9, 4]), ([9, 4], [1, 3])]:  # a padded prefill of both rows, then a chunk of each
        where = layout(starts, lengths, tables, size, torch.device("cpu"))
        new = torch.randn(2, max(lengths), width, generator=gen)  # [b, s, c + r], padding included
        got = PagedLatentCache(pool, where.block_table, where.slots).store(where.positions, new, where.n_keys)
        assert got.shape == (2, where.n_keys, width) and where.n_keys == max(a + n for a, n in zip(starts, lengths))
        for i, (a, n) in enumerate(zip(starts, lengths)):
            contiguous.keys[i, a : a + n] = new[i, :n]  # only the real positions are written
            assert where.positions[i].tolist() == [a + min(j, n - 1) for j in range(max(lengths))]
            torch.testing.assert_close(got[i, : a + n], contiguous.keys[i, : a + n], rtol=0, atol=0)
    untouched = [b for b in range(10) if b not in {SCRATCH, *tables[0], *tables[1]}]
    assert pool[SCRATCH].any() and not pool[untouched].any()  # padding wrote to the scratch block only
    assert not pool[1, 2:].any() and not pool[2, 3:].any()  # nor past a row's last position in its own blocks


def fill(bm: BlockManager, blocks: list[int], tokens: list[int]) -> None:
    """Register `blocks` as computed full blocks holding `tokens`, as the scheduler does."""
    key = None
    for i, block in enumerate(blocks):
        piece = tuple(tokens[i * bm.block_size : (i + 1) * bm.block_size])
        key = block_hash(key, piece)
        bm.register(block, key, piece)


def test_block_manager_reuses_prefixes_and_evicts_least_recently_freed():
    bm = BlockManager(6, 2)  # 5 usable blocks of 2 positions
    a, b = bm.allocate(2), bm.allocate(2)
    fill(bm, a, [7, 8, 9, 10])
    fill(bm, b, [7, 8, 3, 4])  # b[0] holds what a[0] holds: not keyed again
    assert bm.match([7, 8, 9, 10, 11])[0] == a and bm.match([7, 8, 9, 10])[0] == a[:1]  # the last token is computed
    assert bm.match([7, 8, 3, 4, 0])[0] == [a[0], b[1]] and bm.match([8, 7, 9, 10, 1])[0] == []
    bm.release(a)
    bm.release(b)
    assert bm.n_free == 5 and list(bm.evictable) == [a[1], a[0], b[1]] and b[0] in bm.empty
    hit, _ = bm.match([7, 8, 9, 10, 1])
    assert bm.n_reviving(hit) == 2
    bm.acquire(hit)
    assert bm.refs[a[0]] == bm.refs[a[1]] == 1 and bm.n_free == 3
    bm.release(hit)
    assert list(bm.evictable) == [b[1], a[1], a[0]]  # a sequence's last block goes first: its prefix stays longest
    fresh = bm.allocate(3)  # the two empty blocks, then the least recently freed cached one
    assert fresh[2] == b[1] and set(fresh[:2]) == set(range(1, 6)) - {*a, *b} | {b[0]}
    assert bm.match([7, 8, 3, 4, 0])[0] == [a[0]] and bm.match([7, 8, 9, 10, 1])[0] == a


class StandInRunner:
    """The model runner's interface with random logits: the test is about the bookkeeping, not the model."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)

    def run(self, decode, prefill):
        return [[self.row(len(r.logits_at)) for r in rows] for rows in (decode, prefill)]

    def row(self, k: int) -> RowLogits:
        logits = torch.randn(k, VOCAB, generator=self.gen)
        return RowLogits(logits, logits.argmax(-1).tolist())

    def anywhere(self, flag: bool) -> bool:
        return flag


def check_blocks(engine: Engine) -> None:
    """References are exactly the running requests' tables; waiting requests hold nothing; counts add up."""
    bm, s = engine.blocks, engine.scheduler
    held = Counter(b for r in s.running for b in r.block_table)
    assert held == Counter({b: n for b, n in enumerate(bm.refs) if n})
    assert SCRATCH not in held and all(not r.block_table and r.num_computed == 0 for r in s.waiting)
    assert all(len(r.block_table) >= bm.blocks_for(r.num_computed) for r in s.running)
    assert bm.n_free + len(held) == bm.n_usable and len(s.running) <= engine.config.max_num_seqs
    assert all(owner in s.running for owner in s.pending.values())


@pytest.fixture(scope="module")
def model(make_checkpoint):
    return load_model(make_checkpoint(), device="cpu", dtype=torch.float32, progress=False)


def test_a_thousand_random_requests_leak_no_block(model):
    engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=24, max_num_seqs=8, max_num_batched_tokens=16))
    engine.runner = StandInRunner(0)
    rng = random.Random(0)
    prefixes = [[0, *rng.choices(range(2, VOCAB), k=12)] for _ in range(4)]
    pending = list(range(1000))
    finished, aborted = set(), set()
    while pending or engine.has_unfinished_requests():
        for _ in range(rng.randint(0, 4) if pending else 0):
            i = pending.pop()
            prompt = rng.choice(prefixes)[: rng.randint(1, 13)] + rng.choices(range(2, VOCAB), k=rng.randint(0, 20))
            params = SamplingParams(max_tokens=rng.randint(1, 20), temperature=rng.choice([0.0, 1.0]), seed=i,
                                    ignore_eos=rng.random() < 0.5, logprobs=rng.choice([None, 2]))
            engine.add_request(prompt, params, request_id=str(i))
        if engine.requests and rng.random() < 0.05:
            victim = rng.choice(list(engine.requests))
            engine.abort_request(victim)
            aborted.add(victim)
        for out in engine.step():
            assert out.request_id not in finished
            if out.finished:
                finished.add(out.request_id)
                assert (out.finish_reason == "abort") == (out.request_id in aborted)
                assert len(out.token_ids) <= 20
        check_blocks(engine)
    stats = engine.stats()
    assert len(finished) == stats.finished + len(aborted) == 1000 and 0 < len(aborted) < 100
    assert stats.preemptions > 0 and stats.cached_prompt_tokens > 0 and stats.used_blocks == 0 and not engine.scheduler.pending
    bm = engine.blocks
    assert not any(bm.refs) and bm.n_free == bm.n_usable
    assert sorted([*bm.empty, *bm.evictable]) == list(range(1, bm.n_blocks))
    assert {bm.hash_of[b]: b for b in bm.evictable} == bm.cached
