"""The scheduler: which requests run in a step and which of their positions, continuous batching over a
fixed pool of cache blocks (dsr1/engine/blocks.py).

Every request computes the positions [num_computed, len(token_ids)) whose latent rows are not yet in its
blocks; when it has computed its last token, that token's logits choose the next one. A request with one such
position left (a decoding request, or a prompt whose other tokens came from the prefix cache) is a decode row;
one with more is a prefill row, given at most the step's remaining token budget (max_num_batched_tokens): a
long prompt is prefilled in chunks over several steps. Requests are admitted first come, first served, while
max_num_seqs and the free blocks allow; a step that would otherwise only decode admits them once admit_batch
of them (or all that wait) fit, since their prefill is a forward of its own beside the decode rows' and each
forward has a fixed cost: fewer, larger admissions keep the running requests' time per token down. When a
running request needs a block and none is free, the most recently admitted running request is preempted: its blocks go back (its full blocks stay in the prefix cache)
and it waits at the front of the queue to be recomputed, prompt and generated tokens alike.

A block enters the prefix cache only once computed, so requests that share a prefix and arrive together would
all compute it. Instead, an admitted request marks the keys of the prompt blocks it will compute as pending
(its prompt's tokens give them), and a waiting request whose next uncached block is pending waits (and, first
come first served, those behind it) until the block is cached, then reads it from the cache. It never waits
for nothing: a pending key belongs to a running request, which computes the block in this step or a later one,
or withdraws its keys when it is preempted or finishes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from dsr1.engine.blocks import BlockManager, block_hash
from dsr1.engine.detokenize import Detokenizer
from dsr1.engine.sampling import SamplingParams, TokenLogprob


@dataclass(eq=False)
class Request:
    """One request's state: its tokens, its blocks, how far its cache is computed, what it has returned."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    token_ids: list[int] = field(default_factory=list)  # prompt, then generated tokens
    block_table: list[int] = field(default_factory=list)
    block_keys: list[int] = field(default_factory=list)  # prefix-cache keys of its computed full blocks
    prompt_keys: list[int] = field(default_factory=list)  # the keys of its prompt's full blocks (with prefix caching)
    num_computed: int = 0  # positions whose latent rows are in its blocks
    num_cached_tokens: int = -1  # prompt tokens served from the prefix cache at first admission; -1 before it
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    detokenizer: Detokenizer | None = None  # its output text, with a tokenizer
    finish_reason: str | None = None

    def __post_init__(self):
        self.token_ids = list(self.prompt_token_ids)
        if self.params.logprobs is not None:
            self.logprobs = []
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]  # the first prompt token has nothing before it to be scored on

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def remaining(self) -> int:
        """Positions still to compute before the next token can be chosen."""
        return len(self.token_ids) - self.num_computed

    @property
    def needs_prompt_logits(self) -> bool:
        """Whether prompt logprobs are still owed: then every prompt position is computed, none read from the
        prefix cache, as their logits are needed."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_token_ids)


@dataclass
class Plan:
    """One step: decode rows compute one position each, prefill rows (request, n) their next n positions."""

    decode: list[Request]
    prefill: list[tuple[Request, int]]


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, admit_batch: int = 1):
        self.blocks, self.max_num_seqs, self.max_num_batched_tokens = blocks, max_num_seqs, max_num_batched_tokens
        self.admit_batch = admit_batch
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the last is preempted first
        self.pending: dict[int, Request] = {}  # key of a prompt block -> the running request that computes it (or did)
        self.preemptions = self.prompt_tokens = self.cached_prompt_tokens = 0

    def add(self, req: Request) -> None:
        if self.blocks.prefix_caching:
            req.prompt_keys = self.blocks.keys(req.prompt_token_ids)
        self.waiting.append(req)

    def schedule(self) -> Plan:
        """Choose this step's rows, reserving the blocks they write (preempting where blocks run out)."""
        plan, budget, preempted = Plan([], []), self.max_num_batched_tokens, []
        for req in list(self.running):
            if req not in self.running:  # preempted this step for an older request
                continue
            n = _chunk(req.remaining, budget)
            if n and self._reserve(req, n, preempted):
                budget -= _add_row(plan, req, n)
        free = self.max_num_seqs - len(self.running)
        if plan.decode and not plan.prefill and free < min(self.admit_batch, len(self.waiting)):
            return plan  # admissions wait for a batch worth a prefill forward of their own
        while self.waiting and len(self.running) < self.max_num_seqs and self.waiting[0] not in preempted:
            n = self._admit(self.waiting[0], budget)
            if not n:
                break
            budget -= _add_row(plan, self.waiting.popleft(), n)
        return plan

    def computed(self, req: Request, n: int) -> None:
        """req's next n positions are now in its blocks: key the blocks this filled for the prefix cache."""
        req.num_computed += n
        size = self.blocks.block_size
        for i in range(len(req.block_keys), req.num_computed // size):
            tokens = tuple(req.token_ids[i * size : (i + 1) * size])
            req.block_keys.append(block_hash(req.block_keys[-1] if req.block_keys else None, tokens))
            self.blocks.register(req.block_table[i], req.block_keys[-1], tokens)

    def finish(self, req: Request) -> None:
        """Take req out of the queues and give back its blocks (a finished or aborted request)."""
        if req in self.waiting:
            self.waiting.remove(req)
        if req in self.running:
            self.running.remove(req)
        self._release(req)

    def _admit(self, req: Request, budget: int) -> int:
        """Admit the first waiting request if its first chunk's blocks are free -> positions it computes this
        step (0: not admitted). Its prompt's longest cached prefix of full blocks is reused, not recomputed."""
        hits, keys = ([], []) if req.needs_prompt_logits else self.blocks.match(req.token_ids)
        start = len(hits) * self.blocks.block_size
        n = _chunk(len(req.token_ids) - start, budget)
        need = self.blocks.blocks_for(start + n) - len(hits)
        if not n or need + self.blocks.n_reviving(hits) > self.blocks.n_free or self._awaits(req, len(hits)):
            return 0
        self.blocks.acquire(hits)
        for key in req.prompt_keys[len(hits) :]:
            self.pending.setdefault(key, req)
        req.block_table, req.block_keys, req.num_computed = hits + self.blocks.allocate(need), keys, start
        if req.num_cached_tokens < 0:  # first admission, not a recompute after preemption
            req.num_cached_tokens = start
            self.prompt_tokens += len(req.prompt_token_ids)
            self.cached_prompt_tokens += start
        self.running.append(req)
        return n

    def _reserve(self, req: Request, n: int, preempted: list[Request]) -> bool:
        """Blocks for req's next n positions, preempting the most recently admitted running requests until they
        are free -> False if req itself was preempted."""
        need = self.blocks.blocks_for(req.num_computed + n) - len(req.block_table)
        while need > self.blocks.n_free:
            victim = self.running.pop()
            self._release(victim)
            self.waiting.appendleft(victim)
            preempted.append(victim)
            self.preemptions += 1
            if victim is req:
                return False
        req.block_table += self.blocks.allocate(need)
        return True

    def _awaits(self, req: Request, n_hits: int) -> bool:
        """Whether req's block after its n_hits cached ones is pending, one that req could read from the cache
        (a prompt block, not its last token's)."""
        if req.needs_prompt_logits or n_hits >= min(len(req.prompt_keys), (len(req.token_ids) - 1) // self.blocks.block_size):
            return False
        owner = self.pending.get(req.prompt_keys[n_hits])
        assert owner is None or owner in self.running, "pending keys belong to running requests"
        return owner is not None

    def _release(self, req: Request) -> None:
        self.blocks.release(req.block_table)
        for key in req.prompt_keys:  # pending no more: computed (and cached while other requests hold it) or abandoned
            if self.pending.get(key) is req:
                del self.pending[key]
        req.block_table, req.block_keys, req.num_computed = [], [], 0


def _chunk(remaining: int, budget: int) -> int:
    """Positions a request computes this step: its one position if it decodes (outside the prefill budget),
    else as many as the budget allows."""
    return 1 if remaining == 1 else min(remaining, budget)


def _add_row(plan: Plan, req: Request, n: int) -> int:
    """Put req into the plan -> the prefill budget it uses."""
    if req.remaining == 1:
        plan.decode.append(req)
        return 0
    plan.prefill.append((req, n))
    return n
