"""scripts/bench/serving.py --smoke runs on CPU in seconds: both systems answer every request with exactly its drawn
length and the same greedy tokens, the engine reuses the shared prefix, and Poisson arrivals are waited for."""

import json

import pytest
import torch

import serving
from bench_serving import make_workload


def test_serving_smoke(tmp_path, capsys):
    out = tmp_path / "serving.json"
    r = serving.main(["--smoke", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "system  out tok/s  TTFT p50 s  TTFT p99 s  TPOT p50 ms  TPOT p99 ms  prefix hit  peak MiB" in printed
    assert "engine / static throughput: " in printed
    assert json.loads(out.read_text()) == json.loads(json.dumps(r, default=str))
    assert {"command", "device", "date"} <= r["meta"].keys()
    assert r["same_greedy_tokens"] == r["workload"]["requests"] == 12
    assert r["engine_over_static"] == pytest.approx(r["engine"]["output_tokens_per_s"] / r["static"]["output_tokens_per_s"])
    # 4 of 12 prompts are admitted in the first step and compute the prefix; the other 8 find its 5 full blocks of 8 cached.
    assert r["engine"]["prefix_hit_rate"] >= 8 * 40 / sum(1 + 40 + 12 for _ in range(12)) and r["static"]["prefix_hit_rate"] == 0
    for name in ("engine", "static"):
        s = r[name]
        assert s["ttft_p50"] <= s["ttft_p99"] and s["tpot_p50"] <= s["tpot_p99"] and s["peak_memory_bytes"] > 0
        assert s["output_tokens_per_s"] == pytest.approx(r["output_tokens"] / s["seconds"])


def test_poisson_arrivals_and_forced_lengths():
    args = serving.parse_args(["--smoke", "--rate", "200", "--requests", "6"])
    _, cfg = serving.read_config(args.config, args.vocab)
    work = make_workload(args, cfg.vocab_size)
    assert work.arrivals[0] == 0 and all(a < b for a, b in zip(work.arrivals, work.arrivals[1:]))
    assert len({tuple(p[:41]) for p in work.prompts}) == 1 and len({tuple(p) for p in work.prompts}) == 6
    model, _ = serving.build(args, cfg, torch.device("cpu"), 96)
    config = serving.EngineConfig(block_size=8, num_blocks=40, max_num_seqs=4)
    for trace, _ in (serving.run_engine(model, work, config), serving.run_static(model, work, 4, 64)):
        assert [len(trace.tokens[i]) for i in range(6)] == work.lengths
        assert all(trace.first[i] >= work.arrivals[i] for i in range(6))
