"""The lm-eval adapter (dsr1.eval.lm_eval) on the tiny synthetic checkpoint: scores against direct forwards,
generation (on the serving engine) against dsr1.engine.generation and scripts/generate.py, stopping, the think
cutoff, and evals/run_lm_eval.py end to end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from dsr1 import GenerationConfig, load_model  # noqa: E402
from dsr1.eval import lm_eval as adapter  # noqa: E402
from dsr1.eval.lm_eval import DSR1LM, resolve_batch_size, resolve_device  # noqa: E402
from tests.eval.static_stops import StopStrings  # noqa: E402
from dsr1.eval import until  # noqa: E402
from dsr1.eval.until import run_requests  # noqa: E402
from dsr1.engine.generation import generate  # noqa: E402
from dsr1.tokenizer import BOS, END_THINK, EOS, decode, encode_prompt, load_tokenizer  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.models.utils import handle_stop_sequences, postprocess_generated_text  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
CONTEXTS = ["Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer:", "The capital of France is", "1, 2, 3,"]


@pytest.fixture(scope="module")
def ckpt(make_checkpoint) -> Path:
    return make_checkpoint()


@pytest.fixture(scope="module")
def lm(ckpt) -> DSR1LM:
    return DSR1LM(ckpt_path=str(ckpt), device="cpu", dtype="float32", max_length=256, batch_size=4)


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def greedy_ids(lm: DSR1LM, context: str, n: int) -> list[int]:
    ids = generate(lm.model, [lm.tok_encode(context)], GenerationConfig(n, eos_id=-1))[0]  # eos_id=-1: never stop early
    assert len(ids) == n
    return ids


def direct_logprob(lm: DSR1LM, ids: list[int], n_context: int) -> float:
    """Sum of log p(ids[i] | ids[:i]) for i >= n_context, from one plain forward."""
    with torch.inference_mode():
        logprobs = torch.log_softmax(lm.model(torch.tensor([ids]))[0], dim=-1)  # [s, v]
    return sum(float(logprobs[i - 1, ids[i]]) for i in range(n_context, len(ids)))


def test_registered_and_built_like_the_cli(ckpt, monkeypatch):
    cls = get_model("dsr1")
    assert cls is DSR1LM
    assert get_model("dummy").__name__ == "DummyLM"  # lm-eval's own models still resolve after ours registered
    lm = cls.create_from_arg_string(f"ckpt_path={ckpt},max_length=64", {"batch_size": "2", "max_batch_size": None, "device": "cpu"})
    assert (lm.batch_size, lm.max_length, lm.device) == (2, 64, "cpu")
    with pytest.raises(ValueError, match=r"\['max_len'\] not understood"):
        cls.create_from_arg_string(f"ckpt_path={ckpt},max_len=64", {"device": "cpu"})
    with pytest.raises(ValueError, match=r"prefill_chunk=0: expected an integer >= 1"):
        cls.create_from_arg_string(f"ckpt_path={ckpt},prefill_chunk=0", {"device": "cpu"})
    with pytest.raises(ValueError, match=r"think_cutoff='drop'; expected one of \['empty', 'keep'\]"):
        cls.create_from_arg_string(f"ckpt_path={ckpt},think_cutoff=drop", {"device": "cpu"})
    with pytest.raises(ValueError, match=r"EngineConfig.block_size must be >= 1, found 0"):
        cls.create_from_arg_string(f"ckpt_path={ckpt},block_size=0", {"device": "cpu"})
    built = []
    monkeypatch.setattr(adapter, "tiny_checkpoint", lambda: built.append(ckpt) or ckpt)  # the embedded default, as scripts/generate.py runs it
    lm = cls.create_from_arg_string("block_size=8,num_blocks=40,max_num_seqs=3,prefix_caching=False", {"batch_size": "2", "device": "cpu"})
    config = lm.engine_config
    assert built == [ckpt]
    assert (config.block_size, config.num_blocks, config.max_num_seqs, config.enable_prefix_caching) == (8, 40, 3, False)
    assert config.max_num_batched_tokens == lm.prefill_chunk and lm.think_cutoff == "empty"


def test_device_and_batch_size_flags(caplog):
    assert resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("cuda:0") == "cpu"  # lm-eval's default device: fall back, with a warning
        assert "CUDA is not available" in caplog.text
    assert [resolve_batch_size(b, m) for b, m in [("2", None), (3, None), ("auto", None), ("auto:4", 2)]] == [2, 3, 8, 2]
    with pytest.raises(ValueError, match="--batch_size '0'"):
        resolve_batch_size("0", None)


def test_expert_parallel_needs_torchrun(ckpt):
    with pytest.raises(ValueError, match="--ep 2 needs one process per EP rank, but WORLD_SIZE=1: launch with torchrun --nproc-per-node 2"):
        DSR1LM(ckpt_path=str(ckpt), device="cpu", ep=2)


def test_one_bos_and_chat_template(lm):
    bos = lm.tokenizer.bos_token_id
    for text in ["Hello", BOS + "Hello", BOS + BOS + "Hello"]:
        ids = lm.tok_encode(text)
        assert ids[0] == bos and ids[1] != bos
    assert lm.tok_encode("Hello", add_special_tokens=False)[0] != bos
    chat = [{"role": "user", "content": "2+2?"}]
    assert lm.apply_chat_template(chat) == f"{BOS}<｜User｜>2+2?<｜Assistant｜><think>\n"
    prefixed = lm.apply_chat_template([*chat, {"role": "assistant", "content": "The answer is"}], add_generation_prompt=False)
    assert prefixed == f"{BOS}<｜User｜>2+2?<｜Assistant｜>The answer is"  # gen_prefix: continued, no EOS


def test_loglikelihood_matches_direct_forward(lm):
    pairs = [(CONTEXTS[0], " 7"), ("", "Hello world"), (CONTEXTS[1], " Paris, a city on the Seine."), (BOS + "Once upon", " a time")]
    got = lm.loglikelihood(requests("loglikelihood", pairs))  # one right-padded batch of four lengths
    for (context, continuation), (score, _) in zip(pairs, got):
        n_context = len(lm.tok_encode(context)) if context else 1
        ids = lm.tok_encode(context + continuation)
        assert score == pytest.approx(direct_logprob(lm, ids, n_context), abs=1e-3)
    greedy = greedy_ids(lm, CONTEXTS[2], 4)
    context = lm.tok_encode(CONTEXTS[2])
    wrong = [(greedy[0] + 1) % lm.tokenizer.vocab_size, *greedy[1:]]
    flags = [is_greedy for _, is_greedy in lm._loglikelihood_tokens([(None, context, greedy), (None, context, wrong)])]
    assert flags == [True, False]


def test_loglikelihood_rolling_longer_than_max_length(lm, monkeypatch):
    text = "The quick brown fox jumps over the lazy dog. " * 6
    tokens = lm.tok_encode(text, add_special_tokens=False)
    window = 16
    assert len(tokens) > 3 * window
    monkeypatch.setattr(lm, "_max_length", window)
    (score,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
    # Each token is scored once, in windows of `window` targets; a window sees only the `window` inputs
    # before its end (BOS + text at first; the last, partial window reaches back into the previous one).
    ids = [lm.prefix_token_id, *tokens]
    expected = 0.0
    for start in range(0, len(tokens), window):
        end = min(start + window, len(tokens))  # targets ids[start + 1 : end + 1]
        lo = max(0, end - window)
        expected += direct_logprob(lm, ids[lo : end + 1], start + 1 - lo)
    assert score == pytest.approx(expected, abs=1e-3)
    monkeypatch.setattr(lm, "_max_length", 256)
    (whole,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
    assert whole == pytest.approx(direct_logprob(lm, ids, 1), abs=1e-3)


def test_scores_do_not_depend_on_the_prefill_chunk(lm, monkeypatch):
    # Contexts longer than the chunk, continuations that span chunks, one row's targets in several chunks.
    pairs = [(CONTEXTS[0], " 7"), ("", "Hello world"), (CONTEXTS[1], " Paris, a city on the Seine."), (CONTEXTS[2], " 4, 5, 6, 7")]
    text = "The quick brown fox jumps over the lazy dog. " * 3
    whole = lm.loglikelihood(requests("loglikelihood", pairs)), lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
    for chunk in (1, 3):
        monkeypatch.setattr(lm, "prefill_chunk", chunk)
        chunked = lm.loglikelihood(requests("loglikelihood", pairs)), lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
        assert [g for _, g in chunked[0]] == [g for _, g in whole[0]]
        assert [s for s, _ in chunked[0]] == pytest.approx([s for s, _ in whole[0]], rel=1e-5)
        assert chunked[1] == pytest.approx(whole[1], rel=1e-5)


@pytest.mark.slow  # a fresh interpreter for scripts/generate.py
def test_generate_until_matches_generate_script(lm, ckpt):
    cmd = [sys.executable, str(REPO / "scripts" / "generate.py"), "--ckpt-path", str(ckpt), "--prompt", CONTEXTS[0]]
    cmd += ["--no-chat", "--temperature", "0", "--max-new-tokens", "12", "--json", "--device", "cpu", "--dtype", "float32"]
    record = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=OFFLINE).stdout.strip().splitlines()[-1])
    assert record["prompt_token_ids"] == lm.tok_encode(CONTEXTS[0])
    (text,) = lm.generate_until(requests("generate_until", [(CONTEXTS[0], {"until": [], "max_gen_toks": 12})]))
    assert text == record["text"]


def test_generate_until_batches_and_restores_order(lm, monkeypatch):
    args = [(c, {"until": [], "max_gen_toks": 6}) for c in CONTEXTS] + [(CONTEXTS[1], {"until": [], "max_gen_toks": 3})]
    batched = lm.generate_until(requests("generate_until", args))
    # One sequence at a time, small blocks, no prefix cache, one-token prefill chunks: the same texts.
    monkeypatch.setattr(lm, "engine_config", replace(lm.engine_config, max_num_seqs=1, block_size=2, enable_prefix_caching=False, max_num_batched_tokens=1))
    assert batched == lm.generate_until(requests("generate_until", args))
    assert batched[1].startswith(batched[3]) and batched[1] != batched[3]


def test_engine_generations_equal_the_static_path(lm, monkeypatch):
    """Per request, the engine's text is what the previous implementation produced: generation.generate on that
    request with its stop strings (StopStrings), cut by lm-eval's postprocess. Seven requests sharing a few-shot
    prefix, with their own stop strings and lengths, in an engine of 4 sequences: the later ones reuse the
    prefix from the cache."""
    shots = "Question: Ann has 2 pens and buys 3 more. How many pens?\nAnswer: 2 + 3 = 5. #### 5\n\n" * 2
    ids = greedy_ids(lm, shots + CONTEXTS[0][len("Question: "):], 12)
    stop = lm.tok_decode(ids[5:7])  # a stop string the first request generates
    gen_kwargs = [{"until": [stop], "max_gen_toks": 12}, {"until": ["Question:"], "max_gen_toks": 9}, {"max_gen_toks": 5}, {"until": "\n\n", "max_gen_toks": 7}]
    args = [(shots + q, gen_kwargs[i % 4]) for i, q in enumerate([CONTEXTS[0][len("Question: "):], *CONTEXTS, "2, 4, 6,", "Tom?", "Paris"])]
    engines = []
    monkeypatch.setattr(adapter, "run_requests", lambda engine, *a: engines.append(engine) or run_requests(engine, *a))
    got = lm.generate_until(requests("generate_until", args))
    for (context, kwargs), text in zip(args, got):
        stops = handle_stop_sequences(kwargs.get("until"), EOS)
        config = GenerationConfig(kwargs["max_gen_toks"], eos_id=lm.eot_token_id)
        static = generate(lm.model, [lm.tok_encode(context)], config, should_stop=StopStrings(lm.tokenizer, stops, None))[0]
        assert text == postprocess_generated_text(lm.tok_decode(static), stops, None)
    assert got[0] == lm.tok_decode(ids)[: lm.tok_decode(ids).index(stop)]
    shared = len(lm.tok_encode(shots)) // lm.engine_config.block_size * lm.engine_config.block_size
    assert engines[0].stats().cached_prompt_tokens >= 3 * shared > 0  # requests 5-7 waited for a free sequence slot


def test_stop_strings_and_max_gen_toks_aliases(lm, monkeypatch):
    ids = greedy_ids(lm, CONTEXTS[0], 16)
    full = lm.tok_decode(ids)
    stop = lm.tok_decode(ids[6:8])
    assert stop.strip() and full.index(stop) >= len(lm.tok_decode(ids[:6]))  # a stop string first seen at token 6
    lengths = []
    monkeypatch.setattr(adapter, "run_requests", lambda *a: [lengths.append(len(o)) or o for o in run_requests(*a)])
    gen_kwargs = [{"until": [stop], "max_gen_toks": 16}, {"max_new_tokens": 5}, {"max_tokens": 5, "until": "never"}, {"max_completion_tokens": 5}]
    got = lm.generate_until(requests("generate_until", [(CONTEXTS[0], g) for g in gen_kwargs]))
    assert got == [full[: full.index(stop)], *[lm.tok_decode(ids[:5])] * 3]
    assert sorted(lengths) == [5, 5, 5, 8]  # generation stopped once the stop string was complete


def test_eos_ends_generation(lm):
    ids = greedy_ids(lm, CONTEXTS[2], 8)
    eos_id, target = lm.eot_token_id, ids[4]
    head = lm.model.head.weight
    saved = head[eos_id].clone()
    head[eos_id] = head[target] * 1.01  # EOS now wins wherever `target` was the greedy pick
    try:
        (text,) = lm.generate_until(requests("generate_until", [(CONTEXTS[2], {"until": [], "max_gen_toks": 8})]))
    finally:
        head[eos_id] = saved
    assert text == lm.tok_decode(ids[: ids.index(target)]) and EOS not in text


def test_strip_thinking(lm, monkeypatch):
    ids = greedy_ids(lm, CONTEXTS[1], 10)
    full, think_end = lm.tok_decode(ids), lm.tok_decode(ids[3:5])
    monkeypatch.setattr(lm, "think_end_token", think_end)
    (text,) = lm.generate_until(requests("generate_until", [(CONTEXTS[1], {"until": [], "max_gen_toks": 10})]))
    assert text == full.split(think_end)[-1].lstrip()
    # Stop strings inside the reasoning are ignored; the first one after </think> stops the row.
    pieces = lm.tokenizer.encode("Let me think. Question: is it 4?</think> It is 4. Question: next", add_special_tokens=False)
    for think_end_token, expected in [(None, "Let me think. Question:"), ("</think>", "</think> It is 4. Question:")]:
        stop = StopStrings(lm.tokenizer, ["Question:"], think_end_token)
        first = [stop(0, pieces[: i + 1]) for i in range(len(pieces))].index(True)
        assert lm.tok_decode(pieces[: first + 1]).endswith(expected)


def test_think_cutoff(lm, monkeypatch):
    """With strip_thinking, a generation that never closes its reasoning scores as no answer unless think_cutoff=keep."""
    request = requests("generate_until", [(CONTEXTS[1], {"until": ["Question:"], "max_gen_toks": 10})])
    full = lm.tok_decode(greedy_ids(lm, CONTEXTS[1], 10))
    assert END_THINK not in full
    monkeypatch.setattr(lm, "think_end_token", END_THINK)
    assert lm.generate_until(request) == [""]
    monkeypatch.setattr(lm, "think_cutoff", "keep")
    assert lm.generate_until(request) == [full.lstrip().split("Question:")[0]]  # lm-eval's postprocess: all of it
    assert until.answer("a</think> b", [], END_THINK, "empty") == "b" and until.answer("a", ["x"], None, "empty") == "a"


GSM8K_UNTIL = ["Question:", "</s>", "<|im_end|>"]  # evals/tasks/gsm8k_local/gsm8k_local.yaml's generation_kwargs
GSM8K_STRICT = r"#### (\-?[0-9\.\,]+)"
GSM8K_FLEXIBLE = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"


def gsm8k_extract(text: str, pattern: str, which: int) -> str:
    """gsm8k's regex filter: match `which` of the pattern, its first non-empty group; "[invalid]" if none."""
    matches = re.findall(pattern, text)
    if not matches:
        return "[invalid]"
    match = matches[which]
    if isinstance(match, tuple):
        match = next((m for m in match if m), "[invalid]")
    return match.strip()


def gsm8k_normalize(text: str) -> str:
    """gsm8k's exact_match: drop the regexes_to_ignore, ignore case."""
    for regex in (",", r"\$", "(?s).*#### ", r"\.$"):
        text = re.sub(regex, "", text)
    return text.lower()


@pytest.mark.slow  # a fresh interpreter; lm-eval alone spends ~15 s indexing its built-in tasks
def test_run_lm_eval_gsm8k_tiny(ckpt, tmp_path):
    """evals/run_lm_eval.py scores what the model generates: gsm8k_tiny's metrics equal gsm8k's extraction and
    exact match applied here to greedy completions from dsr1.engine.generation, and a 0-shot copy of it whose first target
    is the model's own completion (the second keeps its real answer) scores exactly 0.5."""
    model = load_model(ckpt, device="cpu", dtype=torch.float32, progress=False)  # as the run loads it: fp32 on CPU
    tok = load_tokenizer(ckpt)

    def completion(context: str) -> str:
        """Greedy, at most 16 tokens or up to EOS, cut at the first stop string."""
        text = decode(tok, generate(model, [encode_prompt(tok, context, chat=False)], GenerationConfig(16))[0])
        return min((text[: text.index(s)] for s in GSM8K_UNTIL if s in text), key=len, default=text)

    tiny = REPO / "evals" / "tasks" / "gsm8k_tiny"
    docs = [json.loads(line) for line in (tiny / "test.jsonl").read_text().splitlines()[:2]]
    own = completion(f"Question: {docs[0]['question']}\nAnswer:")
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(d) + "\n" for d in [{**docs[0], "answer": own}, docs[1]]))
    self_task = {
        "include": str(tiny / "gsm8k_tiny.yaml"), "task": "gsm8k_tiny_self", "num_fewshot": 0,
        "dataset_kwargs": {"data_files": {"train": str(tiny / "train.jsonl"), "test": str(tmp_path / "test.jsonl")}},
        "filter_list": [{"name": "whole", "filter": [{"function": "take_first"}]}],  # the whole completion
    }
    (tmp_path / "self.yaml").write_text(json.dumps(self_task))  # JSON is YAML

    cmd = [sys.executable, str(REPO / "evals" / "run_lm_eval.py"), "--model", "dsr1", "--model_args", f"ckpt_path={ckpt},max_gen_toks=16"]
    cmd += ["--device", "cpu", "--batch_size", "2", "--include_path", "evals/tasks", "--tasks", f"gsm8k_tiny,{tmp_path / 'self.yaml'}"]
    cmd += ["--limit", "2", "--output_path", str(tmp_path / "out"), "--log_samples"]
    subprocess.run(cmd, check=True, cwd=REPO, env={**OFFLINE, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]

    (samples_file,) = (f for f in (tmp_path / "out").rglob("samples_gsm8k_tiny_*.jsonl") if "_self_" not in f.name)
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert sorted((s["filter"], s["doc_id"]) for s in samples) == [(f, i) for f in ("flexible-extract", "strict-match") for i in (0, 1)]
    expected = {"strict-match": [], "flexible-extract": []}
    for s in samples:
        context = s["arguments"]["gen_args_0"]["arg_0"]  # the 5-shot prompt lm-eval built
        assert context.endswith(f"Question: {docs[s['doc_id']]['question']}\nAnswer:") and s["target"] == docs[s["doc_id"]]["answer"]
        text = completion(context)
        assert s["resps"] == [[text]]
        extracted = gsm8k_extract(text, GSM8K_STRICT, 0) if s["filter"] == "strict-match" else gsm8k_extract(text, GSM8K_FLEXIBLE, -1)
        assert s["filtered_resps"] == [extracted]
        score = float(gsm8k_normalize(extracted) == gsm8k_normalize(docs[s["doc_id"]]["answer"]))
        assert s["exact_match"] == score
        expected[s["filter"]].append(score)
    for name, scores in expected.items():
        assert results["gsm8k_tiny"][f"exact_match,{name}"] == pytest.approx(sum(scores) / len(scores))

    (own_file,) = (tmp_path / "out").rglob("samples_gsm8k_tiny_self_*.jsonl")
    own_samples = sorted((json.loads(line) for line in own_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert own_samples[0]["arguments"]["gen_args_0"]["arg_0"] == f"Question: {docs[0]['question']}\nAnswer:"
    assert own_samples[0]["resps"] == [[own]]
    assert [s["exact_match"] for s in own_samples] == [1.0, 0.0]
    assert results["gsm8k_tiny_self"]["exact_match,whole"] == 0.5


@pytest.mark.slow
def test_run_lm_eval_expert_parallel_matches_one_process(ckpt, tmp_path):
    """torchrun, EP=2 round-robin over gloo: the same generations (and scores) as one process."""
    base = ["--device", "cpu", "--batch_size", "2", "--include_path", "evals/tasks", "--tasks", "gsm8k_tiny", "--limit", "3", "--log_samples"]
    args = f"ckpt_path={ckpt},max_gen_toks=12"
    runs = {
        "one": [sys.executable, str(REPO / "evals" / "run_lm_eval.py"), "--model_args", args],
        "ep": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(REPO / "evals" / "run_lm_eval.py"),
               "--model_args", args + ",ep=2,expert_placement=round_robin,all2all=torch"],
    }
    resps = {}
    for name, cmd in runs.items():
        subprocess.run([*cmd, "--model", "dsr1", *base, "--output_path", str(tmp_path / name)], check=True, cwd=REPO,
                       env={**OFFLINE, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        (samples,) = (tmp_path / name).rglob("samples_gsm8k_tiny_*.jsonl")
        resps[name] = [json.loads(line)["resps"] for line in samples.read_text().splitlines()]
    assert len(resps["one"]) == 3 * 2 and resps["ep"] == resps["one"]  # 3 docs, one line per filter
