"""The engine under expert parallelism (2 gloo ranks, torch dispatcher): each rank serves its own requests, the
ranks run the same forwards in every step (a rank with nothing to run feeds empty batches), and the greedy
tokens equal the single-process engine's in fp32."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from tests.parallel.ep_spawn import run_ranks

import dsr1
from dsr1 import ParallelConfig
from dsr1.engine.engine import Engine, EngineConfig, SamplingParams

# Rank 1's long prompt prefills in chunks while rank 0 decodes; then rank 1 is idle while rank 0 goes on.
PROMPTS = {0: [[0, 5, 6, 7, 8, 9, 10], [0, 11, 12]], 1: [[0, *range(20, 42)]]}
MAX_TOKENS = {0: [8, 6], 1: [2]}
CONFIG = EngineConfig(block_size=4, num_blocks=64, max_num_batched_tokens=5)


def params(rank: int) -> list[SamplingParams]:
    return [SamplingParams(max_tokens=n, ignore_eos=True) for n in MAX_TOKENS[rank]]


def worker(rank: int, world: int, ckpt: str, out_dir: str) -> None:
    parallel = ParallelConfig(world, "round_robin", "torch", max_dispatch_tokens=4)
    model = dsr1.load_model(ckpt, device="cpu", dtype=torch.float32, progress=False, parallel=parallel, rank=rank)
    forwards = []
    model.embed.register_forward_hook(lambda *_: forwards.append(1))  # once per forward
    engine = Engine(model, config=CONFIG, group=dist.group.WORLD)
    outs = engine.generate(PROMPTS[rank], params(rank))
    Path(out_dir, f"{rank}.json").write_text(json.dumps({"tokens": [o.token_ids for o in outs], "forwards": len(forwards)}))


def test_ep_engine_equals_one_process(make_checkpoint, tmp_path):
    ckpt = make_checkpoint({"vocab_size": 1024}, dtype="bf16")  # a small vocabulary: the test is about lockstep
    run_ranks(worker, 2, str(ckpt), str(tmp_path))
    single = Engine(dsr1.load_model(ckpt, device="cpu", dtype=torch.float32, progress=False), config=CONFIG)
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    for rank, got in enumerate((r0, r1)):
        assert got["tokens"] == [o.token_ids for o in single.generate(PROMPTS[rank], params(rank))], rank
    assert r0["forwards"] == r1["forwards"] > 8  # lockstep, with rank 1 feeding empty batches at the end
