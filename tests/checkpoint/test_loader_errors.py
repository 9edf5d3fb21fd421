"""A checkpoint that does not match its config is refused before any weight is used, naming the tensor
and the shard (and, for routed experts, the expert and the rank); so is one whose index or files lead out
of its directory, without opening the file they lead to."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import re
from pathlib import Path

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


def plan(path, expert_ids: list[int], rank: int):
    """What the loader checks on EP rank `rank`, holding routed experts `expert_ids`, before it allocates anything."""
    return loader.Checkpoint(path).plan(expert_ids, rank=rank)


def test_missing_tensor(editable):
    ckpt = editable()
    ckpt.drop([KV_B, KV_B + "_scale_inv"])
    with pytest.raises(ValueError, match=rf"2 missing tensors, e\.g\. {KV_B}"):
        load(ckpt.path)


def test_tensor_in_the_index_but_not_in_its_shard(editable):
    ckpt = editable()
    shard = shard_name(ckpt, KV_B)
    ckpt.drop([KV_B], from_index=False)
    with pytest.raises(ValueError, match=rf"tensor {KV_B} is listed .* for shard '{shard}', which does not hold it"):
        load(ckpt.path)


def test_wrong_shape(editable):
    ckpt = editable("bf16")
    ckpt.replace(KV_B, torch.zeros(8, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=rf"tensor {KV_B} in shard '{shard_name(ckpt, KV_B)}': expected shape \[256, 64\] .*found shape \[8, 64\]"):
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
    with pytest.raises(ValueError, match=rf"1 unexpected tensors, e\.g\. 'model\.layers\.2\.self_attn\.q_proj\.bias' \(in '{shard_name(ckpt, KV_B)}'\)"):
        load(ckpt.path)


def test_layer_beyond_the_mtp_layers_is_unexpected(editable):
    """Layer 4 is tiny.json's MTP layer (skipped unless load_mtp); layer 5 is unknown."""
    ckpt = editable()
    ckpt.add("model.layers.5.input_layernorm.weight", torch.ones(192, dtype=torch.bfloat16), like=KV_B)
    with pytest.raises(ValueError, match=r"unexpected tensors, e\.g\. 'model\.layers\.5\.input_layernorm\.weight'"):
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
        plan(ckpt.path, [2, 6, 10, 14], rank=2)


@pytest.mark.parametrize("rank, ids, holder", [(1, [1, 5, 9, 13], "rank 1 holds it"), (0, [0, 4, 8, 12], "held by another rank")])
def test_missing_expert_tensor_fails_on_every_rank(editable, rank, ids, holder):
    ckpt = editable()
    name = "model.layers.3.mlp.experts.5.up_proj.weight"
    ckpt.drop([name, name + "_scale_inv"])
    with pytest.raises(ValueError, match=rf"(?s)rank {rank}: .*{re.escape(name)} \(routed expert 5, {holder}\).*routed experts \[5\] are missing"):
        plan(ckpt.path, ids, rank)


@pytest.mark.parametrize("ids", [[3, 16], [3, 3]])
def test_expert_ids_outside_the_config(small_checkpoint, ids):
    with pytest.raises(ValueError, match=rf"rank 3: expert_ids={re.escape(str(ids))} must be distinct routed expert ids in \[0, 16\)"):
        plan(small_checkpoint(), ids, rank=3)


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


def test_misshaped_mtp_tensor_fails_without_load_mtp(editable):
    """Every tensor the index lists is checked in its shard's header, read or not."""
    ckpt = editable()
    name = "model.layers.4.enorm.weight"
    ckpt.replace(name, torch.ones(8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=rf"tensor {re.escape(name)} in shard '{shard_name(ckpt, name)}': expected shape \[192\] .*found shape \[8\]"):
        load(ckpt.path)


def test_misshaped_expert_of_another_rank(editable):
    ckpt = editable()
    name = "model.layers.2.mlp.experts.5.down_proj.weight"
    ckpt.replace(name, torch.zeros(96, 192, dtype=torch.float8_e4m3fn))
    with pytest.raises(ValueError, match=rf"rank 0: tensor {re.escape(name)} in shard .*expected shape \[192, 96\] .*found shape \[96, 192\]"):
        plan(ckpt.path, [0, 4, 8, 12], rank=0)


def test_dtype_the_loader_does_not_load(editable):
    """A safetensors dtype no DeepSeek-R1 tensor has is named by the shape and dtype check."""
    ckpt = editable()
    ckpt.replace(NORM, torch.ones(64, dtype=torch.int16))
    with pytest.raises(ValueError, match=rf"tensor {NORM} in shard .*dtype torch.bfloat16, found shape \[64\] dtype I16"):
        load(ckpt.path)


SECRET = b"SECRET!!"  # the first 8 bytes of a file outside the checkpoint


@pytest.fixture
def outside(tmp_path):
    """A file next to the checkpoint directory (tmp_path/ckpt), whose first 8 bytes are known."""
    path = tmp_path / "outside" / "secret.bin"
    path.parent.mkdir()
    path.write_bytes(SECRET + bytes(100))
    return path


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """The paths opened through open() and os.open()."""
    paths: list[str] = []

    def recording(open_):
        def wrapper(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)):
                paths.append(os.fspath(file))
            return open_(file, *args, **kwargs)

        return wrapper

    for module, name in ((builtins, "open"), (io, "open"), (os, "open")):
        monkeypatch.setattr(module, name, recording(getattr(module, name)))
    return paths


def refuse(ckpt, opened, message: str) -> None:
    """load refuses the checkpoint with `message` (a regex), opening nothing outside it and echoing no outside bytes."""
    opened.clear()
    with pytest.raises(ValueError, match=message) as e:
        load(ckpt.path)
    outside = [p for p in opened if not Path(os.path.realpath(p)).is_relative_to(ckpt.path.resolve())]
    assert not outside, f"opened {outside}"
    assert str(int.from_bytes(SECRET, "little")) not in str(e.value)


@pytest.mark.parametrize("shard", ["../outside/secret.bin", "OUTSIDE", "../../../../../../../../../../etc/passwd", "/etc/passwd", "sub/../../outside/secret.bin"])
def test_shard_name_leading_out_of_the_directory(editable, outside, opened, shard):
    ckpt = editable()
    shard = str(outside) if shard == "OUTSIDE" else shard
    ckpt.set_weight_map({**ckpt.weight_map, KV_B: shard})
    target = outside if "secret" in shard else Path("/etc/passwd")
    index, inside = re.escape(str(ckpt.path / loader.INDEX_FILE)), re.escape(str(ckpt.path.resolve()))
    refuse(ckpt, opened, rf"^{index}: tensor '{KV_B}' is in shard '{re.escape(shard)}', which resolves to {re.escape(str(target))}; expected a file inside {inside}$")


def test_symlink_leading_out_of_the_directory(editable, outside, opened):
    ckpt = editable()
    (ckpt.path / "link.safetensors").symlink_to(outside)
    ckpt.set_weight_map({**ckpt.weight_map, KV_B: "link.safetensors"})
    refuse(ckpt, opened, rf"tensor '{KV_B}' is in shard 'link\.safetensors', which resolves to {re.escape(str(outside))}; expected a file inside")


def test_shard_replaced_by_a_symlink_to_a_valid_copy_outside(editable, tmp_path, opened):
    """The copy outside would load: the loader must refuse it all the same."""
    ckpt = editable()
    shard = ckpt.shard_of(KV_B)
    copy = tmp_path / "outside" / shard.name
    copy.parent.mkdir()
    shard.rename(copy)
    shard.symlink_to(copy)
    refuse(ckpt, opened, rf"is in shard '{re.escape(shard.name)}', which resolves to {re.escape(str(copy))}; expected a file inside")


def test_single_file_and_config_symlinked_out(editable, tmp_path, opened):
    ckpt = editable("bf16", shards=1)
    (ckpt.path / loader.INDEX_FILE).unlink()
    shard = ckpt.path / "model-00001-of-000001.safetensors"
    copy = tmp_path / "outside" / loader.SINGLE_FILE
    copy.parent.mkdir()
    shard.rename(copy)
    (ckpt.path / loader.SINGLE_FILE).symlink_to(copy)
    refuse(ckpt, opened, rf"^{re.escape(str(ckpt.path / loader.SINGLE_FILE))} resolves to {re.escape(str(copy))}; expected a file inside")
    config = ckpt.path / "config.json"
    config.rename(copy.parent / "config.json")
    config.symlink_to(copy.parent / "config.json")
    refuse(ckpt, opened, rf"^{re.escape(str(config))} resolves to .*outside/config\.json; expected a file inside")


@pytest.mark.parametrize("shard, found", [(".", "not a regular file"), ("loop", r"cannot be resolved \(Symlink loop"), ("a\0b", r"cannot be resolved \(embedded null byte")])
def test_shard_name_naming_no_regular_file(editable, opened, shard, found):
    ckpt = editable()
    (ckpt.path / "loop").symlink_to("loop")
    ckpt.set_weight_map({**ckpt.weight_map, KV_B: shard})
    refuse(ckpt, opened, rf"tensor '{KV_B}' is in shard {re.escape(repr(shard))}, which .*{found}.*; expected a file inside")


@pytest.mark.parametrize("shard", ["", None, 5, ["model-00001-of-000004.safetensors"]])
def test_shard_name_not_a_name(editable, shard):
    ckpt = editable()
    ckpt.set_weight_map({**ckpt.weight_map, KV_B: shard})
    with pytest.raises(ValueError, match=rf"index\.json: tensor '{KV_B}' is in shard {re.escape(repr(shard))}, expected a shard file name"):
        load(ckpt.path)


@pytest.mark.parametrize("edit, found", [
    (lambda text: text.replace('"weight_map": {', f'"weight_map": {{"{KV_B}": "x", ', 1), rf"duplicate key '{KV_B}'"),
    (lambda text: text.replace(f'"{KV_B}"', '"\\ud800"', 1), r"the string '\\ud800' is not valid UTF-8"),
    (lambda text: text[:-1], r"Expecting"),
    (lambda text: '{"weight_map": []}', r"expected a JSON object whose 'weight_map' maps tensor names to shard file names"),
])  # fmt: skip
def test_index_not_an_index(editable, edit, found):
    ckpt = editable()
    index = ckpt.path / loader.INDEX_FILE
    index.write_text(edit(index.read_text()))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(index))}: .*{found}") as e:
        load(ckpt.path)
    str(e.value).encode("utf-8")


def test_hub_cache_snapshot_loads_from_its_blobs(small_checkpoint, tmp_path):
    """A Hugging Face hub cache snapshot (files are symlinks to ../../blobs/<sha>) loads; a blob of another repo does not."""
    src = small_checkpoint("fp8", 2)
    repo = tmp_path / "models--deepseek-ai--tiny"
    snap, blobs = repo / "snapshots" / "rev", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(src.iterdir())):
        (blobs / f"sha{i}").write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("../../blobs") / f"sha{i}")
    ref = load(src)
    got = load(snap)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), got.state_dict().values()))
    other = tmp_path / "models--someone--else" / "blobs"
    other.mkdir(parents=True)
    shard = next(p for p in snap.iterdir() if p.name.endswith(".safetensors"))
    (other / "x").write_bytes(shard.resolve().read_bytes())
    shard.unlink()
    shard.symlink_to(other / "x")
    with pytest.raises(ValueError, match="which resolves to .*models--someone--else/blobs/x; expected a file inside"):
        load(snap)
