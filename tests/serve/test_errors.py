"""Every bad request is a 4xx OpenAI error body naming the field, and the server answers the next one;
a client that leaves mid-stream gets its request aborted and its cache blocks freed."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
import requests

from tests.serve.fake_engine import FakeEngine, scripted_logits
from tests.serve.harness import REPLY, VOCAB, Server

OK = {"model": "dsr1", "prompt": "Hi", "max_tokens": 2, "temperature": 0}
CHAT = {"model": "dsr1", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}

# (path, body, status, param, words the message holds)
CASES = {
    "malformed-json": ("/v1/completions", b'{"prompt": "Hi",', 400, None, ["not valid JSON"]),
    "not-an-object": ("/v1/completions", [1, 2], 400, None, ["JSON object", "list"]),
    "unknown-field": ("/v1/completions", {**OK, "temprature": 0}, 400, "temprature", ["unknown field"]),
    "unknown-model": ("/v1/completions", {**OK, "model": "gpt-4"}, 404, "model", ["'gpt-4'", "'dsr1'"]),
    "prompt-missing": ("/v1/completions", {"max_tokens": 2}, 400, "prompt", ["non-empty string"]),
    "prompt-wrong-type": ("/v1/completions", {**OK, "prompt": 3}, 400, "prompt", ["token ids"]),
    "prompt-bad-token": ("/v1/completions", {**OK, "prompt": [1, VOCAB]}, 400, "prompt", [f"[0, {VOCAB})"]),
    "prompt-too-long": ("/v1/completions", {**OK, "prompt": [0] * 300}, 400, "prompt", ["300 tokens", "256", "--max-seq-len"]),
    "max-tokens-negative": ("/v1/completions", {**OK, "max_tokens": -1}, 400, "max_tokens", [">= 0", "-1"]),
    "max-tokens-string": ("/v1/completions", {**OK, "max_tokens": "8"}, 400, "max_tokens", ["integer"]),
    "max-tokens-huge": ("/v1/completions", {**OK, "max_tokens": 10**9}, 400, "max_tokens", ["beyond the context of 256"]),
    "temperature-high": ("/v1/completions", {**OK, "temperature": 2.5}, 400, "temperature", ["[0.0, 2.0]", "2.5"]),
    "temperature-string": ("/v1/completions", {**OK, "temperature": "hot"}, 400, "temperature", ["number"]),
    "top-p-zero": ("/v1/completions", {**OK, "top_p": 0}, 400, "top_p", ["(0.0, 1.0]"]),
    "n-two": ("/v1/completions", {**OK, "n": 2}, 400, "n", ["n=1"]),
    "logprobs-21": ("/v1/completions", {**OK, "logprobs": 21}, 400, "logprobs", ["[0, 20]"]),
    "stop-empty": ("/v1/completions", {**OK, "stop": [""]}, 400, "stop", ["non-empty string"]),
    "stream-not-bool": ("/v1/completions", {**OK, "stream": "yes"}, 400, "stream", ["true or false"]),
    "add-special-tokens-not-bool": ("/v1/completions", {**OK, "add_special_tokens": 1}, 400, "add_special_tokens", ["true or false"]),
    "seed-float": ("/v1/completions", {**OK, "seed": 1.5}, 400, "seed", ["integer"]),
    "penalty": ("/v1/completions", {**OK, "presence_penalty": 1.0}, 400, "presence_penalty", ["not supported"]),
    "chat-no-messages": ("/v1/chat/completions", {"model": "dsr1"}, 400, "messages", ["non-empty list"]),
    "chat-bad-role": ("/v1/chat/completions", {**CHAT, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages", ["role='tool'"]),
    "chat-logprobs": ("/v1/chat/completions", {**CHAT, "logprobs": True}, 400, "logprobs", ["not supported"]),
    "unknown-path": ("/v1/embeddings", {}, 404, None, ["/v1/embeddings"]),
    "body-too-large": ("/v1/completions", {**OK, "prompt": "a" * (1 << 20)}, 413, None, ["1048576"]),
}


@pytest.mark.parametrize("path,body,status,param,words", CASES.values(), ids=CASES.keys())
def test_bad_request(fake_server, path, body, status, param, words):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = requests.post(fake_server.url + path, data=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    for word in words:
        assert word in error["message"]
    assert requests.post(fake_server.url + "/v1/completions", json=OK).status_code == 200  # still serving


def test_too_many_concurrent_requests(tokenizer):
    server = Server(FakeEngine(tokenizer, scripted_logits(tokenizer, REPLY, VOCAB), step_s=0.02), max_concurrent=1)
    try:
        with requests.post(server.url + "/v1/completions", json={**OK, "max_tokens": 30, "ignore_eos": True, "stream": True}, stream=True) as first:
            lines = first.iter_lines()  # kept: a discarded line iterator closes the connection
            next(lines)  # the first request is streaming
            r = requests.post(server.url + "/v1/completions", json=OK)
            assert r.status_code == 429 and "--max-concurrent 1" in r.json()["error"]["message"]
    finally:
        server.close()


def test_client_leaving_mid_stream_frees_its_blocks(tokenizer):
    engine = FakeEngine(tokenizer, scripted_logits(tokenizer, REPLY, VOCAB), step_s=0.02)
    server = Server(engine)

    async def leave_early():
        async with aiohttp.ClientSession() as http:
            body = {**OK, "prompt": [5] * 40, "max_tokens": 200, "ignore_eos": True, "stream": True}
            async with http.post(server.url + "/v1/completions", json=body) as r:
                async for line in r.content:
                    if line.startswith(b"data: "):
                        break  # one token in: leave

    try:
        asyncio.run(leave_early())
        for _ in range(200):
            stats = server.engine_loop.snapshot.stats
            if not engine.has_unfinished_requests() and stats.running == 0:
                break
            time.sleep(0.02)
        assert not engine.has_unfinished_requests() and engine.stats().used_blocks == 0
        assert 0 < engine.stats().generated_tokens < 100  # aborted long before its 200 tokens
    finally:
        server.close()
