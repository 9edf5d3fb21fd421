"""Many concurrent streaming clients (256; `DSR1_SERVE_CLIENTS=N` for another count) all complete, each with its
own whole answer: none lost, none duplicated, none mixed with another's. On the scripted FakeEngine and on
the real Engine with the tiny model, whose answers must equal its own greedy ones."""

from __future__ import annotations

import asyncio
import os

import openai
import pytest
import torch

from dsr1.engine.engine import Engine, EngineConfig, SamplingParams
from tests.serve.fake_engine import FakeEngine
from tests.serve.harness import VOCAB, Server

CLIENTS = int(os.environ.get("DSR1_SERVE_CLIENTS", "256"))
MAX_TOKENS = 5


def repeat_last_token(ids: list[int], n_generated: int) -> torch.Tensor:
    """logits_fn that repeats the prompt's last token, so each client can tell its own answer."""
    out = torch.zeros(VOCAB)
    out[ids[-1]] = 1.0
    return out


@pytest.mark.parametrize("kind", ["fake", "real"])
def test_concurrent_streaming_clients(kind, tokenizer, make_checkpoint):
    prompts = [[0, 100 + i, 1000 + 7 * i] for i in range(CLIENTS)]
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    if kind == "fake":
        engine = FakeEngine(tokenizer, repeat_last_token, num_blocks=4 * CLIENTS, max_num_seqs=CLIENTS)
        expected = [tokenizer.decode([p[-1]] * MAX_TOKENS) for p in prompts]
    else:
        from dsr1 import load_model

        model = load_model(make_checkpoint(), device="cpu", dtype=torch.float32, progress=False)
        expected = [out.text for out in Engine(model, tokenizer, EngineConfig(num_blocks=2 * CLIENTS + 1)).generate(prompts, params)]
        engine = Engine(model, tokenizer, EngineConfig(block_size=4, num_blocks=4 * CLIENTS, max_num_seqs=CLIENTS, max_model_len=64))
    server = Server(engine, max_model_len=64)
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)

    async def one(i: int) -> tuple[int, str, str]:
        stream = await client.completions.create(model="dsr1", prompt=prompts[i], max_tokens=MAX_TOKENS, temperature=0, stream=True, extra_body={"ignore_eos": True})
        text, reasons = "", []
        async for chunk in stream:
            text += chunk.choices[0].text
            reasons.append(chunk.choices[0].finish_reason)
        return i, text, reasons[-1]

    async def all_clients():
        try:
            return await asyncio.gather(*(one(i) for i in range(CLIENTS)))
        finally:
            await client.close()

    try:
        results = asyncio.run(all_clients())
    finally:
        server.close()
    assert [i for i, _, _ in results] == list(range(CLIENTS))
    assert [text for _, text, _ in results] == expected and {reason for _, _, reason in results} == {"length"}
    assert engine.stats().finished == CLIENTS and engine.stats().used_blocks == 0
