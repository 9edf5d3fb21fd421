"""Expert-parallel loading: a rank reads the replicated tensors and its own routed experts, into local
slots in placement order, and never opens a shard that holds only other ranks' experts."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from dsr1 import load_model
from dsr1.checkpoint.loader import INDEX_FILE, Checkpoint, build_model, read_weights
from dsr1.checkpoint.reader import Reader

N_EXPERTS, EP = 16, 4
ITEMSIZE = {"F8_E4M3": 1, "BF16": 2, "F32": 4}
EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")


def rank_experts(rank: int) -> list[int]:
    """Round-robin placement: rank r holds r, r+4, r+8, r+12 (from dsr1.parallel.placement when present)."""
    try:
        from dsr1.parallel.placement import expert_placement
    except ImportError:
        return list(range(rank, N_EXPERTS, EP))
    return expert_placement(N_EXPERTS, EP, rank, "round_robin").local_expert_global_ids.tolist()


def load_rank(path, expert_ids: list[int], rank: int, fp8: bool = False):
    """What dsr1.load_model loads on an EP rank holding `expert_ids`, without a process group: the checkpoint
    loader's steps, with a stand-in for the dispatcher (the MoE asks it only which experts it holds)."""
    ckpt = Checkpoint(path)
    plan = ckpt.plan(expert_ids, rank=rank)
    dispatcher = SimpleNamespace(n_local_experts=len(expert_ids), local_expert_ids=expert_ids)
    model = build_model(ckpt.config, "cpu", torch.float32, fp8, dispatcher=dispatcher)
    model.load_stats = read_weights(ckpt, plan, model, fp8, progress=False)
    return model


@pytest.fixture(scope="module")
def ckpt(small_checkpoint):
    """24 byte-balanced shards: with 16 experts some shards hold only a few consecutive experts."""
    path = small_checkpoint("fp8", shards=24)
    weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
    sizes = {}  # bytes of each tensor, from the shard headers
    for shard in set(weight_map.values()):
        with safe_open(str(path / shard), "pt") as f:
            for name in f.keys():
                sizes[name] = math.prod(f.get_slice(name).get_shape()) * ITEMSIZE[f.get_slice(name).get_dtype()]
    return SimpleNamespace(path=path, weight_map=weight_map, sizes=sizes, n_layers=4)


def needed(ckpt, ids: list[int]) -> list[str]:
    """What a rank holding `ids` must read, from the index names alone: everything outside the MTP layer
    (layer 4 in tiny.json) except other ranks' experts."""
    names = []
    for name in ckpt.weight_map:
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        expert = EXPERT.match(name)
        if layer and int(layer.group(1)) >= ckpt.n_layers:
            continue
        if expert is None or int(expert.group(2)) in ids:
            names.append(name)
    return names


@pytest.fixture
def opened(monkeypatch):
    """The shard files whose tensor bytes the loader reads (it reads every shard's header too)."""
    files: set[str] = set()
    read = Reader.read

    def record(self, reads, *args):
        files.update(r.path.name for r in reads)
        return read(self, reads, *args)

    monkeypatch.setattr(Reader, "read", record)
    return files


def test_rank_reads_its_experts_into_slots_in_order(ckpt, opened):
    ids = rank_experts(1)
    assert ids == [1, 5, 9, 13]
    model = load_rank(ckpt.path, ids, rank=1, fp8=True)
    for layer_id in range(1, 4):
        experts = model.layers[layer_id].ffn.experts
        assert experts.w1.shape[0] == 4
        for slot, e in enumerate(ids):
            hf = f"model.layers.{layer_id}.mlp.experts.{e}."
            for name, proj in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
                with safe_open(str(ckpt.path / ckpt.weight_map[hf + proj + ".weight"]), "pt") as f:
                    want = f.get_tensor(hf + proj + ".weight")
                with safe_open(str(ckpt.path / ckpt.weight_map[hf + proj + ".weight_scale_inv"]), "pt") as f:
                    want_scale = f.get_tensor(hf + proj + ".weight_scale_inv")
                assert torch.equal(getattr(experts, name)[slot].view(torch.uint8), want.view(torch.uint8))
                assert torch.equal(getattr(experts, f"{name}_scale")[slot], want_scale)

    names = needed(ckpt, ids)
    stats = model.load_stats
    assert stats.tensors_read == len(names)
    assert stats.bytes_read == sum(ckpt.sizes[n] for n in names)
    assert stats.tensors_total == len(ckpt.weight_map)
    assert stats.ideal_ratio == pytest.approx(1.0)
    assert "rank 1:" in stats.summary() and "1.000x the ideal" in stats.summary()

    # Of shards holding none of this rank's tensors only the header is read; the test checkpoint has some.
    want_shards = {ckpt.weight_map[n] for n in names}
    assert len(want_shards) < len(set(ckpt.weight_map.values()))
    assert opened == want_shards
    assert len(want_shards) == stats.shards_opened


def test_ranks_together_read_the_checkpoint_once(ckpt):
    routed_bytes = sum(size for n, size in ckpt.sizes.items() if EXPERT.match(n) and not n.startswith("model.layers.4."))
    replicated = [n for n in needed(ckpt, []) if not EXPERT.match(n)]
    per_rank = []
    for rank in range(EP):
        stats = load_rank(ckpt.path, rank_experts(rank), rank, fp8=True).load_stats
        assert stats.ideal_ratio <= 1.05, stats.summary()
        per_rank.append(stats.bytes_read - sum(ckpt.sizes[n] for n in replicated))
    assert sum(per_rank) == routed_bytes
    assert all(b == routed_bytes // EP for b in per_rank)


def test_ep_rank_model_matches_the_full_model(ckpt):
    """The same expert, loaded by the full model and by an EP rank, dequantized the same way."""
    full = load_model(ckpt.path, device="cpu", progress=False)
    part = load_rank(ckpt.path, [3, 7, 11, 15], rank=3)
    assert torch.equal(part.layers[2].ffn.experts.w2[1], full.layers[2].ffn.experts.w2[7])
    assert torch.equal(part.layers[2].attn.wq_b.weight, full.layers[2].attn.wq_b.weight)
