"""lm-eval 0.4.13's `local-completions` model against the server gives what `--model dsr1` gives on the same model
(the tiny checkpoint, fp32 on CPU): the same gsm8k_tiny prompts, completions, extracted answers and scores, and
the same loglikelihoods."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from dsr1.engine.engine import Engine, EngineConfig  # noqa: E402
from dsr1.eval.lm_eval import DSR1LM  # noqa: E402
from tests.serve.harness import Server  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MAX_GEN_TOKS = 32  # long enough that a missing BOS would change the tiny model's completions
MAX_LENGTH = 1024  # the server's context; lm-eval's local-completions keeps prompts to max_length - 1 tokens


@pytest.fixture(scope="module")
def ckpt(make_checkpoint) -> Path:
    return make_checkpoint()


@pytest.fixture(scope="module")
def dsr1_lm(ckpt) -> DSR1LM:
    return DSR1LM(ckpt_path=str(ckpt), device="cpu", dtype="float32", max_length=MAX_LENGTH, max_gen_toks=MAX_GEN_TOKS, batch_size=2)


@pytest.fixture(scope="module")
def server_lm(dsr1_lm, ckpt):
    """local-completions, built from the model_args string the docs give, against a server on dsr1_lm's model."""
    server = Server(Engine(dsr1_lm.model, dsr1_lm.tokenizer, EngineConfig(num_blocks=512)), max_model_len=MAX_LENGTH)
    model_args = (f"model=dsr1,base_url={server.url}/v1/completions,tokenizer_backend=huggingface,tokenizer={ckpt},"
                  f"tokenized_requests=True,add_bos_token=True,max_length={MAX_LENGTH},max_gen_toks={MAX_GEN_TOKS},num_concurrent=2,max_retries=1")
    yield get_model("local-completions").create_from_arg_string(model_args, {"batch_size": 1})
    server.close()


def evaluate(lm) -> tuple[dict, list[dict]]:
    """gsm8k_tiny (5-shot, two documents) -> (its metrics, its samples in (filter, doc_id) order)."""
    out = lm_eval.simple_evaluate(model=lm, tasks=["gsm8k_tiny"], task_manager=TaskManager(include_path=str(REPO / "evals" / "tasks"), include_defaults=False),
                                  limit=2, log_samples=True, bootstrap_iters=0)
    return out["results"]["gsm8k_tiny"], sorted(out["samples"]["gsm8k_tiny"], key=lambda s: (s["filter"], s["doc_id"]))


def test_gsm8k_through_the_server_equals_dsr1(dsr1_lm, server_lm, monkeypatch):
    monkeypatch.chdir(REPO)  # the task's data_files are relative to the repository root
    (ours, our_samples), (theirs, their_samples) = evaluate(dsr1_lm), evaluate(server_lm)
    keys = ("doc_id", "filter", "arguments", "resps", "filtered_resps", "exact_match")
    assert [{k: s[k] for k in keys} for s in their_samples] == [{k: s[k] for k in keys} for s in our_samples]
    assert len(our_samples) == 4 and all(s["resps"][0][0] for s in our_samples)  # 2 documents x 2 filters, none empty
    metrics = ("exact_match,strict-match", "exact_match,flexible-extract")
    assert {m: theirs[m] for m in metrics} == {m: ours[m] for m in metrics}


def test_loglikelihood_through_the_server_equals_dsr1(dsr1_lm, server_lm):
    pairs = [("Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer:", " 7"), ("The capital of France is", " Paris, a city"), ("", "Hello")]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
    ours, theirs = dsr1_lm.loglikelihood(requests), server_lm.loglikelihood(requests)
    assert [greedy for _, greedy in theirs] == [greedy for _, greedy in ours]
    assert [score for score, _ in theirs] == pytest.approx([score for score, _ in ours], abs=1e-4)
