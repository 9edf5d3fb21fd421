"""Fuzzing the checkpoint loader: seeded corruptions of a small valid checkpoint (shard headers and bytes, the
index, paths leading out of the directory). Each case loads, or raises ValueError or FileNotFoundError with a
printable message naming the file it corrupted; within a time bound; opening no file outside the checkpoint
directory (next to it lies a valid copy of every shard, so a loader that followed a path out would load).
`pytest --fuzz-cases N` runs N cases (case i is the same in every run)."""

from __future__ import annotations

import builtins
import io
import json
import os
import random
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dsr1 import load_model
from dsr1.checkpoint.loader import INDEX_FILE
from dsr1.checkpoint.reader import read_header

SEED = 2025
CASE_SECONDS = 20  # a case takes ~0.1 s; the bound catches hangs
SECRET = b"SECRET!!"  # the first 8 bytes of a file outside the checkpoint: as a header length, never in a message
FAIL, ANY, SAME = "fails", "loads or fails", "loads the original weights"


def pytest_generate_tests(metafunc):
    if "case_id" in metafunc.fixturenames:
        metafunc.parametrize("case_id", range(metafunc.config.getoption("fuzz_cases")))


@pytest.fixture(scope="module")
def base(small_checkpoint, tmp_path_factory):
    """The valid checkpoint (3 shards), its shards' bytes and headers, its weights, and outside/: a copy of its
    files and a secret file, next to where each case's directory is made."""
    src, root = small_checkpoint("fp8", shards=3), tmp_path_factory.mktemp("fuzz").resolve()
    index = json.loads((src / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    (root / "base").mkdir()
    for name in ["config.json", INDEX_FILE, *shards]:
        shutil.copy(src / name, root / "base" / name)
    shutil.copytree(root / "base", root / "outside")
    (root / "outside" / "secret.bin").write_bytes(SECRET + bytes(100))
    raw = {s: (root / "base" / s).read_bytes() for s in shards}
    n = {s: int.from_bytes(raw[s][:8], "little") for s in shards}
    headers = {s: json.loads(raw[s][8 : 8 + n[s]]) for s in shards}
    weights = load_model(root / "base", device="cpu", progress=False).state_dict()
    return SimpleNamespace(root=root, index=index, shards=shards, raw=raw, n=n, headers=headers, weights=weights)


class Case:
    """A case's checkpoint directory: hard links to the base files, which mutations replace (never write through)."""

    def __init__(self, base, case_id: int):
        self.base, self.path, self.outside = base, base.root / f"case{case_id}", base.root / "outside"
        self.path.mkdir()
        for f in (base.root / "base").iterdir():
            os.link(f, self.path / f.name)

    def write(self, name: str, data: bytes) -> None:
        (self.path / name).unlink(missing_ok=True)
        (self.path / name).write_bytes(data)

    def write_shard(self, shard: str, header) -> None:
        """Shard `shard` with its tensor bytes and `header` (a dict, or the JSON bytes) before them."""
        text = header if isinstance(header, bytes) else json.dumps(header).encode()
        self.write(shard, len(text).to_bytes(8, "little") + text + self.base.raw[shard][8 + self.base.n[shard] :])

    def write_index(self, index) -> None:
        self.write(INDEX_FILE, index if isinstance(index, bytes) else json.dumps(index).encode())

    def link(self, name: str, target) -> None:
        (self.path / name).unlink(missing_ok=True)
        (self.path / name).symlink_to(target)


# Each mutation: (rng, case) -> (the file the error must name, or names it may name; FAIL, ANY or SAME).


def header_length(rng, case):
    shard = rng.choice(case.base.shards)
    raw = case.base.raw[shard]
    fixed = [0, 1, 7, 8, len(raw) - 7, len(raw), 2**31, 2**63, 2**64 - 1]
    n = rng.choice(fixed + [rng.getrandbits(64), rng.getrandbits(24)])
    case.write(shard, n.to_bytes(8, "little") + raw[8:])
    return shard, FAIL if n in fixed else ANY


def truncate(rng, case):
    shard = rng.choice(case.base.shards)
    case.write(shard, case.base.raw[shard][: rng.randrange(len(case.base.raw[shard]))])
    return shard, FAIL


def flip(rng, case):
    """A few random bytes, in the header half of the time."""
    name = rng.choice([*case.base.shards, INDEX_FILE])
    data = bytearray((case.path / name).read_bytes())
    end = 8 + case.base.n[name] if name != INDEX_FILE and rng.random() < 0.5 else len(data)
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(end)] ^= 1 << rng.randrange(8)
    case.write(name, bytes(data))
    return (name, "config.json") if name == INDEX_FILE else name, ANY


def garbage(rng, case):
    """The JSON header replaced by random bytes, JSON tokens, another JSON value, deep nesting or a huge integer."""
    shard = rng.choice(case.base.shards)
    text = json.dumps(case.base.headers[shard])
    tokens = ["{", "}", "[", "]", ":", ",", '"a"', "1", "-1", "1e999", "null", "true", "NaN", " ", "\\", '"\\ud800"']
    case.write_shard(shard, rng.choice([
        rng.randbytes(rng.randint(1, 300)),
        "".join(rng.choices(tokens, k=rng.randint(1, 50))).encode(),
        rng.choice([b"[]", b"5", b'"x"', b"null", b"true", b"[{}]", b""]),
        rng.choice([b"[", b'{"a":']) * rng.randint(1000, 100_000),
        text.replace("[", "[" + "9" * rng.randint(4300, 6000) + ",", 1).encode(),
    ]))  # fmt: skip
    return shard, FAIL


def entry(rng, case):
    """One tensor's entry, or __metadata__, of the wrong kind or with a bad field."""
    shard = rng.choice(case.base.shards)
    header = json.loads(json.dumps(case.base.headers[shard]))
    name = rng.choice([n for n in header if n != "__metadata__"])
    meta = header[name]
    start, end = meta["data_offsets"]
    same_size = [n for n, m in header.items() if n not in (name, "__metadata__") and m["data_offsets"][1] - m["data_offsets"][0] == end - start]
    kind = rng.choice(["entry", "metadata", "offsets", "dtype", "shape"])
    if kind == "entry":
        header[name] = rng.choice([5, [], "x", None, {}, {"dtype": "F32"}, {k: v for k, v in meta.items() if k != "shape"}])
    elif kind == "metadata":
        header["__metadata__"] = rng.choice([[], {"a": 1}, "x", {"a": {"b": "c"}}, None, {"a": None}])
    elif kind == "offsets":
        shift = rng.randrange(1, end - start) if end - start > 1 else 1
        overlap = header[rng.choice(same_size)]["data_offsets"] if same_size else [start + shift, end + shift]
        meta["data_offsets"] = rng.choice([
            [start, end + 1], [start + 1, end], [end, start], [0, 2**64], [start, 10**30], [-1, end], [start],
            [start, end, end], [float(start), end], [True, end], "0", None, {}, [start + shift, end + shift], overlap,
        ])  # fmt: skip
    elif kind == "dtype":
        meta["dtype"] = rng.choice(["F7", "", 5, None, ["F32"], "I32", "F64", "F4", "BOOL", "F16", "f32", "I8", "U8", "C64"])
    else:
        shape = meta["shape"]
        meta["shape"] = rng.choice([[-1, *shape], [1.5], [True, *shape[1:]], ["3"], None, 7, [2**70], [*shape, 1], [1, *shape], [], [2 * shape[0], *shape[1:]]])
    case.write_shard(shard, header)
    return shard, FAIL


def raw_names(rng, case):
    """A tensor renamed, in the JSON text (a lone surrogate, a byte that is not UTF-8, control characters, ...),
    or listed twice."""
    shard = rng.choice(case.base.shards)
    header = case.base.headers[shard]
    name = rng.choice([n for n in header if n != "__metadata__"])
    text = json.dumps(header).encode()
    key = json.dumps(name).encode() + b":"
    if rng.random() < 0.3:  # a duplicate, first or last
        dup = key + json.dumps(header[name]).encode()
        text = b"{" + dup + b"," + text[1:] if rng.random() < 0.5 else text[:-1] + b"," + dup + b"}"
    else:
        new = rng.choice([b'"\\ud800"', b'"\\udfff\\ud800x"', b'"\xff\xfe"', b'"\\u001b[2J"', b'""', b'"a\\u0000b"', b'"__metadata__"'])
        text = text.replace(key, new + b":")
    case.write_shard(shard, text)
    return shard, FAIL


def benign_header(rng, case):
    """The same tensors, the header re-serialized: entries reordered, whitespace, more metadata."""
    shard = rng.choice(case.base.shards)
    items = list(case.base.headers[shard].items())
    rng.shuffle(items)
    header = {**dict(items), "__metadata__": {"format": "pt", "note": "\u00e9\u4e2d"}}
    case.write_shard(shard, json.dumps(header, indent=rng.choice([None, 1, 4])).encode() + b" " * rng.randrange(8))
    return shard, SAME


def redirect(case, shard: str, to: str) -> None:
    """The index lists `shard`'s tensors in `to`."""
    index = json.loads(json.dumps(case.base.index))
    index["weight_map"] = {t: to if s == shard else s for t, s in index["weight_map"].items()}
    case.write_index(index)


def traversal(rng, case):
    """A shard name or file leading out of the directory, or to no regular file."""
    shard = rng.choice(case.base.shards)
    out = case.outside
    kind = rng.randrange(9)
    if kind == 0:
        to = rng.choice([f"../outside/{shard}", str(out / shard), "../outside/secret.bin", str(out / "secret.bin"), "/etc/passwd"])
        to = rng.choice([to, "../" * rng.randint(1, 12) + "etc/passwd", f"sub/../../outside/{shard}"])
    elif kind == 1:  # a symlink in the directory, to a file outside
        case.link(to := "link.safetensors", rng.choice([out / shard, f"../outside/{shard}", out / "secret.bin"]))
    elif kind == 2:  # a symlinked directory
        case.link("sub", rng.choice([out, "../outside"]))
        to = f"sub/{shard}"
    elif kind == 3:  # the shard itself replaced by a symlink out
        case.link(shard, rng.choice([out / shard, f"../outside/{shard}"]))
        return (shard, INDEX_FILE), FAIL
    elif kind == 4:  # config.json
        case.link("config.json", out / "config.json")
        return "config.json", FAIL
    elif kind == 5:  # a symlink loop
        case.link("loop", "loop2")
        case.link(to := "loop2", "loop")
    elif kind == 6:  # not a regular file: a directory, a FIFO
        (case.path / "d").mkdir()
        os.mkfifo(case.path / "fifo")
        to = rng.choice([".", "d", "fifo", "./", "d/.."])
    elif kind == 7:  # names no file may have
        to = rng.choice(["a\x00b", "a" * 5000, "a/" * 3000 + "b"])
    else:  # missing
        to = rng.choice(["missing.safetensors", f"d/{shard}", f"{shard}/x"])
        redirect(case, shard, to)
        return to, FAIL
    redirect(case, shard, to)
    return INDEX_FILE, FAIL


def inside(rng, case):
    """Shard names that lead to the same file inside the directory."""
    shard = rng.choice(case.base.shards)
    kind = rng.randrange(3)
    if kind == 0:
        to = rng.choice([f"./{shard}", f"sub/../{shard}", str(case.path / shard)])
    elif kind == 1:
        case.link(to := "alias.safetensors", rng.choice([shard, case.path / shard]))
    else:
        (case.path / "real").mkdir()
        os.rename(case.path / shard, case.path / "real" / shard)
        case.link("sub", "real")
        to = f"sub/{shard}"
    redirect(case, shard, to)
    return INDEX_FILE, SAME


def index_garbage(rng, case):
    """The index: not JSON, not UTF-8, not an index, a duplicate or non-UTF-8 tensor name, a bad shard name."""
    text = json.dumps(case.base.index, indent=2)
    first = text.index('"model.')
    line = text[first : text.index("\n", first)].rstrip(",")
    index = rng.choice([
        rng.randbytes(rng.randint(0, 300)),
        text[: rng.randrange(len(text) - 1)].encode(),
        b"[]", b"{}", b'{"weight_map": []}', b'{"weight_map": {"a": "b"}}', b'{"weight_map": {}} x', b"\xff\xfe{}",
        (text[:first] + line + ",\n" + text[first:]).encode(),
        text.replace('"model.', '"\\udc80model.', 1).encode(),
        text.replace('"model.', '"\xe9model.', 1).encode("latin-1"),
        b"[" * 50_000,
    ])  # fmt: skip
    if rng.random() < 0.3:
        bad = json.loads(json.dumps(case.base.index))
        bad["weight_map"][rng.choice(list(bad["weight_map"]))] = rng.choice(["", None, 5, [], {}, True])
        index = json.dumps(bad).encode()
    case.write_index(index)
    return INDEX_FILE, FAIL


MUTATIONS = [  # (mutation, weight)
    (header_length, 2), (truncate, 1), (flip, 3), (garbage, 2), (entry, 4), (raw_names, 2), (benign_header, 1),
    (traversal, 5), (inside, 1), (index_garbage, 2),
]  # fmt: skip


@contextmanager
def deadline(seconds: float):
    """Raise TimeoutError in the code inside once `seconds` have passed (a hang fails the case, not the run)."""

    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """The paths opened through open() and os.open() (not file descriptors)."""
    paths: list[str] = []

    def recording(open_):
        def wrapper(file, *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)):
                paths.append(os.fsdecode(file))
            return open_(file, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(builtins, "open", recording(builtins.open))
    monkeypatch.setattr(io, "open", recording(io.open))
    monkeypatch.setattr(os, "open", recording(os.open))
    return paths


def check_error(e: Exception, names: tuple[str, ...], what: str) -> None:
    """The message is printable, names one of `names` and holds no bytes of the file outside."""
    message = str(e)
    message.encode("utf-8")  # no lone surrogates
    assert any(n in message for n in names), f"{what}: the message names none of {names}: {message[:2000]}"
    assert str(int.from_bytes(SECRET, "little")) not in message, f"{what}: the outside file's bytes are in the message: {message[:2000]}"


def test_fuzz(base, case_id, opened):
    rng = random.Random(f"{SEED}-{case_id}")
    mutation = rng.choices([m for m, _ in MUTATIONS], [w for _, w in MUTATIONS])[0]
    case = Case(base, case_id)
    try:
        names, expect = mutation(rng, case)
        names = (names,) if isinstance(names, str) else names
        what = f"case {case_id} ({mutation.__name__}, {expect})"
        first = case.path / names[0]
        with deadline(CASE_SECONDS):
            if first.name in base.shards and first.is_file() and not first.is_symlink():  # a corrupted shard
                try:
                    read_header(first)
                except ValueError as e:
                    check_error(e, (str(first),), f"{what}, read_header")
            try:
                model = load_model(case.path, device="cpu", progress=False)
            except (ValueError, FileNotFoundError) as e:
                check_error(e, names, what)
            else:
                assert expect != FAIL, f"{what}: loaded"
                if expect == SAME:
                    assert all(torch.equal(t, base.weights[k]) for k, t in model.state_dict().items()), f"{what}: other weights"
        outside = [p for p in opened if not Path(os.path.realpath(p)).is_relative_to(case.path)]
        assert not outside, f"{what}: opened files outside the checkpoint: {outside}"
    finally:
        shutil.rmtree(case.path)
