"""A checkpoint that does not match its config is refused before any weight is used, naming the tensor
and the shard (and, for routed experts, the expert and the rank)."""

from __future__ import annotations

import errno
import json
import os
import re
from types import SimpleNamespace

import pytest
import torch

import dsr1.checkpoint.loader as loader
from dsr1 import load_model
from dsr1.checkpoint.reader import read_header

KV_B = "model.layers.2.self_attn.kv_b_proj.weight"
NORM = "model.layers.2.self_attn.kv_a_layernorm.weight"


def load(path, **kwargs):
    return load_model(path, device="cpu", progress=False, **kwargs)


def shard_name(ckpt, tensor: str) -> str:
    return re.escape(ckpt.weight_map[tensor])


def holding(ids: list[int]) -> SimpleNamespace:
    """Just what the loader asks of a dispatcher: which experts this rank holds, in slot order."""
    return SimpleNamespace(n_local_experts=len(ids), local_expert_ids=ids)


def test_missing_tensor(editable):
    ckpt = editable()
    ckpt.drop([KV_B, KV_B + "_scale_inv"])
    with pytest.raises(ValueError, match=rf"2 missing tensors, e\.g\. {KV_B}"):
        load(ckpt.path)


def test_tensor_in_the_index_but_not_in_its_shard(editable):
    ckpt = editable()
    shard = shard_name(ckpt, KV_B)
    ckpt.drop([KV_B], from_index=False)
    with pytest.raises(ValueError, match=rf"tensor {KV_B} is listed .* for shard {shard}, which does not hold it"):
        load(ckpt.path)


def test_wrong_shape(editable):
    ckpt = editable("bf16")
    ckpt.replace(KV_B, torch.zeros(8, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=rf"tensor {KV_B} in shard {shard_name(ckpt, KV_B)}: expected shape \[256, 64\] .*found shape \[8, 64\]"):
        load(ckpt.path)


def test_wrong_dtype(editable):
    ckpt = editable()
    ckpt.replace(NORM, torch.ones(64, dtype=torch.float32))
    with pytest.raises(ValueError, match=rf"tensor {NORM} in shard .*dtype torch.bfloat16, found .*dtype torch.float32"):
        load(ckpt.path)


def test_fp8_weight_stored_as_bf16(editable):
    ckpt = editable()
    ckpt.replace(KV_B, torch.zeros(256, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=rf"tensor {KV_B} in shard .*dtype torch.float8_e4m3fn, found .*dtype torch.bfloat16"):
        load(ckpt.path)


def test_wrong_scale_shape(editable):
    ckpt = editable()
    scale = "model.layers.1.mlp.experts.3.down_proj.weight_scale_inv"
    ckpt.replace(scale, torch.ones(1, 2))
    with pytest.raises(ValueError, match=rf"tensor {re.escape(scale)} in shard .*expected shape \[2, 1\] .*found shape \[1, 2\]"):
        load(ckpt.path)


def test_truncated_shard(editable):
    ckpt = editable()
    file = ckpt.shard_of(KV_B)
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"shard .*{re.escape(file.name)} \(holding \d+ tensors.*\) is truncated or corrupt"):
        load(ckpt.path)


def test_corrupt_header(editable):
    ckpt = editable()
    file = ckpt.shard_of(KV_B)
    data = bytearray(file.read_bytes())
    data[8:16] = b"#garbage"  # the JSON header starts after an 8-byte length
    file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"shard .*{re.escape(file.name)} .*is truncated or corrupt"):
        load(ckpt.path)


def test_missing_shard_file(editable):
    ckpt = editable()
    file = ckpt.shard_of(KV_B)
    file.unlink()
    with pytest.raises(FileNotFoundError, match=rf"shard files listed in .* are missing: shard .*{re.escape(file.name)}"):
        load(ckpt.path)


def test_unexpected_tensor(editable):
    ckpt = editable()
    ckpt.add("model.layers.2.self_attn.q_proj.bias", torch.zeros(4), like=KV_B)
    with pytest.raises(ValueError, match=rf"1 unexpected tensors, e\.g\. model\.layers\.2\.self_attn\.q_proj\.bias \(in {shard_name(ckpt, KV_B)}\)"):
        load(ckpt.path)


def test_layer_beyond_the_mtp_layers_is_unexpected(editable):
    """Layer 4 is tiny.json's MTP layer (skipped unless load_mtp); layer 5 is unknown."""
    ckpt = editable()
    ckpt.add("model.layers.5.input_layernorm.weight", torch.ones(192, dtype=torch.bfloat16), like=KV_B)
    with pytest.raises(ValueError, match=r"unexpected tensors, e\.g\. model\.layers\.5\.input_layernorm\.weight"):
        load(ckpt.path)


def test_missing_mtp_tensors_only_matter_with_load_mtp(editable):
    ckpt = editable()
    mtp = [n for n in ckpt.weight_map if n.startswith("model.layers.4.")]
    ckpt.set_weight_map({n: f for n, f in ckpt.weight_map.items() if n not in mtp})
    load(ckpt.path)
    with pytest.raises(ValueError, match=rf"{len(mtp)} missing tensors, e\.g\. model\.layers\.4\."):
        load(ckpt.path, load_mtp=True)


def test_no_index_and_no_single_file(editable):
    ckpt = editable()
    (ckpt.path / loader.INDEX_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="holds neither model.safetensors.index.json nor model.safetensors"):
        load(ckpt.path)


def test_more_experts_than_the_config_says(editable):
    ckpt = editable(n_routed_experts=20)  # 4 groups of 5
    config = ckpt.path / "config.json"
    config.write_text(config.read_text().replace('"n_routed_experts": 20', '"n_routed_experts": 16'))
    with pytest.raises(ValueError, match=r"(?s)rank 2: .*routed experts \[16, 17, 18, 19\], beyond config\.json's n_routed_experts=16"):
        load(ckpt.path, dispatcher=holding([2, 6, 10, 14]), rank=2)


@pytest.mark.parametrize("rank, ids, holder", [(1, [1, 5, 9, 13], "rank 1 holds it"), (0, [0, 4, 8, 12], "held by another rank")])
def test_missing_expert_tensor_fails_on_every_rank(editable, rank, ids, holder):
    ckpt = editable()
    name = "model.layers.3.mlp.experts.5.up_proj.weight"
    ckpt.drop([name, name + "_scale_inv"])
    with pytest.raises(ValueError, match=rf"(?s)rank {rank}: .*{re.escape(name)} \(routed expert 5, {holder}\).*routed experts \[5\] are missing"):
        load(ckpt.path, dispatcher=holding(ids), rank=rank)


def test_dispatcher_experts_outside_the_config(small_checkpoint):
    with pytest.raises(ValueError, match=r"rank 3: dispatcher\.local_expert_ids=\[3, 16\] must be .*in \[0, 16\)"):
        load(small_checkpoint(), dispatcher=holding([3, 16]), rank=3)


def test_a_failure_while_reading_raises(small_checkpoint, monkeypatch):
    """A disk error mid-load names the shard, the byte range and the tensors in it; no model is returned."""
    path = small_checkpoint()
    shard = (path / json.loads((path / loader.INDEX_FILE).read_text())["weight_map"][KV_B]).resolve()
    entry = read_header(shard)[KV_B]
    preadv = os.preadv

    def failing(fd, buffers, offset):
        if os.readlink(f"/proc/self/fd/{fd}") == str(shard) and offset < entry.end and offset + sum(map(len, buffers)) > entry.start:
            raise OSError(errno.EIO, "Input/output error")
        return preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", failing)
    with pytest.raises(OSError, match=rf"could not read bytes \[\d+, \d+\) of shard .*{re.escape(shard.name)} \(tensor .*{re.escape(KV_B)}.*\): Input/output error"):
        load(path)


def test_corrupt_single_file(tmp_path, small_checkpoint):
    (tmp_path / "config.json").write_text((small_checkpoint() / "config.json").read_text())
    (tmp_path / loader.SINGLE_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ValueError, match=r"shard .*model\.safetensors is truncated or corrupt"):
        load(tmp_path)


def test_fp8_checkpoint_whose_config_lost_its_quantization_config(editable):
    ckpt = editable()
    config = ckpt.path / "config.json"
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "quantization_config"}))
    with pytest.raises(ValueError, match="holds FP8 block scales .* but config.json has no quantization_config"):
        load(ckpt.path)
