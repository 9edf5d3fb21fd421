"""Every bad input of scripts/generate.py ends in one line `generate.py: error: ...` naming the flag or file
and what was found, with exit status 2 and, except for a checkpoint the loader rejects, before any weights load."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from dsr1 import embedded
from dsr1.generate_cli import main

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.json"
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="cuda is a valid --device here")
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
LOADER_REJECTS = "ckpt-without-weights"  # the one case where the weight loader runs (and rejects the checkpoint)

# (argv, fragments the message must hold); {tmp} is the test's directory. {tmp}/ckpt holds tiny.json's
# config.json alone (the checks that read it fail before the loader), {tmp}/bf16 the same without
# quantization_config.
CASES = {
    "device-cuda": pytest.param(["--device", "cuda"], ["--device", "'cuda'", "sees no CUDA device"], marks=NO_CUDA),
    "device-beyond-count": (["--device", f"cuda:{GPUS}"], ["--device", "expected cpu", f"'cuda:{GPUS}'"]),
    "device-tpu": (["--device", "tpu"], ["--device", "expected cpu", "'tpu'"]),
    "device-meta": (["--device", "meta"], ["--device", "expected cpu", "'meta'"]),
    "temperature-nan": (["--temperature", "nan"], ["--temperature", "finite number >= 0", "'nan'"]),
    "temperature-inf": (["--temperature", "inf"], ["--temperature", "finite number >= 0", "'inf'"]),
    "temperature-negative": (["--temperature", "-0.5"], ["--temperature", "finite number >= 0", "'-0.5'"]),
    "top-p-zero": (["--top-p", "0"], ["--top-p", "(0, 1]", "'0'"]),
    "top-p-above-1": (["--top-p", "1.5"], ["--top-p", "(0, 1]", "'1.5'"]),
    "max-new-tokens": (["--max-new-tokens", "-1"], ["--max-new-tokens", "integer >= 1", "'-1'"]),
    "max-seq-len": (["--max-seq-len", "0"], ["--max-seq-len", "integer >= 1", "'0'"]),
    "max-dispatch-tokens": (["--max-dispatch-tokens", "0"], ["--max-dispatch-tokens", "integer >= 1", "'0'"]),
    "ep-zero": (["--ep", "0"], ["--ep", "integer >= 1", "'0'"]),
    "seed-overflow": (["--seed", str(2**64)], ["--seed", str(2**64)]),
    "interactive-json": (["--interactive", "--json"], ["--interactive", "--json"]),
    "engine-interactive": (["--engine", "--interactive"], ["--engine", "--interactive"]),
    "input-not-utf8": (["--input-file", "{tmp}/latin1.txt"], ["--input-file {tmp}/latin1.txt", "not UTF-8 (byte 0xe9 at offset 6, line 2)"]),
    "input-directory": (["--input-file", "{tmp}"], ["--input-file {tmp}:", "is a directory"]),
    "input-missing": (["--input-file", "{tmp}/none.txt"], ["--input-file {tmp}/none.txt", "does not exist"]),
    "input-blank": (["--input-file", "{tmp}/blank.txt"], ["--input-file {tmp}/blank.txt", "only blank lines"]),
    "fp8-gemm-on-cpu": (["--device", "cpu", "--fp8-weights", "--fp8-gemm", "scaled_mm"], ["--fp8-gemm scaled_mm", "cannot run on cpu"]),
    "cuda-graphs-on-cpu": (["--device", "cpu", "--cuda-graphs", "on"], ["--cuda-graphs on", "expected a CUDA device, got cpu"]),
    "ckpt-missing": (["--ckpt-path", "{tmp}/none"], ["--ckpt-path {tmp}/none", "does not exist"]),
    "ckpt-file": (["--ckpt-path", "{tmp}/latin1.txt"], ["--ckpt-path {tmp}/latin1.txt", "is not a directory"]),
    "ckpt-no-config": (["--ckpt-path", "{tmp}"], ["--ckpt-path {tmp}:", "has no config.json"]),
    "ckpt-bad-json": (["--ckpt-path", "{tmp}/badjson"], ["{tmp}/badjson/config.json", "not valid JSON"]),
    "max-seq-len-beyond-config": (["--ckpt-path", "{tmp}/ckpt", "--max-seq-len", "100000"],
                                  ["--max-seq-len", "max_position_embeddings=4096", "{tmp}/ckpt/config.json", "100000"]),
    "fp8-weights-bf16-ckpt": (["--ckpt-path", "{tmp}/bf16", "--fp8-weights"], ["--fp8-weights", "{tmp}/bf16/config.json", "no quantization_config"]),
    "prompt-too-long": (["--ckpt-path", "{tmp}/ckpt", "--max-seq-len", "16", "--max-new-tokens", "4", "--prompt", "word " * 20],
                        ["--max-new-tokens 4", "max_seq_len=16", "--max-seq-len"]),
    "ep-without-torchrun": (["--ckpt-path", "{tmp}/ckpt", "--ep", "2"], ["--ep 2", "WORLD_SIZE=1", "torchrun --nproc-per-node 2"]),
    LOADER_REJECTS: (["--ckpt-path", "{tmp}/ckpt"], ["{tmp}/ckpt", "model.safetensors"]),
}


@pytest.fixture
def inputs(tmp_path) -> Path:
    (tmp_path / "latin1.txt").write_bytes("ok\ncaf\u00e9\n".encode("latin-1"))
    (tmp_path / "blank.txt").write_text("\n  \n")
    raw = json.loads(TINY.read_text())
    for name, config in {"ckpt": raw, "bf16": {k: v for k, v in raw.items() if k != "quantization_config"}}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text("{")
    return tmp_path


@pytest.mark.parametrize("argv, fragments", CASES.values(), ids=CASES.keys())
def test_bad_input_is_one_line_before_loading(argv, fragments, inputs, request, monkeypatch, capsys):
    def no_load(*args, **kwargs):
        raise AssertionError("the model began to load")

    monkeypatch.setattr(embedded, "tiny_checkpoint", no_load)
    if request.node.callspec.id != LOADER_REJECTS:
        monkeypatch.setattr("dsr1.engine.load.load_model", no_load)
    with pytest.raises(SystemExit) as e:
        main([arg.format(tmp=inputs) for arg in argv])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == ""
    assert err.startswith("generate.py: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment.format(tmp=inputs) in err
    if not GPUS:  # docs/RELIABILITY.md shows each case's message as printed on a machine without CUDA
        shown = err.removeprefix("generate.py: error: ").strip().replace(str(inputs), "T").replace(torch.__version__, "<torch>")
        assert shown == documented()[request.node.callspec.id]


def documented() -> dict[str, str]:
    """docs/RELIABILITY.md's generate.py table: case id -> the message after `generate.py: error: `."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "RELIABILITY.md").read_text()
    rows = re.findall(r"^\| `([\w-]+)` \| `generate.py .*` \| 2 \| `(.*)` \|$", doc, re.M)
    return dict(rows)


def test_the_reliability_table_lists_every_case():
    assert list(documented()) == list(CASES)
