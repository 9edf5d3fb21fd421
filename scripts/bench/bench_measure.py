"""What the model benchmarks measure, the same way for the dsr1 and transformers runners: prefill
throughput, decode step time, peak memory, and the memory-bandwidth floor of a decode step.

Prefill is timed the way generation runs it: a fresh KV cache, logits for the last position only.
Decode starts from a cache already holding `context` random positions (the prompt's content does not
change the work), then feeds back each step's greedy token, so routing follows the model's own output.

b batch, s prompt length, v vocabulary
"""

from __future__ import annotations

import torch
from torch import Tensor

from bench_timing import Timer
from dsr1.checkpoint.hf_names import checkpoint_tensors
from dsr1.config import ModelConfig
from dsr1.engine.decode_graphs import DecodeGraphs
from dsr1.model.transformer import Transformer


class Dsr1Runner:
    """dsr1's Transformer driven through forward() with its own KV cache, as dsr1/engine/generation.py does."""

    def __init__(self, model: Transformer):
        self.model = model
        self.device = model.embed.weight.device

    def logits(self, tokens: Tensor) -> Tensor:
        """tokens [b, s] -> logits [b, s, v] without a cache."""
        return self.model(tokens)

    def prefill(self, tokens: Tensor) -> Tensor:
        b, s = tokens.shape
        cache = self.model.new_cache(b, s)
        return self.model(tokens, 0, cache, logits_at=torch.full((b,), s - 1, device=self.device))

    def decode_cache(self, batch: int, context: int, steps: int):
        cache = self.model.new_cache(batch, context + steps)
        fill_cache(cache, context)
        return cache

    def decode(self, tokens: Tensor, pos: int, cache) -> Tensor:
        return self.model(tokens, pos, cache, logits_at=torch.zeros(tokens.shape[0], dtype=torch.long, device=self.device))


class Dsr1GraphRunner(Dsr1Runner):
    """Dsr1Runner whose decode steps replay a CUDA graph (dsr1/engine/decode_graphs.py), as generation does on a GPU;
    with an expert-parallel group, every rank captures in lockstep."""

    def __init__(self, model: Transformer, group=None, compile: bool = False):
        super().__init__(model)
        self.group, self.compile = group, compile

    def decode_cache(self, batch: int, context: int, steps: int):
        self.graphs = DecodeGraphs(self.model, context + steps, max_batch=batch, group=self.group, compile=self.compile)
        cache = self.graphs.prepare(batch)  # captured before the cache is filled: capture writes position 0
        fill_cache(cache, context)
        return cache

    def decode(self, tokens: Tensor, pos: int, cache) -> Tensor:
        return self.graphs.step(tokens, torch.full((tokens.shape[0],), pos, device=self.device))


class HFRunner:
    """transformers' DeepseekV3ForCausalLM with its DynamicCache (use_cache=True, logits_to_keep=1)."""

    def __init__(self, model):
        from transformers import DynamicCache

        self.model, self.new_cache = model, lambda: DynamicCache(config=model.config)
        self.device = model.lm_head.weight.device

    def logits(self, tokens: Tensor) -> Tensor:
        return self.model(input_ids=tokens, use_cache=False).logits

    def prefill(self, tokens: Tensor) -> Tensor:
        return self.model(input_ids=tokens, past_key_values=self.new_cache(), use_cache=True, logits_to_keep=1).logits[:, -1]

    def decode_cache(self, batch: int, context: int, steps: int):
        """A cache of `context` positions: one real token, then random entries shaped like what the model stored."""
        cache = self.new_cache()
        self.model(input_ids=torch.zeros(batch, 1, dtype=torch.long, device=self.device), past_key_values=cache, use_cache=True, logits_to_keep=1)
        for i, layer in enumerate(cache.layers):
            k, v = layer.keys, layer.values  # [b, heads, 1, dim]
            new = [torch.randn(*t.shape[:-2], context - 1, t.shape[-1], dtype=t.dtype, device=t.device) for t in (k, v)]
            cache.update(*new, i)
        return cache

    def decode(self, tokens: Tensor, pos: int, cache) -> Tensor:
        return self.model(input_ids=tokens, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]


def fill_cache(cache: list, context: int) -> None:
    """Random entries at positions [0, context) of every layer's cache."""
    for layer_cache in cache:
        for t in layer_cache.tensors():
            t[:, :context].normal_()


def measure_prefill(runner, batch: int, length: int, vocab: int, reps: int, timer: Timer) -> dict:
    """Median of `reps` timed prefills of random [batch, length] prompts after one warm-up."""
    tokens = torch.randint(0, vocab, (batch, length), device=runner.device)
    runner.prefill(tokens)
    t = timer.median(lambda: runner.prefill(tokens), reps)
    return {"batch": batch, "length": length, "seconds": t, "tokens_per_s": batch * length / t}


def measure_decode(runner, batch: int, context: int, steps: int, warmup: int, vocab: int, timer: Timer, after=None) -> dict:
    """Mean step time over `steps` greedy decode steps at positions context + warmup + [0, steps).

    after(tokens, pos, cache), if given, runs one more (untimed) step; its result is kept under "after"."""
    cache = runner.decode_cache(batch, context, warmup + steps + 1)
    tokens = torch.randint(0, vocab, (batch, 1), device=runner.device)
    pos = context

    def run(n: int) -> None:
        nonlocal tokens, pos
        for _ in range(n):
            tokens = runner.decode(tokens, pos, cache).argmax(-1, keepdim=True)
            pos += 1

    run(warmup)
    t = timer(lambda: run(steps)) / steps
    out = {"batch": batch, "context": context, "steps": steps, "ms_per_step": 1e3 * t, "tokens_per_s": batch / t}
    if after is not None:
        out["after"] = after(tokens, pos, cache)
    return out


def decode_step_logits(runner, batch: int, context: int, vocab: int, seed: int = 0) -> Tensor:
    """Logits [batch, v] of one decode step at position `context` over a seeded random cache: the same
    inputs for any runner, so two runners' results compare."""
    torch.manual_seed(seed)
    cache = runner.decode_cache(batch, context, 1)
    tokens = torch.randint(0, vocab, (batch, 1), device=runner.device)
    return runner.decode(tokens, context, cache).float()


def experts_per_layer(model: Transformer, tokens: Tensor, pos: int, cache) -> list[int]:
    """Distinct routed experts each MoE layer selects in one decode step (the experts a step must read)."""
    counts: list[int] = []
    hooks = [layer.ffn.gate.register_forward_hook(lambda m, i, out: counts.append(int(out[1].unique().numel()))) for layer in model.layers if hasattr(layer.ffn, "gate")]
    try:
        model(tokens, pos, cache, logits_at=torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device))
    finally:
        for h in hooks:
            h.remove()
    return counts


def floor_bytes(cfg: ModelConfig, batch: int, context: int, experts: list[int]) -> dict[str, int]:
    """Bytes one decode step must move: every weight but the routed experts and the embedding table, the
    `experts[i]` experts each MoE layer selected, `batch` embedding rows, and the latent KV cache
    (read `context` positions, write one). Weights are counted as stored in an FP8 checkpoint."""
    specs = checkpoint_tensors(cfg, fp8=True)
    per_expert = sum(s.nbytes for s in specs if s.expert_id == 0) // max(cfg.n_layers - cfg.n_dense_layers, 1)
    out = {
        "lm_head": sum(s.nbytes for s in specs if s.hf_name == "lm_head.weight"),
        "attention": sum(s.nbytes for s in specs if ".self_attn." in s.hf_name or "layernorm" in s.hf_name),
        "dense_and_shared_mlp": sum(s.nbytes for s in specs if ".mlp." in s.hf_name and s.expert_id is None and ".mlp.gate." not in s.hf_name),
        "router": sum(s.nbytes for s in specs if ".mlp.gate." in s.hf_name),
        "routed_experts": per_expert * sum(experts),
        "embedding_rows": batch * cfg.dim * 2,
        "kv_cache": batch * (context + 1) * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2 * cfg.n_layers,
    }
    out["total"] = sum(out.values())
    return out


def compare_logits(got: Tensor, ref: Tensor) -> dict:
    """||got - ref|| / ||ref||, max |got - ref| / max |ref|, and the fraction of positions whose argmax
    (greedy token) agrees."""
    got, ref = got.double(), ref.double()
    return {
        "rel_err": ((got - ref).norm() / ref.norm()).item(),
        "max_rel_err": ((got - ref).abs().max() / ref.abs().max()).item(),
        "greedy_agree": (got.argmax(-1) == ref.argmax(-1)).double().mean().item(),
        "positions": ref[..., 0].numel(),
    }


def peak_memory(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
