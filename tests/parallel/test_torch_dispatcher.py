"""TorchDispatcher on gloo process groups of 2 and 4 CPU processes, checked against a direct computation.

Each world size is spawned once (module fixture); the workers run every case and save what they saw,
and the tests recompute the expected receive layout and combine from all ranks' inputs.
"""

from dataclasses import dataclass

import pytest
import torch
from tests.parallel.ep_spawn import run_ranks

from dsr1.engine.load import make_dispatcher
from dsr1.parallel.dispatch import TorchDispatcher
from dsr1.parallel.placement import expert_placement

DIM = 16


@dataclass(frozen=True)
class Case:
    n_experts: int
    strategy: str
    top_k: int
    max_tokens: int
    n_tokens: tuple[int, ...]  # per rank: includes an idle rank and one needing several chunks
    dtype: torch.dtype = torch.float32
    drop_every: int = 0  # set every n-th token's first id to -1 (skipped, as DeepEP does)


CASES = {
    2: {
        "rr": Case(8, "round_robin", 3, 4, (0, 11), drop_every=5),
        "linear_bf16": Case(8, "linear", 2, 4, (6, 3), torch.bfloat16),
    },
    4: {
        "rr": Case(8, "round_robin", 3, 4, (5, 0, 9, 3)),
        "linear": Case(16, "linear", 4, 8, (8, 17, 1, 0)),
    },
}


def inputs(case: Case, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank `rank`'s tokens x [n, DIM], distinct global expert ids [n, k], router weights [n, k] fp32."""
    g = torch.Generator().manual_seed(100 + rank)
    n = case.n_tokens[rank]
    x = torch.randn(n, DIM, generator=g).to(case.dtype)
    ids = torch.rand(n, case.n_experts, generator=g).argsort(1)[:, : case.top_k]
    if case.drop_every:
        ids[:: case.drop_every, 0] = -1
    return x, ids, torch.rand(n, case.top_k, generator=g)


def run_case(case: Case, rank: int, world: int) -> dict:
    placement = expert_placement(case.n_experts, world, rank, case.strategy)
    disp = make_dispatcher("torch", placement, None, case.max_tokens, DIM)
    assert isinstance(disp, TorchDispatcher) and disp.local_expert_ids == placement.local_expert_global_ids.tolist()
    x, ids, w = inputs(case, rank)
    # An "expert" that scales by (its global id + 1), so a token landing in the wrong slot shows up.
    scale = (placement.local_expert_global_ids + 1).to(case.dtype).view(-1, 1, 1)
    out, recv, chunks = torch.empty_like(x), [], disp.chunks(x.shape[0])
    for start, end in chunks:
        recv_x, counts, handle = disp.dispatch(x[start:end], ids[start:end], w[start:end])
        assert recv_x.shape == (placement.n_local, world * case.max_tokens, DIM) and counts.dtype == torch.int32
        recv.append([recv_x[j, :c].clone() for j, c in enumerate(counts.tolist())])
        out[start:end] = disp.combine(recv_x * scale, handle)
    return {"chunks": chunks, "recv": recv, "out": out}


def check_errors(rank: int, world: int) -> None:
    wrong = expert_placement(8, 2 * world, rank, "linear")
    with pytest.raises(ValueError, match=rf"group has size {world}.*ep_size={2 * world}"):
        TorchDispatcher(wrong)
    disp = TorchDispatcher(expert_placement(8, world, rank, "linear"), max_tokens_per_rank=2)
    with pytest.raises(ValueError, match=r"dispatch got 3 tokens, more than max_tokens_per_rank=2"):
        disp.dispatch(torch.zeros(3, DIM), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))


def worker(rank: int, world: int, out_dir: str) -> None:
    check_errors(rank, world)
    torch.save({name: run_case(case, rank, world) for name, case in CASES[world].items()}, f"{out_dir}/rank{rank}.pt")


@pytest.fixture(scope="module", params=sorted(CASES))
def world(request, tmp_path_factory) -> tuple[int, list[dict]]:
    """(world size, each rank's results), from one gloo group per world size."""
    n = request.param
    out_dir = tmp_path_factory.mktemp(f"ep{n}")
    run_ranks(worker, n, str(out_dir))
    return n, [torch.load(out_dir / f"rank{r}.pt") for r in range(n)]


def all_cases(world):
    n, results = world
    for name, case in CASES[n].items():
        yield case, [inputs(case, r) for r in range(n)], [res[name] for res in results]


def test_every_rank_gets_the_same_chunks(world):
    for case, data, res in all_cases(world):
        n_chunks = max(-(-n // case.max_tokens) for n in case.n_tokens)
        for (x, _, _), r in zip(data, res):
            assert len(r["chunks"]) == n_chunks
            assert [t for s, e in r["chunks"] for t in range(s, e)] == list(range(x.shape[0]))


def test_receive_layout_is_deepep_ll_in_source_rank_order(world):
    n, _ = world
    for case, data, res in all_cases(world):
        for c in range(len(res[0]["chunks"])):
            for rank in range(n):
                local = expert_placement(case.n_experts, n, rank, case.strategy).local_expert_global_ids.tolist()
                for slot, expert in enumerate(local):
                    rows = []
                    for src, (x, ids, _) in enumerate(data):
                        start, end = res[src]["chunks"][c]
                        rows.append(x[start:end][(ids[start:end] == expert).any(1)])
                    assert torch.equal(res[rank]["recv"][c][slot], torch.cat(rows)), (case, c, rank, slot)


def test_combine_is_the_weighted_sum(world):
    for case, data, res in all_cases(world):
        for (x, ids, w), r in zip(data, res):
            # Each expert's output rounds to x's dtype; the weighted sum is fp32; the result is in x's dtype.
            y = (x.float().unsqueeze(1) * (ids + 1).unsqueeze(-1)).to(case.dtype).float()  # [n, k, DIM]
            want = (y * (w * (ids >= 0)).unsqueeze(-1)).sum(1).to(case.dtype)
            assert r["out"].dtype == case.dtype
            torch.testing.assert_close(r["out"], want)


def test_single_dispatch_needs_no_all_reduce_and_holds_the_promise():
    """Under single_dispatch (CUDA-graph capture) chunks() is one range without a collective (no group
    exists here: an all-reduce would fail), and a forward past max_tokens is refused, not split."""
    from dsr1.model.dispatch import LocalDispatcher, single_dispatch
    from dsr1.parallel.dispatch import ep_chunks

    assert ep_chunks(5, 8, None, one_chunk=True) == [(0, 5)] and ep_chunks(0, 8, None, one_chunk=True) == [(0, 0)]
    with pytest.raises(ValueError, match="dispatch got 9 tokens, more than max_tokens_per_rank=8"):
        ep_chunks(9, 8, None, one_chunk=True)
    d = LocalDispatcher(4, max_tokens=8)
    with single_dispatch(d):
        assert d.one_chunk
    assert not d.one_chunk
