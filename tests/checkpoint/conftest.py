"""Small synthetic checkpoints for the loader tests: configs/tiny.json with a 512-token vocabulary
(the loader does not care about the vocabulary, and the real one makes every write ~50 MB)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsr1.checkpoint.loader import INDEX_FILE
from dsr1.checkpoint.synthetic import write_checkpoint

TINY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.json"
SMALL = {"vocab_size": 512}


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory):
    """small_checkpoint(dtype='fp8', shards=4, **overrides) -> a checkpoint directory, written once per session."""
    cache: dict[str, Path] = {}

    def make(dtype: str = "fp8", shards: int = 4, **overrides) -> Path:
        key = json.dumps([dtype, shards, overrides], sort_keys=True)
        if key not in cache:
            raw = {**json.loads(TINY_CONFIG.read_text()), **SMALL, **overrides}
            cache[key] = write_checkpoint(raw, tmp_path_factory.mktemp(f"small-{dtype}"), dtype=dtype, shards=shards)
        return cache[key]

    return make


class EditableCheckpoint:
    """A private copy of a checkpoint whose shards and index a test may edit."""

    def __init__(self, src: Path, dst: Path):
        self.path = Path(shutil.copytree(src, dst, ignore=shutil.ignore_patterns("tokenizer*")))

    @property
    def weight_map(self) -> dict[str, str]:
        return json.loads((self.path / INDEX_FILE).read_text())["weight_map"]

    def set_weight_map(self, weight_map: dict[str, str]) -> None:
        (self.path / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    def shard_of(self, name: str) -> Path:
        return self.path / self.weight_map[name]

    def edit_shard(self, filename: str, edit) -> None:
        """Rewrite shard `filename` with edit(tensors: dict) applied (it mutates the dict)."""
        tensors = load_file(self.path / filename)
        edit(tensors)
        save_file(tensors, str(self.path / filename), metadata={"format": "pt"})

    def drop(self, names: list[str], from_index: bool = True) -> None:
        """Delete tensors from their shards (and from the index)."""
        weight_map = self.weight_map
        for name in names:
            self.edit_shard(weight_map[name], lambda t, n=name: t.pop(n))
            if from_index:
                del weight_map[name]
        self.set_weight_map(weight_map)

    def replace(self, name: str, value: torch.Tensor) -> None:
        self.edit_shard(self.weight_map[name], lambda t: t.__setitem__(name, value))

    def add(self, name: str, value: torch.Tensor, like: str) -> None:
        """Add a tensor to the shard holding `like`, and to the index."""
        filename = self.weight_map[like]
        self.edit_shard(filename, lambda t: t.__setitem__(name, value))
        self.set_weight_map({**self.weight_map, name: filename})


@pytest.fixture
def editable(small_checkpoint, tmp_path):
    """editable(dtype='fp8', shards=4, **overrides) -> an EditableCheckpoint copy for this test."""

    def make(dtype: str = "fp8", shards: int = 4, **overrides) -> EditableCheckpoint:
        return EditableCheckpoint(small_checkpoint(dtype, shards, **overrides), tmp_path / "ckpt")

    return make
