"""The model runner: the step's rows through the model over the paged latent cache -> logits where asked.

A step runs its decode rows and its prefill rows as two forwards, decode first. MLA here runs a padded
[b, s] batch, not a packed varlen one: in one batch with the prefill chunks every decode row would be padded to
the longest chunk and pay for it in attention, the MoE and (under expert parallelism) the dispatch, so decode
rows run as [b, 1] and prefill chunks as [b', longest chunk]. On one GPU, decode rows replay CUDA graphs over
this pool where they fit (dsr1/engine/paged_graphs.py), else run eagerly.

With a process group (expert parallelism, attention data-parallel), each rank runs its own requests, but
every MoE layer's dispatch is a collective: all ranks run a decode forward if any rank has decode rows, and
a prefill forward if any has prefill rows, a rank without rows feeding an empty batch.

b rows, s longest row, m model dim, k logits asked, v vocabulary
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from dsr1.engine.decode_graphs import hidden_states
from dsr1.engine.paged import LatentPool, layout
from dsr1.model.transformer import Transformer
from dsr1.parallel.dist import all_reduce_max


@dataclass
class Row:
    """One request's positions [start, start + len(tokens)) in a forward."""

    tokens: list[int]
    start: int
    block_table: list[int]
    logits_at: list[int]  # offsets into tokens whose logits come back


@dataclass
class RowLogits:
    """A row's logits [len(logits_at), v] fp32 and, for each, its argmax (the greedy token)."""

    logits: Tensor
    greedy: list[int]


class ModelRunner:
    def __init__(self, model: Transformer, n_blocks: int, block_size: int, group: ProcessGroup | None = None, graphs=None):
        """graphs: a function of the pool -> PagedDecodeGraphs or None (dsr1/engine/paged_graphs.py), for decode rows."""
        self.model, self.group = model, group
        self.pool = LatentPool(model, n_blocks, block_size)
        self.graphs = graphs(self.pool) if graphs is not None else None

    @torch.inference_mode()
    def run(self, decode: list[Row], prefill: list[Row]) -> tuple[list[RowLogits], list[RowLogits]]:
        """Decode rows (one position each), then prefill rows -> each row's logits [len(logits_at), v] fp32."""
        decode_logits = self.forward(decode, self.graphs) if self.anywhere(bool(decode)) else []
        prefill_logits = self.forward(prefill) if self.anywhere(bool(prefill)) else []
        return decode_logits, prefill_logits

    def forward(self, rows: list[Row], graphs=None) -> list[RowLogits]:
        """One padded forward over `rows` (none: an idle EP rank's empty batch) -> logits per row; decode rows that
        each want their one position's logits replay a CUDA graph where `graphs` takes them."""
        device = self.model.embed.weight.device
        where = layout([r.start for r in rows], [len(r.tokens) for r in rows], [r.block_table for r in rows], self.pool.block_size, device)
        tokens = torch.zeros(where.positions.shape, dtype=torch.long)  # [b, s], right-padded
        for i, r in enumerate(rows):
            tokens[i, : len(r.tokens)] = torch.tensor(r.tokens)
        if graphs is not None and graphs.takes(where) and all(r.logits_at == [0] for r in rows):
            logits = graphs.step(where, tokens.to(device))  # [b, v]: each row's one position
        else:
            h = hidden_states(self.model, tokens.to(device), where.positions, self.pool.caches(where), where.n_keys)  # [b, s, m]
            at_row = torch.tensor([i for i, r in enumerate(rows) for _ in r.logits_at], dtype=torch.long, device=device)  # [k]
            at_col = torch.tensor([j for r in rows for j in r.logits_at], dtype=torch.long, device=device)  # [k]
            logits = self.model.logits(h[at_row, at_col])  # [k, v] fp32: the head only where asked
        best = logits.argmax(-1).tolist()  # [k]: each position's greedy token, read back once for the whole forward
        sizes = [len(r.logits_at) for r in rows]
        ends = list(itertools.accumulate(sizes))
        return [RowLogits(part, best[end - size : end]) for part, size, end in zip(logits.split(sizes), sizes, ends)]

    def anywhere(self, flag: bool) -> bool:
        """Whether `flag` holds on this rank (with a group: on any rank); every rank must ask together."""
        return flag if self.group is None else bool(all_reduce_max(int(flag), self.group))
