"""A small engine with dsr1.engine.engine.Engine's contract, for testing the server alone.

Each step gives every running request one token chosen from `logits_fn(ids so far)` (greedy at
temperature 0, else sampled from a generator seeded per request), with the contract's stop rules:
EOS unless ignore_eos, stop strings (trimmed from the text), max_tokens. Cache blocks are counted
as the real engine counts them (ceil(tokens / block_size) per running request), so tests can check
that finished and aborted requests give theirs back.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

import torch

from dsr1.engine.engine import EngineStats, RequestOutput
from dsr1.engine.sampling import TokenLogprob
from dsr1.tokenizer import decode


def scripted_logits(tokenizer, reply: str, vocab_size: int):
    """logits_fn whose greedy reply is `reply`'s tokens, then EOS; a fixed random background elsewhere."""
    script = tokenizer.encode(reply, add_special_tokens=False) + [tokenizer.eos_token_id]
    background = torch.randn(vocab_size, generator=torch.Generator().manual_seed(0))

    def logits(ids: list[int], n_generated: int) -> torch.Tensor:
        out = background.clone()
        out[script[min(n_generated, len(script) - 1)]] += 20.0
        return out

    return logits


@dataclass
class _Seq:
    request_id: str
    prompt: list[int]
    params: object
    generator: torch.Generator
    ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None


class FakeEngine:
    def __init__(self, tokenizer, logits_fn, block_size: int = 16, num_blocks: int = 256, max_num_seqs: int = 64, step_s: float = 0.0):
        self.tokenizer, self.logits_fn, self.step_s = tokenizer, logits_fn, step_s  # step_s: each step's least duration
        self.block_size, self.num_blocks, self.max_num_seqs = block_size, num_blocks, max_num_seqs
        self.waiting: list[_Seq] = []
        self.running: list[_Seq] = []
        self.counts = dict(prompt_tokens=0, cached_prompt_tokens=0, generated_tokens=0, preemptions=0, finished=0)
        self._ids = itertools.count()

    def add_request(self, prompt_token_ids: list[int], params, request_id: str | None = None) -> str:
        if not prompt_token_ids:
            raise ValueError("prompt_token_ids: expected at least one token")
        request_id = request_id or f"req-{next(self._ids)}"
        generator = torch.Generator().manual_seed(0 if params.seed is None else params.seed)
        self.waiting.append(_Seq(request_id, list(prompt_token_ids), params, generator))
        return request_id

    def abort_request(self, request_id: str) -> None:
        self.waiting = [s for s in self.waiting if s.request_id != request_id]
        self.running = [s for s in self.running if s.request_id != request_id]

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[RequestOutput]:
        time.sleep(self.step_s)
        while self.waiting and len(self.running) < self.max_num_seqs and self._used() + self._blocks(self.waiting[0]) + 1 <= self.num_blocks:
            seq = self.waiting.pop(0)
            self.counts["prompt_tokens"] += len(seq.prompt)
            if seq.params.prompt_logprobs is not None:
                seq.prompt_logprobs = [None] + [self._entry(seq.prompt[:k], 0, seq.prompt[k], seq.params.prompt_logprobs) for k in range(1, len(seq.prompt))]
            self.running.append(seq)
        outputs = [self._advance(seq) for seq in self.running]
        self.running = [seq for seq, out in zip(self.running, outputs) if not out.finished]
        self.counts["finished"] += sum(out.finished for out in outputs)
        return outputs

    def stats(self) -> EngineStats:
        return EngineStats(waiting=len(self.waiting), running=len(self.running), used_blocks=self._used(), total_blocks=self.num_blocks, **self.counts)

    def _advance(self, seq: _Seq) -> RequestOutput:
        p = seq.params
        logits = self.logits_fn(seq.prompt + seq.ids, len(seq.ids)).float()
        if p.temperature == 0:
            token = int(logits.argmax())
        else:
            token = int(torch.multinomial(torch.softmax(logits / p.temperature, -1), 1, generator=seq.generator))
        seq.ids.append(token)
        self.counts["generated_tokens"] += 1
        if p.logprobs is not None:
            seq.logprobs.append(self._entry(None, logits, token, p.logprobs))
        eos = token == self.tokenizer.eos_token_id and not p.ignore_eos
        text = decode(self.tokenizer, seq.ids)
        cut = min((text.index(s) for s in p.stop if s in text), default=None)
        reason = "stop" if eos or cut is not None else "length" if len(seq.ids) >= p.max_tokens else None
        return RequestOutput(
            seq.request_id, seq.prompt, list(seq.ids), [token], text if cut is None else text[:cut], reason is not None, reason,
            list(seq.logprobs) if p.logprobs is not None else None, seq.prompt_logprobs, 0,
        )

    def _entry(self, prefix: list[int] | None, logits, token: int, top_n: int) -> TokenLogprob:
        if prefix is not None:
            logits = self.logits_fn(prefix, 0).float()
        logprobs = torch.log_softmax(logits, -1)
        top = logprobs.topk(top_n) if top_n else None
        return TokenLogprob(token, float(logprobs[token]), [] if top is None else list(zip(top.indices.tolist(), top.values.tolist())))

    def _blocks(self, seq: _Seq) -> int:
        return math.ceil((len(seq.prompt) + len(seq.ids)) / self.block_size)

    def _used(self) -> int:
        return sum(map(self._blocks, self.running))
