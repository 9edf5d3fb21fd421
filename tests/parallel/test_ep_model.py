"""Sharded = unsharded: the tiny model on 2 gloo ranks (TorchDispatcher, both placements) gives the
logits of one process holding every expert, with uneven batches, an idle rank and several chunks."""

import pytest
import torch
from tests.parallel.ep_spawn import run_ranks

import dsr1
from dsr1 import ParallelConfig

MAX_TOKENS = 4  # small, so a rank's 12 tokens take 3 dispatch rounds

# Per step, each rank's batch shape [b, s]: rank 1 is idle in the second step.
STEPS = [((2, 6), (1, 5)), ((1, 3), (0, 3))]


def tokens(step: int, rank: int) -> torch.Tensor:
    b, s = STEPS[step][rank]
    return torch.randint(2, 1024, (b, s), generator=torch.Generator().manual_seed(10 * step + rank))


def worker(rank: int, world: int, ckpt: str, strategy: str, out_dir: str) -> None:
    parallel = ParallelConfig(world, strategy, "torch", max_dispatch_tokens=MAX_TOKENS)
    model = dsr1.load_model(ckpt, device="cpu", dtype=torch.float32, progress=False, parallel=parallel, rank=rank)
    with torch.no_grad():
        torch.save([model(tokens(step, rank)) for step in range(len(STEPS))], f"{out_dir}/rank{rank}.pt")


@pytest.mark.parametrize("strategy", ["linear", "round_robin"])
def test_ep2_logits_equal_single_process(make_checkpoint, tmp_path, strategy):
    ckpt = make_checkpoint({"vocab_size": 1024}, dtype="bf16")  # a small vocab: the test is about the MoE layers
    run_ranks(worker, 2, str(ckpt), strategy, str(tmp_path))
    single = dsr1.load_model(ckpt, device="cpu", dtype=torch.float32, progress=False)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for step in range(len(STEPS)):
            with torch.no_grad():
                want = single(tokens(step, rank))
            torch.testing.assert_close(got[step], want, rtol=1e-4, atol=1e-4)
