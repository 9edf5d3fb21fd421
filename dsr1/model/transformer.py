"""The DeepSeek-V3/R1 decoder: embedding, decoder blocks (dense MLP first, MoE after), final norm, lm_head,
and the multi-token-prediction (MTP) block that follows the last layer in the checkpoint.

b batch, s new positions, t key positions, m model dim, v vocabulary
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dsr1.config import ModelConfig
from dsr1.model.attention import MLA
from dsr1.model.mlp import MLP
from dsr1.model.moe import MoE
from dsr1.model.norm import RMSNorm
from dsr1.model.rope import precompute_freqs_cis
from dsr1.model.dispatch import Dispatcher, LocalDispatcher


class Block(nn.Module):
    """x += attn(attn_norm(x)); x += ffn(ffn_norm(x)). HF: model.layers.{layer_id}."""

    def __init__(self, layer_id: int, cfg: ModelConfig, dispatcher: Dispatcher, fp8: bool, attn_impl: str):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)  # HF: input_layernorm
        self.attn = MLA(cfg, fp8, attn_impl)  # HF: self_attn
        self.ffn_norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)  # HF: post_attention_layernorm
        if cfg.is_moe_layer(layer_id):
            self.ffn = MoE(cfg, dispatcher, fp8)  # HF: mlp
        else:
            self.ffn = MLP(cfg.dim, cfg.inter_dim, fp8)  # HF: mlp

    def forward(self, x: Tensor, positions: Tensor, freqs_cis: Tensor, keep: Tensor, cache=None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), positions, freqs_cis, keep, cache)
        return x + self.ffn(self.ffn_norm(x))


class SharedHead(nn.Module):
    """The MTP block's own output norm and vocabulary projection. HF: model.layers.{L}.shared_head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.head.weight.requires_grad_(False)


class MTPBlock(Block):
    """Multi-token prediction: predicts token i+2 from the main model's h_i and the embedding of token i+1.

    h' = block(eh_proj(cat(enorm(embed(t_{i+1})), hnorm(h_i)))); logits = shared_head(h').
    """

    def __init__(self, layer_id: int, cfg: ModelConfig, dispatcher: Dispatcher, fp8: bool, attn_impl: str):
        super().__init__(layer_id, cfg, dispatcher, fp8, attn_impl)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)  # HF: embed_tokens (a copy of the main one)
        self.embed.weight.requires_grad_(False)
        self.enorm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)  # stored bf16 in R1, never FP8
        self.eh_proj.weight.requires_grad_(False)
        self.shared_head = SharedHead(cfg)

    def forward(self, h: Tensor, next_tokens: Tensor, positions: Tensor, freqs_cis: Tensor, keep: Tensor, cache=None):
        """h: [b, s, m] main-model hidden states (after its final norm, as vLLM and HF feed them),
        next_tokens: [b, s] -> (logits [b, s, v] fp32, h')."""
        x = self.eh_proj(torch.cat([self.enorm(self.embed(next_tokens)), self.hnorm(h)], dim=-1))
        x = super().forward(x, positions, freqs_cis, keep, cache)
        return self.shared_head.head(self.shared_head.norm(x)).float(), x


class Transformer(nn.Module):
    """DeepseekV3ForCausalLM. forward(tokens [b, s]) -> logits [b, s, v] for every position."""

    def __init__(
        self,
        cfg: ModelConfig,
        dispatcher: Dispatcher | None = None,
        fp8: bool = False,
        attn_impl: str = "absorb",
        max_seq_len: int | None = None,
        load_mtp: bool = False,
    ):
        super().__init__()
        self.cfg = cfg
        self.dispatcher = dispatcher or LocalDispatcher(cfg.n_routed_experts)
        self.max_seq_len = max_seq_len or cfg.max_position_embeddings
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)  # HF: model.embed_tokens
        self.embed.weight.requires_grad_(False)
        self.layers = nn.ModuleList(Block(i, cfg, self.dispatcher, fp8, attn_impl) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)  # HF: model.norm
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)  # HF: lm_head
        self.head.weight.requires_grad_(False)
        n_mtp = cfg.n_mtp_layers if load_mtp else 0
        self.mtp = nn.ModuleList(MTPBlock(cfg.n_layers + j, cfg, self.dispatcher, fp8, attn_impl) for j in range(n_mtp))
        self.register_buffer("freqs_cis", precompute_freqs_cis(cfg, self.max_seq_len), persistent=False)

    def init_buffers(self) -> None:
        """(Re)compute the rope table on the weights' device, e.g. after building on the meta device."""
        self.freqs_cis = precompute_freqs_cis(self.cfg, self.max_seq_len).to(self.embed.weight.device)

    def new_cache(self, batch: int, max_len: int) -> list:
        """One cache per layer (main layers, then MTP) for `batch` sequences of up to `max_len` tokens."""
        if max_len > self.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds the model's max_seq_len={self.max_seq_len}")
        dtype, device = self.embed.weight.dtype, self.embed.weight.device
        return [layer.attn.new_cache(batch, max_len, dtype, device) for layer in [*self.layers, *self.mtp]]

    def forward(
        self,
        tokens: Tensor,
        start_pos: Tensor | int = 0,
        cache: list | None = None,
        logits_at: Tensor | None = None,
        return_hidden: bool = False,
        n_keys: int | None = None,
        run_block=None,
    ):
        """tokens: [b, s] at positions start_pos + [0, s) (start_pos: int or [b]).

        Without a cache the tokens attend to each other causally. With one, row i's keys are written at
        its own positions and it attends to cache rows [0, start_pos[i] + j]: rows of different lengths
        decode together. Returns logits [b, s, v] fp32, or [b, v] for one position per row if
        `logits_at` [b] gives its index in [0, s) (generation never pays for the others); with
        `return_hidden`, also the final-normed hidden states ([b, s, m], the MTP block's input).
        `n_keys` fixes the cache rows attended over (masked past each position): by default the largest
        position sets it, which reads that position back to the host; a CUDA graph passes the cache length.
        `run_block(layer, h, positions, freqs_cis, keep, cache)` runs each decoder block instead of a plain
        call (DecodeGraphs passes a torch.compile'd one).
        """
        b, s = tokens.shape
        positions = self.positions(tokens, start_pos, n_keys is None)  # [b, s]
        keep = self.attention_mask(positions, cache, n_keys)  # [b, s, t]
        freqs_cis = self.freqs_cis[positions]  # [b, s, r/2]
        h = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache[i]
            h = layer(h, positions, freqs_cis, keep, layer_cache) if run_block is None else run_block(layer, h, positions, freqs_cis, keep, layer_cache)
        if return_hidden:
            h = self.norm(h)  # all positions normed: the MTP block's input
        out = h if logits_at is None else h[torch.arange(b, device=h.device), logits_at]  # [b, s, m] or [b, m]
        logits = self.head(out if return_hidden else self.norm(out)).float()
        return (logits, h) if return_hidden else logits

    def mtp_forward(self, h: Tensor, next_tokens: Tensor, start_pos: Tensor | int = 0, cache: list | None = None) -> Tensor:
        """MTP block 0 on the main model's hidden states h [b, s, m] -> logits [b, s, v] for tokens two ahead."""
        if not self.mtp:
            raise ValueError("the MTP layer was not loaded; build the model with load_mtp=True")
        positions = self.positions(next_tokens, start_pos)
        keep = self.attention_mask(positions, cache)
        layer_cache = None if cache is None else cache[len(self.layers)]
        return self.mtp[0](h, next_tokens, positions, self.freqs_cis[positions], keep, layer_cache)[0]

    def positions(self, tokens: Tensor, start_pos: Tensor | int, check: bool = True) -> Tensor:
        """[b, s] positions of the new tokens; with `check` (a host sync), raise if one is past max_seq_len."""
        b, s = tokens.shape
        start = torch.as_tensor(start_pos, device=tokens.device).expand(b)
        positions = start.unsqueeze(1) + torch.arange(s, device=tokens.device)  # [b, s]
        end = _n_keys(positions) if check else 0
        if end > self.max_seq_len:
            raise ValueError(f"position {end - 1} is beyond max_seq_len={self.max_seq_len}")
        return positions

    @staticmethod
    def attention_mask(positions: Tensor, cache: list | None, n_keys: int | None = None) -> Tensor:
        """[b, s, t] bool: query at position p sees keys at positions <= p (cache rows [0, n_keys) if given)."""
        if cache is None:
            key_positions = positions  # [b, t=s]: the new tokens are the keys
        else:
            t = _n_keys(positions) if n_keys is None else n_keys
            key_positions = torch.arange(t, device=positions.device).expand(positions.shape[0], -1)  # [b, t]
        return key_positions.unsqueeze(1) <= positions.unsqueeze(2)



def _n_keys(positions: Tensor) -> int:
    """Cache rows [0, t) the queries at `positions` may see; 0 for an empty batch (an idle EP rank)."""
    return int(positions.max()) + 1 if positions.numel() else 0
