"""The serving engine's decode steps replayed from CUDA graphs over the paged latent cache, one graph per batch
bucket, as dsr1/engine/decode_graphs.py does for generation's contiguous cache.

A graph fixes shapes and addresses, so each bucket B holds static inputs: the rows' tokens, positions, write
slots and block tables [B, n] with n = key_len / block_size entries (past a row's blocks, and for the B - b
padding rows, the scratch block). Every replay attends over key positions [0, key_len), masked past each row's
position: the key range is fixed instead of read from the positions (a host sync). A decode batch runs from a
graph when it fits the largest bucket and every row's position is below key_len; otherwise the runner decodes
it eagerly. key_len is bounded so that the keys one layer gathers from its blocks for the largest bucket,
[B, key_len, c + r], stay within GATHER_BYTES.

The step's other conditions are decode_graphs.check_capturable's (the masked expert kernel, a dispatcher
without host syncs). Graphs are for one process: under expert parallelism the engine decodes eagerly.

b rows, B bucket, n block-table entries, v vocabulary
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from dsr1.engine.blocks import SCRATCH
from dsr1.engine.decode_graphs import BUCKETS, capture, check_capturable, compiled_block, hidden_states, run_block
from dsr1.engine.paged import LatentPool, Layout
from dsr1.model.transformer import Transformer

GATHER_BYTES = 1 << 30  # the largest bucket's gathered keys per layer, [B, key_len, c + r], at most this


@dataclass
class _Graph:
    """One bucket's graph and the static tensors it reads and writes (they must outlive it)."""

    graph: torch.cuda.CUDAGraph
    tokens: Tensor  # [B, 1]
    positions: Tensor  # [B, 1]
    slots: Tensor  # [B, 1]
    block_table: Tensor  # [B, n]
    logits: Tensor | None = None  # [B, v] fp32, written by each replay


class PagedDecodeGraphs:
    def __init__(self, model: Transformer, pool: LatentPool, max_batch: int, max_len: int, compile: bool = False):
        """Graphs for decode batches of up to max_batch rows at positions below min(max_len, the GATHER_BYTES bound);
        `pool` is the runner's. compile: decoder blocks through torch.compile, as DecodeGraphs(compile=True)."""
        check_capturable(model)
        self.model, self.pool = model, pool
        self.buckets = tuple(size for size in BUCKETS if size < max_batch) + (max_batch,)
        row_bytes = pool.pools[0][0, 0].nbytes  # one position's latent row
        blocks = min(-(-max_len // pool.block_size), GATHER_BYTES // (max_batch * row_bytes * pool.block_size))
        self.key_len = max(1, blocks) * pool.block_size
        self.memory = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, _Graph] = {}
        self.block = compiled_block() if compile else run_block

    def takes(self, where: Layout) -> bool:
        """Whether a decode batch laid out as `where` (one position per row) runs from a graph."""
        b = where.positions.shape[0]
        return 0 < b <= self.buckets[-1] and where.n_keys <= self.key_len

    def step(self, where: Layout, tokens: Tensor) -> Tensor:
        """tokens [b, 1] at where's positions -> logits [b, v] fp32; captures the bucket's graph on first use."""
        b = tokens.shape[0]
        size = next(size for size in self.buckets if size >= b)
        g = self.graphs.get(size) or self._capture(size)
        g.tokens.zero_()
        g.positions.zero_()
        g.slots.fill_(SCRATCH * self.pool.block_size)
        g.block_table.fill_(SCRATCH)
        g.tokens[:b].copy_(tokens)
        g.positions[:b].copy_(where.positions)
        g.slots[:b].copy_(where.slots)
        g.block_table[:b, : where.block_table.shape[1]].copy_(where.block_table)
        g.graph.replay()
        return g.logits[:b].clone()

    def _capture(self, size: int) -> _Graph:
        device = self.model.embed.weight.device
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.long, device=device)  # noqa: E731
        g = _Graph(torch.cuda.CUDAGraph(), zeros(size, 1), zeros(size, 1), zeros(size, 1), zeros(size, self.key_len // self.pool.block_size))
        g.slots.fill_(SCRATCH * self.pool.block_size)  # capture's own runs write to the scratch block only
        g.block_table.fill_(SCRATCH)

        def run(block: Callable) -> Tensor:
            caches = self.pool.caches(Layout(g.positions, g.slots, g.block_table, self.key_len))
            h = hidden_states(self.model, g.tokens, g.positions, caches, self.key_len, block)  # [B, 1, m]
            return self.model.logits(h[:, 0])  # [B, v]

        g.logits = capture(self.model, g.graph, self.memory, run, self.block)
        self.graphs[size] = g
        return g


def make_paged_graphs(model: Transformer, pool: LatentPool, mode: str, max_batch: int, max_len: int, compile: bool = False) -> PagedDecodeGraphs | None:
    """EngineConfig.cuda_graphs (checked there): `off` decodes eagerly; `on` builds graphs or raises saying why it can't; `auto`
    builds them where check_capturable allows (a CUDA device, the masked expert kernel, a capturable dispatcher)."""
    if mode == "off":
        return None
    try:
        return PagedDecodeGraphs(model, pool, max_batch, max_len, compile)
    except ValueError:
        if mode == "on":
            raise
        return None
