"""Generation: cached decode against full recomputes, batching, stopping, sampling, process groups,
and scripts/generate.py end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsr1 import GenerationConfig, load_model
from dsr1.engine.generation import generate

# dsr1.generate_cli and dsr1.tokenizer (which import transformers) are imported in the tests that use
# them, so the processes spawned by test_group_keeps_ranks_in_lockstep start faster.

REPO = Path(__file__).resolve().parents[2]
GENERATE = [sys.executable, str(REPO / "scripts" / "generate.py")]
PROMPTS = [[0, 5, 6, 7, 8, 9, 10], [0, 11, 12], [0, 13, 14, 15, 16]]  # different lengths
NO_EOS = -1  # random weights may pick token 1 (EOS) early; most tests want full-length rows


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from intra-op threads, and they stall each other on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(make_checkpoint) -> Path:
    return make_checkpoint()


@pytest.fixture(scope="module")
def model(ckpt):
    return load_model(ckpt, device="cpu", dtype=torch.float32, progress=False)


def greedy_by_recompute(model, prompt: list[int], n: int) -> list[int]:
    """The oracle: no cache, the whole sequence through the model for every new token."""
    seq = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


def test_greedy_matches_full_recompute(model):
    assert generate(model, [PROMPTS[0]], GenerationConfig(6, eos_id=NO_EOS)) == [greedy_by_recompute(model, PROMPTS[0], 6)]


@pytest.mark.parametrize("attn_impl", ["absorb", "naive"])
def test_batch_matches_each_prompt_alone(ckpt, model, attn_impl):
    if attn_impl != "absorb":
        model = load_model(ckpt, device="cpu", dtype=torch.float32, attn_impl=attn_impl, progress=False)
    alone = [generate(model, [p], GenerationConfig(5, eos_id=NO_EOS))[0] for p in PROMPTS]
    assert generate(model, PROMPTS, GenerationConfig(5, eos_id=NO_EOS)) == alone


def test_eos_stops_only_its_row(model):
    ref = generate(model, [PROMPTS[0]], GenerationConfig(6, eos_id=NO_EOS))[0]
    k = max(i for i, t in enumerate(ref) if t not in ref[:i])  # the latest step that first produces its token
    eos = ref[k]
    other = generate(model, [PROMPTS[1]], GenerationConfig(6, eos_id=eos))[0]
    assert generate(model, [PROMPTS[0], PROMPTS[1]], GenerationConfig(6, eos_id=eos)) == [ref[:k], other]


def test_on_token_streams_and_should_stop_stops(model):
    seen = []
    out = generate(
        model, PROMPTS, GenerationConfig(5, eos_id=NO_EOS),
        on_token=lambda row, token: seen.append((row, token)),
        should_stop=lambda row, ids: row == 1 and len(ids) == 2,
    )
    assert [len(ids) for ids in out] == [5, 2, 5]
    assert [[t for r, t in seen if r == row] for row in range(3)] == out


def test_too_long_prompt_is_refused(ckpt):
    model = load_model(ckpt, device="cpu", dtype=torch.float32, max_seq_len=32, progress=False)
    assert len(generate(model, [[0] * 24], GenerationConfig(8, eos_id=NO_EOS))[0]) == 8  # exactly at the limit
    with pytest.raises(ValueError, match=r"prompt 1 has 25 tokens.*33 positions, beyond max_seq_len=32; raise --max-seq-len"):
        generate(model, [[0] * 3, [0] * 25], GenerationConfig(8))


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(model):
    def sample(**kw):
        return generate(model, PROMPTS, GenerationConfig(6, temperature=1.0, eos_id=NO_EOS, **kw))

    assert sample(seed=1) == sample(seed=1)
    assert sample(seed=1) != sample(seed=2)
    assert sample(top_p=1e-6, seed=3) == generate(model, PROMPTS, GenerationConfig(6, eos_id=NO_EOS))


def _group_worker(rank: int, ckpt: str, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model = load_model(ckpt, device="cpu", dtype=torch.float32, progress=False)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    prompts = PROMPTS[:2] if rank == 0 else []  # rank 1 is idle but must step with rank 0
    out = generate(model, prompts, GenerationConfig(4, eos_id=NO_EOS, prefill_chunk=3), group=dist.group.WORLD)
    Path(out_dir, f"{rank}.json").write_text(json.dumps({"out": out, "calls": len(calls)}))
    dist.destroy_process_group()


def test_group_keeps_ranks_in_lockstep(ckpt, model, tmp_path):
    mp.spawn(_group_worker, args=(str(ckpt), str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert r0["out"] == generate(model, PROMPTS[:2], GenerationConfig(4, eos_id=NO_EOS))
    assert r1["out"] == [] and r0["calls"] == r1["calls"] == 6  # 3 prefill chunks (7 tokens by 3) + 3 decode steps


def run_cli(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    # One thread: the tiny model gains nothing from more, and they stall each other on a busy machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([*GENERATE, *args], input=stdin, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_cli_json_prompts_and_input_file(ckpt, tmp_path):
    (tmp_path / "prompts.txt").write_text("line one\n\nline two\n")
    proc = run_cli(
        "--ckpt-path", str(ckpt), "--json", "--no-chat", "--max-new-tokens", "4", "--temperature", "0",
        "--prompt", "Hello", "--prompt", "The capital of France is", "--input-file", str(tmp_path / "prompts.txt"),
    )
    from dsr1.tokenizer import decode, encode_prompt, load_tokenizer

    records = [json.loads(line) for line in proc.stdout.splitlines()]
    tok = load_tokenizer(ckpt)
    assert [r["prompt"] for r in records] == ["Hello", "The capital of France is", "line one", "line two"]
    for r in records:
        assert set(r) == {"prompt", "prompt_token_ids", "token_ids", "text"}
        assert r["prompt_token_ids"] == encode_prompt(tok, r["prompt"], chat=False)
        assert r["prompt_token_ids"][0] == 0 and 0 not in r["prompt_token_ids"][1:]  # exactly one BOS
        assert len(r["token_ids"]) <= 4 and r["text"] == decode(tok, r["token_ids"])


def test_cli_embedded_default(ckpt, model, tmp_path):
    proc = run_cli(env={"XDG_CACHE_HOME": str(tmp_path)})
    (cached,) = (tmp_path / "dsr1").iterdir()  # no half-built temp dir left
    assert cached.name.startswith("tiny-") and str(cached) in proc.stderr
    from dsr1.tokenizer import decode, encode_prompt, load_tokenizer

    # What the default run must print (dsr1/embedded.py): configs/tiny.json's FP8 checkpoint of seed 0 (the
    # `model` fixture, written here independently of the CLI's cache) in fp32 on the CPU, answering the built-in
    # prompt in the chat format with 32 greedy tokens, streamed, then a newline. The tokens come from the
    # no-cache oracle, cut at the first EOS.
    tok = load_tokenizer(ckpt)
    ids = greedy_by_recompute(model, encode_prompt(tok, "What is the capital of France?", chat=True), 32)
    eos = model.cfg.eos_token_id
    ids = ids[: ids.index(eos)] if eos in ids else ids
    assert len(ids) > 8  # a real answer to compare, not an early EOS
    assert proc.stdout == decode(tok, ids) + "\n"


def test_cli_interactive_clear_resets_history(ckpt):
    proc = run_cli("--ckpt-path", str(ckpt), "--interactive", "--max-new-tokens", "4", "--temperature", "0",
                   stdin="hi\nhi\n/clear\nhi\n/exit\n")
    turns = proc.stdout.split(">>> ")
    assert turns[0] == "" and turns[3] == "(history cleared)\n" and turns[-1] == ""
    assert turns[1] == turns[4]  # after /clear, the same question gets the same greedy answer


def test_cli_errors_name_the_flag(ckpt, capsys):
    from dsr1.generate_cli import main

    def error(*argv: str) -> str:
        with pytest.raises(SystemExit) as e:
            main(list(argv))
        assert e.value.code == 2
        return capsys.readouterr().err

    assert "--interactive" in error("--interactive", "--json")
    assert "--max-seq-len" in error("--ckpt-path", str(ckpt), "--max-seq-len", "8", "--prompt", "a long prompt " * 4)
    assert "torchrun --nproc-per-node 2" in error("--ckpt-path", str(ckpt), "--ep", "2")  # one process, two EP ranks asked
    assert "round_robin" in error("--ep", "2", "--expert-placement", "diagonal")


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=-1), r"--max-new-tokens must be >= 0, got -1"),
    (dict(max_new_tokens=4, temperature=-0.5), r"--temperature must be >= 0 \(0 = greedy\), got -0.5"),
    (dict(max_new_tokens=4, temperature=float("nan")), r"--temperature must be >= 0 \(0 = greedy\), got nan"),
    (dict(max_new_tokens=4, top_p=0.0), r"--top-p must be in \(0, 1\], got 0.0"),
])
def test_generation_config_refuses_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**kwargs)
