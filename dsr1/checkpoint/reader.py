"""Read tensors out of safetensors files fast: each tensor's bytes go from the file straight to where they
belong, several reads in flight at once so the disk stays busy.

A safetensors file is an 8-byte little-endian header length, a JSON header (per tensor: dtype, shape and
data_offsets from the end of the header), then the tensors' raw bytes. `read_header` parses and checks it.
`Reader.read` copies byte ranges of files into tensors:
- to CPU memory: one pread per range (split into chunks), straight into the destination, from a pool of
  threads;
- to a GPU: ranges of one file that lie next to each other are read together, in chunks, into pinned
  host buffers by a pool of threads, while the buffers filled earlier are copied to the device on a side
  stream (non-blocking); a buffer is refilled once its copies have finished.
Reads are plain buffered preads (they go through the page cache), which release the GIL.
"""

from __future__ import annotations

import functools
import json
import os
import stat
from collections import deque
from contextlib import nullcontext
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from dsr1.fp8 import FP8_DTYPE

SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F8_E4M3": FP8_DTYPE}  # the ones loaded
DTYPE_BITS = {  # every safetensors dtype: the others are reported by name when a checkpoint holds one
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "F8_E8M0": 8, "F4": 4,
    "F6_E2M3": 6, "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}  # fmt: skip
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
THREADS = 8  # reads in flight: one sequential stream does not saturate an NVMe disk
CHUNK = 32 << 20  # bytes per read; a GPU reader holds 2 * THREADS pinned buffers of this size


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: dtype (torch's, or the file's name for one torch lacks here),
    shape, and where its bytes lie in the file (absolute offsets)."""

    dtype: torch.dtype | str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class Read:
    """Copy bytes [start, start + dest.numel()) of `path` into `dest` (contiguous uint8); `name` labels errors."""

    path: Path
    start: int
    dest: torch.Tensor
    name: str


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors of the safetensors file `path`. ValueError, naming the file and saying what is wrong, unless
    it is a regular file whose header is a UTF-8 JSON object without duplicate keys, whose `__metadata__` maps
    strings to strings, and whose every other entry gives a safetensors dtype, a shape of non-negative ints and
    data_offsets inside the file, as many bytes as the shape and dtype take, sharing none with another tensor."""
    if not stat.S_ISREG(os.stat(path).st_mode):  # opening a FIFO would block
        raise ValueError(f"{path}: expected a regular file")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: {size} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > min(MAX_HEADER, size - 8):
            raise ValueError(f"{path}: header length {n} does not fit in a {size}-byte file (at most {MAX_HEADER} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=json_object)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{path}: header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header is not a JSON object, found {header!r:.200}")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path}: __metadata__ must map strings to strings, found {metadata!r:.200}")
    entries = {name: _entry(path, name, meta, 8 + n, size) for name, meta in header.items()}
    spans = sorted((e.start, e.end, name) for name, e in entries.items() if e.end > e.start)
    for (start, end, name), (next_start, next_end, next_name) in zip(spans, spans[1:]):
        if next_start < end:
            raise ValueError(f"{path}: tensors {name!r} (bytes [{start}, {end})) and {next_name!r} (bytes [{next_start}, {next_end})) overlap")
    return entries


def _entry(path: Path, name: str, meta, base: int, size: int) -> TensorEntry:
    """The header entry `meta` of tensor `name`, checked, with offsets made absolute (`base`: the header's end)."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(meta, dict) or not {"dtype", "shape", "data_offsets"} <= meta.keys():
        raise ValueError(f"{where}: expected an object with dtype, shape and data_offsets, found {meta!r:.200}")
    dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise ValueError(f"{where}: unknown dtype {dtype!r:.200}, expected one of {', '.join(DTYPE_BITS)}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise ValueError(f"{where}: shape {shape!r:.200}, expected a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise ValueError(f"{where}: data_offsets {offsets!r:.200}, expected two non-negative integers")
    start, end = offsets
    if start > end or end > size - base:
        raise ValueError(f"{where}: data_offsets [{start}, {end}), expected start <= end <= {size - base} (the bytes after the header)")
    numel = functools.reduce(lambda m, d: min(m * d, 1 << 64), shape, 1)  # exact below 2**64 (no file holds more)
    bits = numel * DTYPE_BITS[dtype]
    if bits != 8 * (end - start):
        need = "2**64 elements or more" if numel == 1 << 64 else f"{bits // 8} bytes" if bits % 8 == 0 else f"{bits} bits"
        raise ValueError(f"{where}: {end - start} bytes, expected {need} for shape {shape!r:.200} of {dtype}")
    return TensorEntry(SAFETENSORS_DTYPES.get(dtype, dtype), tuple(shape), base + start, base + end)


def _is_count(v) -> bool:
    return type(v) is int and v >= 0  # JSON true/false are bools, not counts


def json_object(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object (json.loads' object_pairs_hook) as a dict; ValueError on a duplicate key, or on a key or
    string value holding a lone surrogate escape such as "\\ud800" (not UTF-8: it could not be printed)."""
    out = {}
    for key, value in pairs:
        for s in (key, value) if isinstance(value, str) else (key,):
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"the string {s!r:.200} is not valid UTF-8 (a lone surrogate escape)") from None
        if key in out:
            raise ValueError(f"duplicate key {key!r:.200}")
        out[key] = value
    return out


@dataclass
class _Chunk:
    """One pread: `nbytes` from `start` of file `path`, then slices of it copied to destinations."""

    path: Path
    start: int
    nbytes: int
    pieces: list[tuple[Read, int, int, int]]  # (read, offset in read.dest, offset in the chunk, length)


def plan_chunks(reads: list[Read], chunk: int, coalesce: bool) -> list[_Chunk]:
    """Chunks of at most `chunk` bytes covering every read, in file order; with `coalesce`, reads of one file
    that lie back to back share chunks."""
    chunks: list[_Chunk] = []
    for read in sorted(reads, key=lambda r: (str(r.path), r.start)):
        done, length = 0, read.dest.numel()
        while done < length:
            pos = read.start + done
            last = chunks[-1] if chunks else None
            joins = coalesce and last is not None and last.path == read.path and last.start + last.nbytes == pos and last.nbytes < chunk
            if not joins:
                last = _Chunk(read.path, pos, 0, [])
                chunks.append(last)
            n = min(length - done, chunk - last.nbytes)
            last.pieces.append((read, done, last.nbytes, n))
            last.nbytes += n
            done += n
    return chunks


class Reader:
    """Reads into tensors on one device (a context manager: it owns threads, and pinned buffers for a GPU)."""

    def __init__(self, device: torch.device, threads: int = THREADS, chunk: int = CHUNK, staged: bool | None = None):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # tensors report their index: compare like with like
            device = torch.device("cuda", torch.cuda.current_device())
        self.device, self.chunk = device, chunk
        self.staged = self.device.type != "cpu" if staged is None else staged  # tests stage into CPU memory too
        if not self.staged and self.device.type != "cpu":
            raise ValueError(f"Reader: reads go straight into CPU memory only; {self.device} needs staged=True")
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="dsr1-read")
        self.threads = threads
        self.buffers: list[torch.Tensor] = []
        self.events: list[torch.cuda.Event | None] = []
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._fds: dict[Path, int] = {}

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def read(self, reads: list[Read], on_bytes: Callable[[int], None] = lambda n: None) -> None:
        """Fill every read's destination; return once all bytes are there (device copies finished too)."""
        for r in reads:
            if r.dest.dtype != torch.uint8 or r.dest.dim() != 1 or not r.dest.is_contiguous() or r.dest.device != self.device:
                raise ValueError(f"{r.name}: a read needs a contiguous 1-D uint8 destination on {self.device}")
        chunks = plan_chunks(reads, self.chunk, coalesce=self.staged)
        for chunk in chunks:  # opened here, not in the threads
            if chunk.path not in self._fds:
                self._fds[chunk.path] = os.open(chunk.path, os.O_RDONLY)
        if self.staged:
            self._read_staged(chunks, on_bytes)
            return
        futures = []
        for chunk in chunks:  # uncoalesced: one piece per chunk, read straight into its destination
            read, dest_at, _, n = chunk.pieces[0]
            futures.append((self.pool.submit(self._pread_chunk, chunk, read.dest[dest_at : dest_at + n]), chunk))
        for fut, chunk in futures:
            fut.result()
            on_bytes(chunk.nbytes)

    def _read_staged(self, chunks: list[_Chunk], on_bytes: Callable[[int], None]) -> None:
        if not self.buffers:
            pin = self.device.type == "cuda"
            self.buffers = [torch.empty(self.chunk, dtype=torch.uint8, pin_memory=pin) for _ in range(2 * self.threads)]
            self.events = [None] * len(self.buffers)
        if self.stream is not None:  # what the current stream does to the destinations (a fill, a free) comes first
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        free = deque(range(len(self.buffers)))
        pending: deque[tuple[Future, _Chunk, int]] = deque()

        def unload() -> None:  # the oldest read: wait for it, start its copies, free its buffer once they are done
            fut, chunk, b = pending.popleft()
            fut.result()
            buf = self.buffers[b]
            with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
                for read, dest_at, at, n in chunk.pieces:
                    read.dest[dest_at : dest_at + n].copy_(buf[at : at + n], non_blocking=self.stream is not None)
                if self.stream is not None:
                    self.events[b] = torch.cuda.Event()
                    self.events[b].record(self.stream)
            free.append(b)
            on_bytes(chunk.nbytes)

        for chunk in chunks:
            if not free:
                unload()
            b = free.popleft()
            if self.events[b] is not None:
                self.events[b].synchronize()  # its last copies have left the buffer
            pending.append((self.pool.submit(self._pread_chunk, chunk, self.buffers[b][: chunk.nbytes]), chunk, b))
        while pending:
            unload()
        if self.stream is not None:
            self.stream.synchronize()

    def _pread_chunk(self, chunk: _Chunk, into: torch.Tensor) -> None:
        """Read the chunk's bytes into `into` (host memory), retrying short reads; errors name the tensors."""
        view, done = memoryview(into.numpy()), 0
        try:
            fd = self._fds[chunk.path]
            while done < chunk.nbytes:
                n = os.preadv(fd, [view[done : chunk.nbytes]], chunk.start + done)
                if n == 0:
                    raise OSError(f"the file ends at byte {chunk.start + done}")
                done += n
        except OSError as e:
            names = sorted({read.name for read, *_ in chunk.pieces})
            raise OSError(
                f"could not read bytes [{chunk.start}, {chunk.start + chunk.nbytes}) of shard {chunk.path} "
                f"(tensor {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}): {e.strerror or e}"
            ) from e

