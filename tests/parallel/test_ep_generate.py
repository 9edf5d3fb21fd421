"""Expert parallelism end to end on CPU (gloo, torch dispatcher), through torchrun as users launch it:
EP=2 and EP=4, linear and round-robin, five prompts (uneven ranks; at EP=4 one rank holds none).
Logits after prefill within 1e-5 relative of one process, greedy tokens identical."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def torchrun(n: int, script: str, *args: str) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), str(ROOT / "scripts" / script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, env=ENV, timeout=600).stdout


@pytest.fixture(scope="module")
def reference(make_checkpoint, tmp_path_factory):
    ckpt = make_checkpoint({"vocab_size": 129280})  # the real tokenizer's vocabulary: prompts are text
    ref = tmp_path_factory.mktemp("ep") / "ref.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "ep_parity.py"), "--ckpt-path", str(ckpt), "--reference", str(ref)],
                   check=True, env=ENV, capture_output=True, timeout=600)
    return ckpt, ref


@pytest.mark.slow
@pytest.mark.parametrize("ep", [2, 4])
def test_ep_matches_one_process(reference, tmp_path, ep):
    ckpt, ref = reference
    out = tmp_path / "rows.json"
    torchrun(ep, "ep_parity.py", "--ckpt-path", str(ckpt), "--reference", str(ref), "--all2all", "torch",
             "--placement", "linear", "round_robin", "--max-dispatch-tokens", "8", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert {r["placement"] for r in rows} == {"linear", "round_robin"}
    for r in rows:
        assert r["tokens_identical"] == r["prompts"] == 5, r
        assert r["max_logit_rel_err"] <= 1e-5, r
        assert all("1.000x the ideal" in line for line in r["load"]), r["load"]


@pytest.mark.slow
def test_generate_cli_under_torchrun(reference):
    ckpt, _ = reference
    prompts = ["What is 2+2?", "Name a colour.", "Hello"]
    args = ["--ckpt-path", str(ckpt), "--temperature", "0", "--max-new-tokens", "6", "--json", "--no-chat"]
    for p in prompts:
        args += ["--prompt", p]
    single = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), *args],
                            capture_output=True, text=True, check=True, env=ENV, timeout=600).stdout
    # Chunks of 2 prompt tokens: the ranks' prompts need different numbers of prefill forwards, which must still pair up.
    ep = torchrun(2, "generate.py", *args, "--ep", "2", "--expert-placement", "round_robin", "--prefill-chunk", "2")
    assert [json.loads(line) for line in ep.splitlines()] == [json.loads(line) for line in single.splitlines()]
