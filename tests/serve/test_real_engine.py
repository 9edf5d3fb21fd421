"""The server over the real Engine and the tiny model: greedy answers equal the engine's own, streams add up
to them, echo + logprobs equal log_softmax of a full forward (what lm-eval's local-completions scores), a
client leaving mid-stream frees its cache blocks (test_load.py runs many clients on it)."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import openai
import pytest
import torch

from dsr1 import load_model
from dsr1.engine.engine import Engine, EngineConfig, SamplingParams
from tests.serve.harness import Server

PROMPT_IDS = [0, 9, 10, 11, 12, 13, 14, 15, 16, 17]


@pytest.fixture(scope="module")
def model(make_checkpoint):
    torch.set_num_threads(1)
    return load_model(make_checkpoint(), device="cpu", dtype=torch.float32, progress=False)


@pytest.fixture
def server(model, tokenizer):
    server = Server(Engine(model, tokenizer, EngineConfig(block_size=4, num_blocks=512, max_model_len=256)))
    yield server
    server.close()


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def test_greedy_text_and_stream_equal_the_engine(server, model, tokenizer):
    own = Engine(model, tokenizer, EngineConfig(block_size=4, num_blocks=64)).generate([PROMPT_IDS], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    c = client(server)
    plain = c.completions.create(model="dsr1", prompt=PROMPT_IDS, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert plain.choices[0].text == own.text and plain.usage.completion_tokens == 8
    stream = c.completions.create(model="dsr1", prompt=PROMPT_IDS, max_tokens=8, temperature=0, stream=True, extra_body={"ignore_eos": True})
    assert "".join(chunk.choices[0].text for chunk in stream) == own.text


@pytest.mark.parametrize("sent,seen,extra", [
    (PROMPT_IDS, PROMPT_IDS, {}),  # starts with BOS: the model sees it as sent
    (PROMPT_IDS[1:], PROMPT_IDS, {}),  # the server puts a BOS first and leaves it out of the echo
    (PROMPT_IDS[1:], PROMPT_IDS[1:], {"add_special_tokens": False}),  # exactly as sent
], ids=["bos", "bos-added", "no-special-tokens"])
def test_echo_logprobs_equal_a_full_forward(server, model, tokenizer, sent, seen, extra):
    out = client(server).completions.create(model="dsr1", prompt=sent, max_tokens=1, temperature=0, echo=True, logprobs=2, extra_body=extra)
    lp = out.choices[0].logprobs
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([seen]))[0].float(), -1)  # [s, v]
    n, added = len(sent), len(seen) - len(sent)
    assert len(lp.token_logprobs) == n + 1 and (lp.token_logprobs[0] is None) == (not added) and out.usage.prompt_tokens == len(seen)
    for p in range(1 - added, n):  # sent[p] is seen[p + added], scored by the logits one position before
        assert lp.token_logprobs[p] == pytest.approx(float(expected[p + added - 1, sent[p]]), abs=1e-4)
        top = expected[p + added - 1].topk(2)
        assert sorted(lp.top_logprobs[p].values())[-1] == pytest.approx(float(top.values[0]), abs=1e-4)
    generated = int(expected[-1].argmax())
    assert lp.token_logprobs[-1] == pytest.approx(float(expected[-1, generated]), abs=1e-4)
    assert lp.tokens == [tokenizer.decode([t]) for t in [*sent, generated]]
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(n + 1)]
    assert out.choices[0].text == tokenizer.decode(sent) + tokenizer.decode([generated])

    scored = client(server).completions.create(model="dsr1", prompt=sent, max_tokens=0, echo=True, logprobs=0, extra_body=extra)
    assert scored.choices[0].logprobs.token_logprobs == lp.token_logprobs[:n] and scored.usage.completion_tokens == 0


def test_client_leaving_mid_stream_frees_its_blocks(server):
    async def leave_early():
        async with aiohttp.ClientSession() as http:
            body = {"prompt": PROMPT_IDS, "max_tokens": 200, "ignore_eos": True, "stream": True, "temperature": 0}
            async with http.post(server.url + "/v1/completions", json=body) as r:
                async for line in r.content:
                    if line.startswith(b"data: "):
                        break  # one token in: leave

    asyncio.run(leave_early())
    for _ in range(500):  # until the engine thread has taken the abort
        if server.engine_loop.snapshot.stats.running + server.engine_loop.snapshot.stats.waiting == 0:
            break
        time.sleep(0.01)
    stats = server.engine_loop.snapshot.stats
    assert stats.running == 0 and stats.waiting == 0 and stats.used_blocks == 0 and stats.generated_tokens < 200
