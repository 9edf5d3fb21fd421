"""The safetensors reader (dsr1/checkpoint/reader.py) against the safetensors library: headers, every
tensor's bytes through the direct and the staged (pinned-buffer) paths with chunks small enough to split
and join tensors, and clear errors for files that lie about their size."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import dsr1.checkpoint.loader as loader
from dsr1 import load_model
from dsr1.checkpoint.reader import Read, Reader, plan_chunks, read_header

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def shards(path: Path) -> list[Path]:
    return sorted({path / f for f in json.loads((path / loader.INDEX_FILE).read_text())["weight_map"].values()})


def test_header_matches_safetensors(small_checkpoint):
    for shard in shards(small_checkpoint()):
        entries = read_header(shard)
        with safe_open(str(shard), "pt") as f:
            assert sorted(entries) == sorted(f.keys())
            for name, entry in entries.items():
                t = f.get_tensor(name)
                assert (entry.dtype, entry.shape, entry.end - entry.start) == (t.dtype, tuple(t.shape), t.nbytes)


@pytest.mark.parametrize("device, staged", [("cpu", False), ("cpu", True)] + [("cuda", True)] * torch.cuda.is_available())
@pytest.mark.parametrize("chunk, threads", [(1 << 20, 2), (777, 3)])
def test_every_tensor_reads_exactly(small_checkpoint, device, staged, chunk, threads):
    """777-byte chunks split most tensors across reads and join small neighbours into one read. The
    destinations are filled on the current stream first: the GPU reader's copies must wait for that."""
    reads, want = [], {}
    for shard in shards(small_checkpoint()):
        with safe_open(str(shard), "pt") as f:
            for name, entry in read_header(shard).items():
                want[name] = f.get_tensor(name)
                dest = torch.full((entry.end - entry.start,), 0xAB, dtype=torch.uint8, device=device)
                reads.append(Read(shard, entry.start, dest, name))
    if staged:
        assert len(plan_chunks(reads, chunk, coalesce=True)) < len(plan_chunks(reads, chunk, coalesce=False))
    seen = []
    with Reader(torch.device(device), threads=threads, chunk=chunk, staged=staged) as reader:
        reader.read(reads, seen.append)
    assert sum(seen) == sum(r.dest.numel() for r in reads)
    for r in reads:
        assert torch.equal(r.dest.cpu(), want[r.name].view(-1).view(torch.uint8)), r.name


def test_direct_reads_are_for_cpu_memory_only():
    with pytest.raises(ValueError, match=r"straight into CPU memory only; cuda:0 needs staged=True"):
        Reader(torch.device("cuda:0"), staged=False)


def test_plan_chunks_cover_each_read_once():
    path = Path("f")
    dests = [torch.empty(n, dtype=torch.uint8) for n in (10, 5, 30, 7)]
    reads = [Read(path, 0, dests[0], "a"), Read(path, 10, dests[1], "b"), Read(path, 20, dests[2], "c"), Read(Path("g"), 3, dests[3], "d")]
    chunks = plan_chunks(reads, 12, coalesce=True)
    # a and b back to back share a chunk (a 12-byte limit splits b); c starts after a gap; d is another file
    assert [(c.path.name, c.start, c.nbytes) for c in chunks] == [("f", 0, 12), ("f", 12, 3), ("f", 20, 12), ("f", 32, 12), ("f", 44, 6), ("g", 3, 7)]
    covered = {}
    for c in chunks:
        for read, dest_at, at, n in c.pieces:
            assert c.start + at == read.start + dest_at and at + n <= c.nbytes
            covered[read.name] = covered.get(read.name, 0) + n
    assert covered == {"a": 10, "b": 5, "c": 30, "d": 7}


def test_truncated_after_the_header_check(tmp_path):
    """A file that shrinks between the header check and the read fails, naming the file and tensor."""
    path = tmp_path / "x.safetensors"
    save_file({"t": torch.arange(1000, dtype=torch.float32)}, str(path))
    entry = read_header(path)["t"]
    path.write_bytes(path.read_bytes()[:-100])
    with Reader(torch.device("cpu")) as reader, pytest.raises(OSError, match=r"of shard .*x\.safetensors \(tensor t\): the file ends at byte"):
        reader.read([Read(path, entry.start, torch.empty(entry.end - entry.start, dtype=torch.uint8), "t")])


@pytest.mark.parametrize("edit, message", [
    (lambda h: {**h, "t": {**h["t"], "data_offsets": [0, 5000]}}, r"tensor 't': data_offsets \[0, 5000\), expected start <= end <= 4000"),
    (lambda h: {**h, "t": {**h["t"], "shape": [999]}}, r"tensor 't': 4000 bytes, expected 3996 bytes for shape \[999\] of F32"),
    (lambda h: {**h, "t": {"dtype": "F32"}}, r"tensor 't': expected an object with dtype, shape and data_offsets, found \{'dtype': 'F32'\}"),
])  # fmt: skip
def test_header_lies(tmp_path, edit, message):
    path = tmp_path / "x.safetensors"
    save_file({"t": torch.arange(1000, dtype=torch.float32)}, str(path))
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(edit(json.loads(data[8 : 8 + n])), separators=(",", ":")).encode().ljust(n)  # same length: the data stays where it was
    path.write_bytes(data[:8] + header[:n] + data[8 + n :])
    with pytest.raises(ValueError, match=rf"x\.safetensors: {message}"):
        read_header(path)


def entry(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def contents(header, n: int | None = None, data: bytes = bytes(16)) -> bytes:
    """A safetensors file's bytes: header length `n` (default: the header's), `header` (a dict, or the JSON bytes), `data`."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (len(text) if n is None else n).to_bytes(8, "little") + text + data


def write(path: Path, header) -> Path:
    path.write_bytes(contents(header))
    return path


@pytest.mark.parametrize("data, message", [
    (b"\x01\x02", r"2 bytes, shorter than the 8-byte header length"),
    (contents({}, n=2**64 - 1), r"header length 18446744073709551615 does not fit in a 26-byte file"),
    (contents({}, n=1000), r"header length 1000 does not fit in a 26-byte file"),
    (contents(b"{not json}"), r"header is not valid JSON \(Expecting property name"),
    (contents(b'{"t": \xff}'), r"header is not valid JSON \('utf-8' codec can't decode byte 0xff"),
    (contents(b"[" * 100_000), r"header is not valid JSON \(maximum recursion depth"),
    (contents(b'{"t": [' + b"9" * 5000 + b"]}"), r"header is not valid JSON \(Exceeds the limit \(4300 digits\)"),
    (contents(b"[1, 2]"), r"header is not a JSON object, found \[1, 2\]"),
    (contents(b'{"\\ud800": {}}'), r"header is not valid JSON \(the string '\\ud800' is not valid UTF-8 \(a lone surrogate escape\)\)"),
    (contents(b'{"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "t": {}}'), r"header is not valid JSON \(duplicate key 't'\)"),
    (contents({"__metadata__": {"format": 1}}), r"__metadata__ must map strings to strings, found \{'format': 1\}"),
    (contents({"__metadata__": ["pt"]}), r"__metadata__ must map strings to strings, found \['pt'\]"),
    (contents({"t": [0, 8]}), r"tensor 't': expected an object with dtype, shape and data_offsets, found \[0, 8\]"),
    (contents({"t": entry(dtype="F7")}), r"tensor 't': unknown dtype 'F7', expected one of BOOL, U8, "),
    (contents({"t": entry(dtype=None)}), r"tensor 't': unknown dtype None"),
    (contents({"t": entry(shape=(-2, -1))}), r"tensor 't': shape \[-2, -1\], expected a list of non-negative integers"),
    (contents({"t": entry(shape=(2.0,))}), r"tensor 't': shape \[2\.0\], expected a list of non-negative integers"),
    (contents({"t": entry(shape=(True, 2))}), r"tensor 't': shape \[True, 2\], expected a list"),
    (contents({"t": {**entry(), "shape": "2"}}), r"tensor 't': shape '2', expected a list"),
    (contents({"t": entry(offsets=(0,))}), r"tensor 't': data_offsets \[0\], expected two non-negative integers"),
    (contents({"t": entry(offsets=(0, 8, 8))}), r"tensor 't': data_offsets \[0, 8, 8\], expected two"),
    (contents({"t": entry(offsets=(False, 8))}), r"tensor 't': data_offsets \[False, 8\], expected two"),
    (contents({"t": entry(offsets=(-8, 0))}), r"tensor 't': data_offsets \[-8, 0\], expected two non-negative integers"),
    (contents({"t": entry(offsets=(8, 0))}), r"tensor 't': data_offsets \[8, 0\), expected start <= end <= 16"),
    (contents({"t": entry(offsets=(8, 2**64))}), r"tensor 't': data_offsets \[8, 18446744073709551616\), expected start <= end <= 16"),
    (contents({"t": entry(shape=(3,))}), r"tensor 't': 8 bytes, expected 12 bytes for shape \[3\] of F32"),
    (contents({"t": entry(shape=[2**40] * 3)}), r"tensor 't': 8 bytes, expected 2\*\*64 elements or more for shape"),
    (contents({"t": entry(dtype="F4", shape=(3,), offsets=(0, 1))}), r"tensor 't': 1 bytes, expected 12 bits for shape \[3\] of F4"),
    (contents({"a": entry(), "b": entry(offsets=(4, 12))}), r"tensors 'a' \(bytes \[\d+, \d+\)\) and 'b' \(bytes \[\d+, \d+\)\) overlap"),
    (contents({"a": entry(offsets=(8, 16)), "b": entry(dtype="I32", offsets=(0, 12), shape=(3,)), "c": entry(offsets=(0, 0), shape=(0,))}), r"tensors 'b' .* and 'a' .* overlap"),
])  # fmt: skip
def test_malformed_header(tmp_path, data, message):
    """Each malformed file is a ValueError naming the file and what was expected; the message prints."""
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: {message}") as e:
        read_header(path)
    str(e.value).encode("utf-8")


def test_dtypes_read_but_not_loaded_are_named(tmp_path):
    """A safetensors dtype the loader does not load is no header error: the loader's check names it."""
    entries = read_header(write(tmp_path / "x.safetensors", {"i": entry(dtype="I32"), "b": entry(dtype="BOOL", shape=(8,), offsets=(8, 16))}))
    assert (entries["i"].dtype, entries["b"].dtype, entries["b"].shape) == ("I32", "BOOL", (8,))


def test_empty_tensors_and_gaps_are_allowed(tmp_path):
    """Only overlapping bytes are an error: an empty tensor may sit anywhere (its dims' product is 0, however large
    the others), and bytes may lie unused."""
    entries = read_header(write(tmp_path / "x.safetensors", {"e": entry(shape=(2**40, 2**40, 0), offsets=(4, 4)), "t": entry(offsets=(8, 16))}))
    assert (entries["e"].end - entries["e"].start, entries["t"].shape) == (0, (2,))


def test_not_a_regular_file(tmp_path):
    """A FIFO is refused without blocking on it, a directory without reading it."""
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    for name in ("fifo", "dir"):
        with pytest.raises(ValueError, match=rf"{name}: expected a regular file"):
            read_header(tmp_path / name)


@pytest.mark.parametrize("fp8", [True, False])
def test_staged_loading_equals_direct_loading(small_checkpoint, monkeypatch, fp8):
    """The GPU path's pinned-buffer pipeline, run into CPU memory, loads the same model as direct reads
    (fp8=False: dequantized at load, through temporaries in batches small enough to need several)."""
    path = small_checkpoint()
    direct = load_model(path, device="cpu", fp8=fp8, progress=False).state_dict()
    monkeypatch.setattr(loader, "Reader", functools.partial(Reader, chunk=4096, threads=3, staged=True))
    monkeypatch.setattr(loader, "CONVERT_BATCH", 100_000)
    staged = load_model(path, device="cpu", fp8=fp8, progress=False).state_dict()
    assert staged.keys() == direct.keys()
    for name, t in direct.items():
        assert torch.equal(staged[name].view(torch.uint8), t.view(torch.uint8)), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("fp8", [True, False])
def test_gpu_loading_equals_cpu_loading(small_checkpoint, fp8):
    """Through pinned buffers and a side stream onto the GPU: the same bytes as read into CPU memory."""
    path = small_checkpoint()
    cpu = load_model(path, device="cpu", dtype=torch.bfloat16, fp8=fp8, progress=False).state_dict()
    gpu = load_model(path, device="cuda", dtype=torch.bfloat16, fp8=fp8, progress=False).state_dict()
    for name, t in cpu.items():
        assert torch.equal(gpu[name].cpu().view(torch.uint8), t.view(torch.uint8)), name


def test_bench_read_smoke(small_checkpoint, tmp_path):
    """scripts/bench/disk_read.py: raw read patterns and load_model per reader setting, each with a rate."""
    out = tmp_path / "read.json"
    script = Path(__file__).resolve().parents[2] / "scripts" / "bench" / "disk_read.py"
    cmd = [sys.executable, str(script), "--ckpt-path", str(small_checkpoint()), "--patterns", "1x1,2x1", "--direct", "2x1", "--load", "2x1", "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["what"], r["threads"]) for r in rows if r["what"] != "O_DIRECT"] == [("buffered", 1), ("buffered", 2), ("load_model", 2)]
    assert all(r["gb_per_s"] > 0 for r in rows)
