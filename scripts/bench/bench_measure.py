"""What the model benchmarks measure, the same way for the dsr1 and transformers runners: prefill
throughput and its FLOPs, decode step time, peak memory per row, and the memory-bandwidth floor of a
decode step.

Prefill is timed the way generation runs it: a fresh KV cache, logits for the last position only; dsr1
prefills in chunks of at most `prefill_chunk` tokens (dsr1.engine.generation.prefill).
Decode starts from a cache already holding `context` random positions (the prompt's content does not
change the work), then feeds back each step's greedy token, so routing follows the model's own output.
Each row runs through `run_row`: skipped when its KV cache cannot fit the free device memory, "out of
memory" when it runs out anyway, and its peak memory (torch.cuda.max_memory_allocated, reset first).

b batch, s prompt length, t key positions, v vocabulary
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from bench_timing import Timer
from dsr1.checkpoint.hf_names import checkpoint_tensors
from dsr1.config import ModelConfig
from dsr1.engine import generation
from dsr1.engine.decode_graphs import DecodeGraphs, cache_bytes as dsr1_cache_bytes
from dsr1.model.transformer import Transformer

GiB = 2**30

# Dense (no sparsity) FP8 tensor-core peak in TFLOPS, from NVIDIA's datasheets, which quote twice these "with
# sparsity": H100/H200 SXM 3,958; H100 NVL and H200 NVL 3,341; H100 PCIe 3,026. Matched against
# torch.cuda.get_device_name in order (the first name contained in it wins).
PEAK_FP8_TFLOPS = (
    ("H200 NVL", 1670.5, "NVIDIA H200 NVL datasheet: FP8 3,341 TFLOPS with sparsity, 1,670.5 dense"),
    ("H100 NVL", 1670.5, "NVIDIA H100 NVL datasheet: FP8 3,341 TFLOPS with sparsity, 1,670.5 dense"),
    ("H100 PCIe", 1513.0, "NVIDIA H100 PCIe datasheet: FP8 3,026 TFLOPS with sparsity, 1,513 dense"),
    ("H200", 1979.0, "NVIDIA H200 SXM datasheet: FP8 3,958 TFLOPS with sparsity, 1,979 dense"),
    ("H100", 1979.0, "NVIDIA H100 SXM datasheet: FP8 3,958 TFLOPS with sparsity, 1,979 dense"),
)


class Dsr1Runner:
    """dsr1's Transformer driven through forward() with its own KV cache, as dsr1/engine/generation.py does."""

    def __init__(self, model: Transformer, prefill_chunk: int | None = None):
        """prefill_chunk: prefill in chunks of at most this many tokens (dsr1.engine.generation.prefill); None:
        the whole prompt in one forward."""
        self.model, self.prefill_chunk = model, prefill_chunk
        self.device = model.embed.weight.device

    def logits(self, tokens: Tensor) -> Tensor:
        """tokens [b, s] -> logits [b, s, v] without a cache."""
        return self.model(tokens)

    def prefill(self, tokens: Tensor) -> Tensor:
        """tokens [b, s] -> logits [b, v] at each row's last position, into a fresh cache of s positions."""
        b, s = tokens.shape
        cache = self.model.new_cache(b, s)
        if self.prefill_chunk is None:
            return self.model(tokens, 0, cache, logits_at=torch.full((b,), s - 1, device=self.device))
        return generation.prefill(self.model, tokens, torch.full((b,), s, device=self.device), cache, self.prefill_chunk)

    def cache_bytes(self, batch: int, length: int) -> int:
        """Bytes of a KV cache for `batch` sequences of `length` positions."""
        return dsr1_cache_bytes(self.model, batch, length)

    def release(self) -> None:
        """Drop what the last decode_cache kept (nothing here)."""

    def decode_cache(self, batch: int, context: int, steps: int):
        cache = self.model.new_cache(batch, context + steps)
        fill_cache(cache, context)
        return cache

    def decode(self, tokens: Tensor, pos: int, cache) -> Tensor:
        return self.model(tokens, pos, cache, logits_at=torch.zeros(tokens.shape[0], dtype=torch.long, device=self.device))


class Dsr1GraphRunner(Dsr1Runner):
    """Dsr1Runner whose decode steps replay a CUDA graph (dsr1/engine/decode_graphs.py), as generation does on a GPU;
    with an expert-parallel group, every rank captures in lockstep."""

    def __init__(self, model: Transformer, group=None, compile: bool = False, prefill_chunk: int | None = None):
        super().__init__(model, prefill_chunk)
        self.group, self.compile = group, compile

    def decode_cache(self, batch: int, context: int, steps: int):
        self.graphs = DecodeGraphs(self.model, context + steps, max_batch=batch, group=self.group, compile=self.compile)
        cache = self.graphs.prepare(batch)  # captured before the cache is filled: capture writes position 0
        fill_cache(cache, context)
        return cache

    def decode(self, tokens: Tensor, pos: int, cache) -> Tensor:
        return self.graphs.step(tokens, torch.full((tokens.shape[0],), pos, device=self.device))

    def release(self) -> None:
        """Drop the graphs and their cache (at 128K context, tens of GB) before the next row builds its own."""
        self.graphs = None


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

    def cache_bytes(self, batch: int, length: int) -> int:
        """Bytes of its DynamicCache for `batch` sequences of `length` positions: per-head keys and values."""
        c = self.model.config
        per_position = c.num_attention_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * self.model.model.embed_tokens.weight.dtype.itemsize
        return per_position * c.num_hidden_layers * batch * length

    def release(self) -> None:
        """Nothing kept between rows."""


def read_config(path: Path, vocab: int | None = None) -> tuple[dict, ModelConfig]:
    """A benchmark's model: config.json at `path` (vocab_size overridden by `vocab`) -> (its raw keys, ModelConfig)."""
    raw = json.loads(path.read_text())
    if vocab:
        raw["vocab_size"] = vocab
    return raw, ModelConfig.from_hf(raw, source=str(path))


def fill_cache(cache: list, context: int) -> None:
    """Random entries at positions [0, context) of every layer's cache."""
    for layer_cache in cache:
        for t in layer_cache.tensors():
            t[:, :context].normal_()


def measure_prefill(runner, batch: int, length: int, vocab: int, reps: int, timer: Timer, cfg: ModelConfig | None = None, peak_tflops: float | None = None) -> dict:
    """Median of `reps` timed prefills of random [batch, length] prompts after one warm-up. With cfg, also
    the FLOPs of the prefill (prefill_flops), the TFLOPS achieved, and their share of `peak_tflops`."""
    tokens = torch.randint(0, vocab, (batch, length), device=runner.device)
    runner.prefill(tokens)
    t = timer.median(lambda: runner.prefill(tokens), reps)
    out = {"batch": batch, "length": length, "seconds": t, "tokens_per_s": batch * length / t}
    if cfg is not None:
        out["flops"] = prefill_flops(cfg, batch, length)["total"]
        out["tflops"] = out["flops"] / t / 1e12
        out["pct_of_peak"] = 100 * out["tflops"] / peak_tflops if peak_tflops else None
    return out


def prefill_flops(cfg: ModelConfig, batch: int, length: int) -> dict[str, float]:
    """FLOPs of a causal prefill of `batch` prompts of `length` tokens from an empty cache, counted from the
    config as the model's math (2 FLOPs per multiply-add), not as any one implementation computes it:

        F = b·s·2·P + b·2·m·v + L·b·s·2·h·(d_qk + d_v)·t_avg,    t_avg = (s + 1) / 2

    P, the weights one token runs through (per layer: attention projections, then the dense MLP or the MoE):
        attention   m·q_lora + q_lora·h·d_qk + m·(c + r) + c·h·(d_nope + d_v) + h·d_v·m
                    (m·h·d_qk in place of the first two without query compression)
        dense MLP   3·m·i
        MoE         m·E (router) + (n_shared + k)·3·m·i_moe (the shared and the top-k routed experts)
    b·2·m·v: lm_head, for each row's last token only (the embedding is a lookup). The last term is causal
    attention: the query at position j scores j + 1 keys (2·h·d_qk per key) and sums as many values (2·h·d_v),
    (s + 1) / 2 keys on average, in each of the L layers. d_qk = d_nope + r is MLA's per-head query-key width
    (192 in R1) and d_v its value width (128); dsr1's absorbed attention scores over the latent (c + r = 576)
    and sums latent values (c = 512) instead, so it computes more than this count, which is the model's.

    m dim, v vocabulary, L layers, h heads, c kv_lora_rank, r rope dim, i / i_moe dense / expert width,
    E routed experts, k experts per token
    """
    m, h, c, r = cfg.dim, cfg.n_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    d_qk, d_v = cfg.qk_nope_head_dim + r, cfg.v_head_dim
    q = m * cfg.q_lora_rank + cfg.q_lora_rank * h * d_qk if cfg.q_lora_rank else m * h * d_qk
    attention = q + m * (c + r) + c * h * (cfg.qk_nope_head_dim + d_v) + h * d_v * m
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
    dense = 3 * m * cfg.inter_dim
    moe = m * cfg.n_routed_experts + (cfg.n_shared_experts + cfg.n_activated_experts) * 3 * m * cfg.moe_inter_dim
    tokens = batch * length
    out = {
        "projections": 2.0 * tokens * cfg.n_layers * attention,
        "mlp": 2.0 * tokens * ((cfg.n_layers - moe_layers) * dense + moe_layers * moe),
        "lm_head": 2.0 * batch * m * cfg.vocab_size,
        "attention": cfg.n_layers * tokens * 2.0 * h * (d_qk + d_v) * (length + 1) / 2,
    }
    out["total"] = sum(out.values())
    return out


def peak_tflops(device_name: str) -> tuple[float | None, str]:
    """The card's dense FP8 tensor-core peak (PEAK_FP8_TFLOPS) and where the figure comes from; (None, why) if unknown."""
    for key, tflops, source in PEAK_FP8_TFLOPS:
        if key in device_name:
            return tflops, source
    return None, f"no dense FP8 peak known for {device_name!r}; give --peak-tflops"


def available_memory(device: torch.device) -> int | None:
    """Bytes a row may still allocate: free device memory plus what torch's allocator holds unused; None off CUDA."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_row(fn: Callable[[], dict], device: torch.device, need_bytes: int = 0, available: int | None = None, **fields) -> dict:
    """One table row: fn()'s figures with status "ok" and the row's peak memory (max_memory_allocated, reset
    first: the weights included). Skipped (status "skipped", message "skipped: would need X GiB", X counting
    what the device already holds) when `need_bytes` (the row's KV cache) exceed `available` (default: the
    device's free memory; unlimited off CUDA); status "out of memory" when it runs out anyway. `fields`
    (batch, length, context, ...) go into the row whatever happens."""
    free_memory(device)
    available = available_memory(device) if available is None else available
    held = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    row = {**fields, "need_bytes": need_bytes, "available_bytes": available, "held_bytes": held}
    if available is not None and need_bytes > available:
        return {**row, "status": "skipped", "message": f"skipped: would need {(held + need_bytes) / GiB:.1f} GiB", "peak_memory": None}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    oom = None
    try:
        row.update(fn())
        row["status"] = "ok"
    except torch.cuda.OutOfMemoryError as e:
        oom = str(e).split("\n")[0][:300]
    if oom is not None:  # outside the handler: the traceback's frames (and their tensors) are gone
        row.update(status="out of memory", message="out of memory", error=oom)
        free_memory(device)
    row["peak_memory"] = peak_memory(device)
    return row


def measure_decode(runner, batch: int, context: int, steps: int, warmup: int, vocab: int, timer: Timer, after=None) -> dict:
    """Mean step time over `steps` greedy decode steps at positions context + warmup + [0, steps).
    "mean_position": their mean position (what the floor's cache read counts).

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
    out = {"batch": batch, "context": context, "steps": steps, "mean_position": context + warmup + (steps - 1) / 2, "ms_per_step": 1e3 * t, "tokens_per_s": batch / t}
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
    `experts[i]` experts each MoE layer selected, `batch` embedding rows, and the latent KV cache of every
    row (read `context` positions, write one; bf16). Weights are counted as stored in an FP8 checkpoint."""
    specs = checkpoint_tensors(cfg, fp8=True)
    per_expert = sum(s.nbytes for s in specs if s.expert_id == 0) // max(cfg.n_layers - cfg.n_dense_layers, 1)
    out = {
        "lm_head": sum(s.nbytes for s in specs if s.hf_name == "lm_head.weight"),
        "attention": sum(s.nbytes for s in specs if ".self_attn." in s.hf_name or "layernorm" in s.hf_name),
        "dense_and_shared_mlp": sum(s.nbytes for s in specs if ".mlp." in s.hf_name and s.expert_id is None and ".mlp.gate." not in s.hf_name),
        "router": sum(s.nbytes for s in specs if ".mlp.gate." in s.hf_name),
        "routed_experts": per_expert * sum(experts),
        "embedding_rows": batch * cfg.dim * 2,
        "kv_cache": int(batch * (context + 1) * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2 * cfg.n_layers),
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
