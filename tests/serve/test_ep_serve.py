"""The server under expert parallelism (dsr1.serve.distributed): 2 gloo ranks on CPU, each with its own Engine,
rank 0 serving HTTP. Greedy answers over HTTP equal the single-process engine's in fp32; concurrent requests
land on both ranks; a request a worker rank's engine refuses is a 400; clients leaving mid-stream abort their
requests on both ranks and free their blocks; after idle heartbeat rounds the server still answers."""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict
from pathlib import Path

import aiohttp
import openai
import torch
import torch.distributed as dist
from tests.parallel.ep_spawn import run_ranks
from tests.serve.harness import Server

import dsr1
from dsr1 import ParallelConfig
from dsr1.engine.engine import Engine, EngineConfig, SamplingParams
from dsr1.serve.distributed import expert_parallel
from dsr1.tokenizer import load_tokenizer

VOCAB = 1024  # a small vocabulary: the test is about the ranks' rounds
PROMPTS = [[0, *range(20 + 7 * i, 26 + 8 * i)] for i in range(4)]  # 6 to 9 tokens
MAX_TOKENS = 6
# 24 usable blocks of 4 tokens per rank: PROMPTS' requests fit together, a 110-token request never fits.
CONFIG = EngineConfig(block_size=4, num_blocks=25, max_num_batched_tokens=8, max_model_len=128)
STREAM_TOKENS = 80  # the streams the clients leave: long enough to be running when they leave


def rank_main(rank: int, world: int, ckpt: str, out: str) -> None:
    parallel = ParallelConfig(world, "round_robin", "torch", max_dispatch_tokens=4)
    model = dsr1.load_model(ckpt, device="cpu", dtype=torch.float32, progress=False, parallel=parallel, rank=rank, group=dist.group.WORLD)
    front = expert_parallel(Engine(model, load_tokenizer(ckpt), CONFIG, dist.group.WORLD))
    if front is None:  # rank 1: followed rank 0's rounds until the server stopped
        return
    server = Server(front, max_model_len=CONFIG.max_model_len, vocab=VOCAB, heartbeat_s=0.05)
    try:
        result = asyncio.run(clients(server, front))
    finally:
        server.close()
    Path(out).write_text(json.dumps(result))


async def clients(server: Server, front) -> dict:
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)

    async def complete(prompt: list[int]) -> str:
        out = await client.completions.create(model="dsr1", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})
        return out.choices[0].text

    result = {"texts": await asyncio.gather(*map(complete, PROMPTS))}
    result["finished"] = [s.finished for s in front.rank_stats]
    async with aiohttp.ClientSession() as http:
        streams = []
        for _ in range(2):  # the first lands on rank 0; while it runs, the next request goes to rank 1
            body = {"prompt": PROMPTS[0], "max_tokens": STREAM_TOKENS, "ignore_eos": True, "stream": True, "temperature": 0}
            streams.append(await http.post(server.url + "/v1/completions", json=body))
            await streams[-1].content.readline()  # its first token came: it is running
            if len(streams) == 1:
                async with http.post(server.url + "/v1/completions", json={"prompt": [0] * 10, "max_tokens": 100}) as r:
                    result["refused"] = (r.status, (await r.json())["error"]["message"])
        result["running"] = [s.running for s in front.rank_stats]
        for r in streams:
            r.close()  # the client leaves mid-stream
    for _ in range(500):  # until both ranks took the aborts
        if front.stats().running + front.stats().waiting == 0:
            break
        await asyncio.sleep(0.01)
    result["after_abort"] = [asdict(s) for s in front.rank_stats]
    await asyncio.sleep(0.3)  # idle: the engine thread runs heartbeat rounds
    result["after_idle"] = await complete(PROMPTS[0])
    await client.close()
    return result


def test_ep_server_equals_one_process(make_checkpoint, tmp_path):
    ckpt = make_checkpoint({"vocab_size": VOCAB}, dtype="bf16")
    run_ranks(rank_main, 2, str(ckpt), str(tmp_path / "result.json"))
    got = json.loads((tmp_path / "result.json").read_text())
    single = Engine(dsr1.load_model(ckpt, device="cpu", dtype=torch.float32, progress=False), load_tokenizer(ckpt), CONFIG)
    expected = [out.text for out in single.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))]
    assert got["texts"] == expected and got["after_idle"] == expected[0]
    assert sum(got["finished"]) == 4 and min(got["finished"]) >= 1  # the concurrent requests used both ranks
    status, message = got["refused"]
    assert status == 400 and "needs 28 cache blocks, but the pool has 24" in message
    assert got["running"] == [1, 1]
    for rank in got["after_abort"]:
        assert rank["running"] == rank["waiting"] == rank["used_blocks"] == 0 and rank["generated_tokens"] < 2 * MAX_TOKENS + STREAM_TOKENS
