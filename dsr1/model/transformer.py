"""The DeepSeek-V3/R1 decoder: embedding, decoder blocks (dense MLP first, MoE after), final norm, lm_head,
and the multi-token-prediction (MTP) block that follows the last layer in the checkpoint.

b batch, s new positions, t key positions, m model dim, v vocabulary
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dsr1.config import ModelConfig
from dsr1.model.attention import MLA, Causal
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

    def forward(self, x: Tensor, positions: Tensor, freqs_cis: Tensor, mask: Causal, cache=None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), positions, freqs_cis, mask, cache)
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

    def forward(self, h: Tensor, next_tokens: Tensor, positions: Tensor, freqs_cis: Tensor, mask: Causal, cache=None):
        """h: [b, s, m] main-model hidden states (after its final norm, as vLLM and HF feed them),
        next_tokens: [b, s] -> (logits [b, s, v] fp32, h')."""
        x = self.eh_proj(torch.cat([self.enorm(self.embed(next_tokens)), self.hnorm(h)], dim=-1))
        x = super().forward(x, positions, freqs_cis, mask, cache)
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
        self, tokens: Tensor, start_pos: Tensor | int = 0, cache: list | None = None, logits_at: Tensor | None = None, return_hidden: bool = False
    ):
        """tokens: [b, s] at positions start_pos + [0, s) (start_pos: int or [b]).

        Without a cache the tokens attend to each other causally. With one, row i's keys are written at
        its own positions and it attends to cache rows [0, start_pos[i] + j]: rows of different lengths
        decode together. An int start_pos is every row's (prefill chunks): queries [a, a + s) against keys
        [0, a + s), causal from the lower right, which flash attention takes on a GPU. Returns logits [b, s, v] fp32, or [b, v] for one position per row if
        `logits_at` [b] gives its index in [0, s) (generation never pays for the others); with
        `return_hidden`, also the final-normed hidden states ([b, s, m], the MTP block's input).
        """
        positions = self.positions(tokens, start_pos)  # [b, s]
        mask = self.causal(positions, start_pos, cache)  # n_keys: a host sync
        freqs_cis = self.freqs_cis[positions]  # [b, s, r/2]
        h = self.embed(tokens)  # [b, s, m]
        for i, layer in enumerate(self.layers):
            h = layer(h, positions, freqs_cis, mask, None if cache is None else cache[i])
        if not return_hidden:
            return self.logits(h, logits_at)
        h = self.norm(h)  # all positions normed: the MTP block's input
        return self.head(h if logits_at is None else _pick(h, logits_at)).float(), h

    def logits(self, h: Tensor, logits_at: Tensor | None = None) -> Tensor:
        """Final norm and lm_head: h [b, s, m] -> [b, s, v] fp32, or [b, v] at index logits_at [b] of each row."""
        return self.head(self.norm(h if logits_at is None else _pick(h, logits_at))).float()

    def mtp_forward(self, h: Tensor, next_tokens: Tensor, start_pos: Tensor | int = 0, cache: list | None = None) -> Tensor:
        """MTP block 0 on the main model's hidden states h [b, s, m] -> logits [b, s, v] for tokens two ahead."""
        if not self.mtp:
            raise ValueError("the MTP layer was not loaded; build the model with load_mtp=True")
        positions = self.positions(next_tokens, start_pos)
        layer_cache = None if cache is None else cache[len(self.layers)]
        return self.mtp[0](h, next_tokens, positions, self.freqs_cis[positions], self.causal(positions, start_pos, cache), layer_cache)[0]

    @staticmethod
    def positions(tokens: Tensor, start_pos: Tensor | int) -> Tensor:
        """[b, s] positions of the new tokens [b, s] at start_pos (int or [b])."""
        b, s = tokens.shape
        start = torch.as_tensor(start_pos, device=tokens.device).expand(b)
        return start.unsqueeze(1) + torch.arange(s, device=tokens.device)  # [b, s]

    def n_keys(self, positions: Tensor) -> int:
        """The cache rows [0, t) queries at `positions` [b, s] may see; raises if one is past max_seq_len.
        Reads the largest position back to the host (a CUDA graph fixes t instead: dsr1/engine/decode_graphs.py)."""
        t = _max_position(positions) + 1
        if t > self.max_seq_len:
            raise ValueError(f"position {t - 1} is beyond max_seq_len={self.max_seq_len}")
        return t

    def causal(self, positions: Tensor, start_pos: Tensor | int, cache: list | None) -> Causal:
        """Which keys the queries at `positions` [b, s] see: without a cache the new tokens themselves, with one
        cache rows [0, t), t up to the largest position (n_keys, a host sync). A start_pos given as an int is
        every row's: each row's queries are then the last s of the t keys (Causal.aligned)."""
        if cache is None:
            return Causal.own(positions)
        return Causal.cached(positions, self.n_keys(positions), aligned=isinstance(start_pos, int))


def _max_position(positions: Tensor) -> int:
    """The largest of `positions`, read back to the host; -1 for an empty batch (an idle EP rank)."""
    return int(positions.max()) if positions.numel() else -1


def _pick(h: Tensor, index: Tensor) -> Tensor:
    """h [b, s, m] at position index[i] of each row i -> [b, m]."""
    return h[torch.arange(h.shape[0], device=h.device), index]
