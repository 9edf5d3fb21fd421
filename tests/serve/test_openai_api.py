"""The OpenAI surface over the scripted FakeEngine, through the official openai client: completions,
chat with R1's reasoning split, streaming that adds up to the plain answer, models, health, metrics."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest

from tests.serve.harness import REPLY

PROMPT = "What is 2 + 2?"


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def get(server, path: str) -> tuple[int, str]:
    with urllib.request.urlopen(server.url + path) as r:
        return r.status, r.read().decode()


def test_completion(fake_server, tokenizer):
    out = client(fake_server).completions.create(model="dsr1", prompt=PROMPT, max_tokens=6, temperature=0)
    script = tokenizer.encode(REPLY, add_special_tokens=False)
    (choice,) = out.choices
    assert choice.text == tokenizer.decode(script[:6]) and choice.finish_reason == "length"
    n_prompt = 1 + len(tokenizer.encode(PROMPT, add_special_tokens=False))  # with the BOS the server adds
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (n_prompt, 6, n_prompt + 6)
    assert out.model == "dsr1" and out.object == "text_completion"


def test_completion_prompt_forms_and_stop(fake_server, tokenizer):
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    out = client(fake_server).completions.create(model="dsr1", prompt=[PROMPT, ids, ids[:2]], max_tokens=40, temperature=0, stop=["= 4"])
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert {c.text for c in out.choices} == {"Let me think: 2 + 2 "} and {c.finish_reason for c in out.choices} == {"stop"}
    assert out.usage.prompt_tokens == 3 + 2 * len(ids) + 2  # each with a BOS


def test_chat_splits_reasoning(fake_server):
    out = client(fake_server).chat.completions.create(model="dsr1", messages=[{"role": "user", "content": PROMPT}], max_tokens=64, temperature=0)
    message = out.choices[0].message
    assert message.reasoning_content == "Let me think: 2 + 2 = 4." and message.content == "\n\nThe answer is 4."
    assert out.choices[0].finish_reason == "stop" and message.role == "assistant"


def test_streams_add_up_to_the_plain_answer(fake_server):
    c = client(fake_server)
    plain = c.completions.create(model="dsr1", prompt=PROMPT, max_tokens=30, temperature=0)
    chunks = list(c.completions.create(model="dsr1", prompt=PROMPT, max_tokens=30, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == plain.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens

    messages = [{"role": "user", "content": PROMPT}]
    whole = c.chat.completions.create(model="dsr1", messages=messages, max_tokens=64, temperature=0).choices[0].message
    deltas = [ch.choices[0].delta for ch in c.chat.completions.create(model="dsr1", messages=messages, max_tokens=64, temperature=0, stream=True)]
    assert deltas[0].role == "assistant"
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == whole.reasoning_content
    assert "".join(d.content or "" for d in deltas) == whole.content


def test_models_health_metrics(fake_server):
    (model,) = client(fake_server).models.list().data
    assert model.id == "dsr1"
    assert get(fake_server, "/health") == (200, json.dumps({"status": "ok"}))
    client(fake_server).completions.create(model="dsr1", prompt=PROMPT, max_tokens=5, temperature=0)
    status, text = get(fake_server, "/metrics")
    values = {line.split("{")[0]: float(line.split()[-1]) for line in text.splitlines() if not line.startswith("#")}
    n_prompt = 1 + len(fake_server.ctx.tokenizer.encode(PROMPT, add_special_tokens=False))
    assert status == 200 and values["dsr1_prompt_tokens_total"] == n_prompt and values["dsr1_generation_tokens_total"] == 5
    assert values["dsr1_requests_running"] == 0 and values["dsr1_cache_blocks_used"] == 0 and values["dsr1_cache_blocks_total"] == 256
    assert values["dsr1_generation_tokens_per_second"] > 0 and values["dsr1_requests_finished_total"] == 1


@pytest.mark.parametrize("temperature", [0.7])
def test_seeded_sampling_repeats(fake_server, temperature):
    c = client(fake_server)
    runs = [c.completions.create(model="dsr1", prompt=PROMPT, max_tokens=8, temperature=temperature, seed=3).choices[0].text for _ in range(2)]
    assert runs[0] == runs[1]
