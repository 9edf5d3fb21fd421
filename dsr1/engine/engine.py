"""The serving engine: requests in, tokens out, one step at a time, over a paged latent cache with prefix caching
and continuous batching. Split as nano-vllm's is: the block manager (blocks.py) owns the cache blocks, the
scheduler (scheduler.py) picks each step's rows, the runner (runner.py) runs them through the model, the
detokenizer (detokenize.py) grows each output's text and finds its stop strings, and this file turns logits
into tokens, stops, logprobs and outputs.

Under expert parallelism every rank holds an Engine with its own requests and the same group; all ranks must
call step() together (generate() does), since each step's forwards are collectives.

The Engine is not thread-safe: one thread drives it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch.distributed import ProcessGroup

from dsr1.engine.blocks import BlockManager
from dsr1.engine.detokenize import Detokenizer
from dsr1.engine.paged import bytes_per_block
from dsr1.engine.decode_graphs import GRAPH_MODES
from dsr1.engine.paged_graphs import make_paged_graphs
from dsr1.engine.runner import ModelRunner, Row
from dsr1.engine.sampling import SamplingParams, TokenLogprob, choose, logprobs_of, new_generator
from dsr1.engine.scheduler import Request, Scheduler
from dsr1.kernels.attention import DECODE_ATTENTION, use_paged_decode
from dsr1.model.transformer import Transformer

__all__ = ["Engine", "EngineConfig", "EngineStats", "RequestOutput", "SamplingParams", "TokenLogprob"]

CPU_CACHE_BYTES = 256 << 20  # the pool's size on CPU when num_blocks is not given (at least one full-length sequence)


@dataclass
class EngineConfig:
    block_size: int = 16
    num_blocks: int | None = None  # None: sized from free GPU memory (cache_memory_fraction) or a fixed default on CPU
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096  # prefill tokens per step
    enable_prefix_caching: bool = True
    max_model_len: int | None = None  # default: the model's max_seq_len
    cache_memory_fraction: float = 0.6  # of the GPU memory free when the engine starts, for the latent pool
    admit_batch: int | None = None  # a decode-only step admits waiting requests once this many fit (None: max_num_seqs // 8)
    decode_attention: str = "gather"  # gather: a row's blocks gathered per layer; paged: read in place (kernels/attention.py)
    cuda_graphs: str = "auto"  # decode steps from CUDA graphs on one GPU: auto (where the model allows), on, off
    compile_decode: bool = False  # with graphs: decoder blocks through torch.compile (a compile per bucket)

    def __post_init__(self):
        for name, least in (("block_size", 1), ("num_blocks", 2), ("max_num_seqs", 1), ("max_num_batched_tokens", 1), ("max_model_len", 1), ("admit_batch", 1)):
            value = getattr(self, name)
            if value is not None and value < least:
                raise ValueError(f"EngineConfig.{name} must be >= {least}, found {value}")
        if not 0 < self.cache_memory_fraction <= 1:
            raise ValueError(f"EngineConfig.cache_memory_fraction must be in (0, 1], found {self.cache_memory_fraction}")
        if self.decode_attention not in DECODE_ATTENTION:
            raise ValueError(f"EngineConfig.decode_attention {self.decode_attention!r} is not one of {tuple(DECODE_ATTENTION)}")
        if self.cuda_graphs not in GRAPH_MODES:
            raise ValueError(f"EngineConfig.cuda_graphs {self.cuda_graphs!r} is not one of {GRAPH_MODES}")


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # every generated token so far (stop token excluded)
    new_token_ids: list[int]  # generated in this step
    text: str  # detokenized generated text so far, stop string trimmed ("" without a tokenizer); only ever grows:
    # while running it holds back a tail that may begin a stop string and an incomplete UTF-8 character
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    logprobs: list[TokenLogprob] | None
    prompt_logprobs: list[TokenLogprob | None] | None
    num_cached_tokens: int  # prompt tokens served from the prefix cache


@dataclass
class EngineStats:
    waiting: int
    running: int
    used_blocks: int
    total_blocks: int
    prompt_tokens: int
    cached_prompt_tokens: int
    generated_tokens: int
    preemptions: int
    finished: int


class Engine:
    def __init__(self, model: Transformer, tokenizer=None, config: EngineConfig = EngineConfig(), group: ProcessGroup | None = None):
        """Serve `model` (built with attn_impl="absorb"); `tokenizer` (anything with decode(ids, skip_special_tokens))
        detokenizes and checks stop strings; `group`: this rank's expert-parallel group."""
        if model.layers[0].attn.impl != "absorb":
            raise ValueError(f"the engine's paged cache holds MLA's latent rows: build the model with attn_impl='absorb', not {model.layers[0].attn.impl!r}")
        self.max_model_len = config.max_model_len or model.max_seq_len
        if self.max_model_len > model.max_seq_len:
            raise ValueError(f"EngineConfig.max_model_len={self.max_model_len} exceeds the model's max_seq_len={model.max_seq_len}; load it with a larger max_seq_len")
        self.model, self.tokenizer, self.config, self.group = model, tokenizer, config, group
        use_paged_decode(model, DECODE_ATTENTION[config.decode_attention])
        n_blocks = config.num_blocks or default_num_blocks(model, config, self.max_model_len)
        self.blocks = BlockManager(n_blocks, config.block_size, config.enable_prefix_caching)
        admit_batch = config.admit_batch or max(1, config.max_num_seqs // 8)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens, admit_batch)
        graphs = None  # under expert parallelism decode steps run eagerly (paged_graphs.py)
        if group is None:
            graphs = partial(make_paged_graphs, model, mode=config.cuda_graphs, max_batch=config.max_num_seqs, max_len=self.max_model_len, compile=config.compile_decode)
        self.runner = ModelRunner(model, n_blocks, config.block_size, group, graphs)
        self.requests: dict[str, Request] = {}
        self.aborted: list[Request] = []  # reported by the next step
        self.ids = itertools.count()
        self.generated_tokens = self.finished = 0

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request -> its id. ValueError, naming the field, if it could never run."""
        request_id = str(next(self.ids)) if request_id is None else request_id
        self._check(prompt_token_ids, params, request_id)
        req = Request(request_id, list(prompt_token_ids), params, new_generator(params, self.model.embed.weight.device))
        if self.tokenizer is not None:
            req.detokenizer = Detokenizer(self.tokenizer, params.stop, params.stop_only_after)
        self.requests[request_id] = req
        self.scheduler.add(req)
        return request_id

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free its blocks; the next step reports it with finish_reason "abort"."""
        req = self.requests.pop(request_id, None)
        if req is not None:
            self.scheduler.finish(req)
            req.finish_reason = "abort"
            self.aborted.append(req)

    def step(self) -> list[RequestOutput]:
        """Schedule, run the forwards, choose tokens -> one output per request that got tokens or finished."""
        plan = self.scheduler.schedule()
        decode = [(req, 1) for req in plan.decode]
        rows = [[self._row(req, n) for req, n in batch] for batch in (decode, plan.prefill)]
        decode_out, prefill_out = self.runner.run(*rows)
        new_tokens: dict[Request, list[int]] = {}
        for (req, n), out in zip(decode + plan.prefill, decode_out + prefill_out):
            self.scheduler.computed(req, n)
            if req.needs_prompt_logits:
                self._prompt_logprobs(req, out.logits)
            if req.remaining == 0:  # its last token is in: choose the next (greedy: the forward's argmax)
                p = req.params
                token = out.greedy[-1] if p.temperature == 0 else choose(out.logits[-1], p, req.generator)
                new_tokens[req] = self._next_token(req, out.logits[-1], token)
        outputs = [self._output(req, []) for req in self.aborted]
        self.aborted = []
        for req, tokens in new_tokens.items():
            if req.finish_reason is not None:
                self.scheduler.finish(req)
                del self.requests[req.request_id]
                self.finished += 1
            outputs.append(self._output(req, tokens))
        return outputs

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests or self.aborted)

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            waiting=len(s.waiting), running=len(s.running), used_blocks=self.blocks.n_usable - self.blocks.n_free,
            total_blocks=self.blocks.n_usable, prompt_tokens=s.prompt_tokens, cached_prompt_tokens=s.cached_prompt_tokens,
            generated_tokens=self.generated_tokens, preemptions=s.preemptions, finished=self.finished,
        )

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams], on_output: Callable[[RequestOutput], None] = lambda out: None
    ) -> list[RequestOutput]:
        """Run every queued request to completion -> the final outputs of `prompts`, in their order; on_output sees
        every output of every step as it comes (progress, streaming). Under expert parallelism every rank calls
        it (with its own prompts, maybe none) and steps until all ranks are done."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"params: one SamplingParams or one per prompt, found {len(params)} for {len(prompts)} prompts")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        final = {}
        while self.runner.anywhere(self.has_unfinished_requests()):
            for out in self.step():
                on_output(out)
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    def _row(self, req: Request, n: int) -> Row:
        """req's next n positions as a runner row, asking for the logits its prompt logprobs and next token need."""
        start, n_prompt = req.num_computed, len(req.prompt_token_ids)
        at = []
        if req.needs_prompt_logits:  # position p's logits score prompt token p + 1
            at = [p - start for p in range(start, start + n) if len(req.prompt_logprobs) <= p + 1 < n_prompt]
        if start + n == len(req.token_ids):
            at.append(n - 1)
        return Row(req.token_ids[start : start + n], start, req.block_table, at)

    def _prompt_logprobs(self, req: Request, logits: torch.Tensor) -> None:
        """Score the prompt tokens this row's logits [k, v] predict (all but the sampling position's)."""
        first = len(req.prompt_logprobs)
        n = min(logits.shape[0], len(req.prompt_token_ids) - first)
        targets = torch.tensor(req.prompt_token_ids[first : first + n], device=logits.device)
        req.prompt_logprobs += logprobs_of(logits[:n], targets, req.params.prompt_logprobs)

    def _next_token(self, req: Request, logits: torch.Tensor, token: int) -> list[int]:
        """Take `token`, chosen from req's logits [v], and apply its stops -> the tokens it adds (none at a stop token)."""
        p = req.params
        new = []
        if token in p.stop_token_ids or (token == self.model.cfg.eos_token_id and not p.ignore_eos):
            req.finish_reason = "stop"
        else:
            new = [token]
            req.token_ids.append(token)
            self.generated_tokens += 1
            if req.logprobs is not None:
                req.logprobs += logprobs_of(logits.unsqueeze(0), torch.tensor([token], device=logits.device), p.logprobs)
            if len(req.output_ids) >= p.max_tokens:
                req.finish_reason = "length"
        if req.detokenizer is not None and req.detokenizer.update(req.output_ids, final=req.finish_reason is not None):
            req.finish_reason = "stop"
        return new

    def _output(self, req: Request, new_token_ids: list[int]) -> RequestOutput:
        return RequestOutput(
            request_id=req.request_id, prompt_token_ids=req.prompt_token_ids, token_ids=req.output_ids,
            new_token_ids=new_token_ids, text=_text(req), finished=req.finish_reason is not None,
            finish_reason=req.finish_reason, logprobs=None if req.logprobs is None else list(req.logprobs),
            prompt_logprobs=None if req.prompt_logprobs is None else list(req.prompt_logprobs),
            num_cached_tokens=max(req.num_cached_tokens, 0),
        )

    def _check(self, prompt: list[int], params: SamplingParams, request_id: str) -> None:
        """Raise, naming the field, unless the request can run to its end in this engine."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, found {type(params).__name__}")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        vocab = self.model.cfg.vocab_size
        if not prompt or not all(isinstance(t, int) and 0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt_token_ids must be a non-empty list of token ids in [0, {vocab}), found {str(prompt)[:80]}")
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt_token_ids has {len(prompt)} tokens; with max_tokens={params.max_tokens} the request needs "
                f"{len(prompt) + params.max_tokens} positions, beyond max_model_len={self.max_model_len}: shorten the prompt or lower max_tokens"
            )
        need = self.blocks.blocks_for(len(prompt) + params.max_tokens)
        if need > self.blocks.n_usable:
            raise ValueError(
                f"prompt_token_ids ({len(prompt)} tokens) with max_tokens={params.max_tokens} needs {need} cache blocks, "
                f"but the pool has {self.blocks.n_usable} (EngineConfig.num_blocks): raise num_blocks or lower max_tokens"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError(f"stop={params.stop!r} needs the engine to have a tokenizer (stop strings are matched on text)")


def _text(req: Request) -> str:
    if req.detokenizer is None:
        return ""
    return req.detokenizer.text if req.finish_reason is not None else req.detokenizer.shown()


def default_num_blocks(model: Transformer, config: EngineConfig, max_model_len: int) -> int:
    """Pool size when EngineConfig.num_blocks is None: a share of the free GPU memory, or CPU_CACHE_BYTES (and
    at least one full-length sequence) on CPU; plus the scratch block."""
    per_block = bytes_per_block(model, config.block_size)
    device = model.embed.weight.device
    if device.type == "cuda":
        return max(2, int(config.cache_memory_fraction * torch.cuda.mem_get_info(device)[0]) // per_block)
    return max(CPU_CACHE_BYTES // per_block, -(-max_model_len // config.block_size)) + 1
