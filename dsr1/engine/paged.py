"""The paged latent cache: MLA's absorbed-path rows (kv latent then rope key, c + r values per position) kept
in fixed-size blocks, one pool per layer, instead of one contiguous [batch, max_len] row per sequence.

A sequence's block table lists its blocks in order: position p lives in block table[p // block_size] at
offset p % block_size. For each forward the runner gives every layer the same batch layout: the table of
each row (entries past the row's blocks point at the scratch block) and the slot (flat pool row) each new
position writes to. Padding positions of a padded batch write to the scratch block, so they never touch
another sequence's block or a block shared through the prefix cache.

b batch, s new positions, t key positions, n blocks per row, B block size, c kv latent, r rope dim
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dsr1.engine.blocks import SCRATCH
from dsr1.model.transformer import Transformer


@dataclass(frozen=True)
class PagedLatentCache:
    """One layer's pool and this forward's layout; MLA calls `store` as it calls LatentCache's."""

    pool: Tensor  # [N, B, c + r]: every block of this layer
    block_table: Tensor  # [b, n] block ids, SCRATCH past each row's blocks
    slots: Tensor  # [b, s] flat pool row (block * B + offset) of each new position; padding: SCRATCH's rows

    def store(self, positions: Tensor, keys: Tensor, n_keys: int) -> Tensor:
        """Write this call's keys [b, s, c + r] (at `positions`, which `slots` already encodes) -> the keys at
        positions [0, n_keys) of each row, gathered from its blocks: [b, t, c + r]."""
        self.write(positions, keys)
        return self.pool[self.block_table].flatten(1, 2)[:, :n_keys]  # [b, n, B, c + r] -> [b, t, c + r]

    def write(self, positions: Tensor, keys: Tensor) -> None:
        """Write this call's keys [b, s, c + r] only (a kernel that reads the blocks in place follows: MLA.paged)."""
        self.pool.view(-1, keys.shape[-1])[self.slots] = keys

    def pages(self, b: int) -> tuple[Tensor, Tensor]:
        """The pool and the b rows' block tables, for a kernel that reads the blocks in place."""
        return self.pool, self.block_table


@dataclass(frozen=True)
class Layout:
    """Where one padded batch of rows sits in the cache: the tensors a forward needs."""

    positions: Tensor  # [b, s] each query's position; padding repeats its row's last real position
    slots: Tensor  # [b, s]
    block_table: Tensor  # [b, n]
    n_keys: int  # key positions [0, t) the forward attends over: the batch's largest position + 1


class LatentPool:
    """The latent rows of every main layer (the MTP block is not served), n_blocks blocks of block_size positions."""

    def __init__(self, model: Transformer, n_blocks: int, block_size: int):
        self.block_size = block_size
        width = model.cfg.kv_lora_rank + model.cfg.qk_rope_head_dim  # c + r
        dtype, device = model.embed.weight.dtype, model.embed.weight.device
        self.pools = [torch.zeros(n_blocks, block_size, width, dtype=dtype, device=device) for _ in model.layers]

    def caches(self, where: Layout) -> list[PagedLatentCache]:
        """Every layer's cache for one forward laid out as `where` says."""
        return [PagedLatentCache(pool, where.block_table, where.slots) for pool in self.pools]


def layout(starts: list[int], lengths: list[int], tables: list[list[int]], block_size: int, device: torch.device) -> Layout:
    """Rows computing positions [starts[i], starts[i] + lengths[i]) with block tables `tables`, right-padded to
    the longest row (at least one position, also for an empty batch), on `device`."""
    s = max(lengths, default=1)
    n_keys = max((a + n for a, n in zip(starts, lengths)), default=1)
    table = torch.full((len(tables), -(-n_keys // block_size)), SCRATCH, dtype=torch.long)  # [b, n]
    for i, blocks in enumerate(tables):
        table[i, : len(blocks)] = torch.tensor(blocks[: table.shape[1]], dtype=torch.long)
    offsets = torch.arange(s)  # [s]
    start = torch.tensor(starts, dtype=torch.long).view(-1, 1)  # [b, 1]
    length = torch.tensor(lengths, dtype=torch.long).view(-1, 1)  # [b, 1]
    positions = start + torch.minimum(offsets, length - 1)  # [b, s]: padding at the row's last position
    slots = table.gather(1, positions // block_size) * block_size + positions % block_size  # [b, s]
    slots = torch.where(offsets < length, slots, SCRATCH * block_size)  # padding writes to the scratch block
    return Layout(positions.to(device), slots.to(device), table.to(device), n_keys)


def bytes_per_block(model: Transformer, block_size: int) -> int:
    """Bytes one block takes over all main layers: block_size positions of kv_lora_rank + qk_rope_head_dim values."""
    cfg = model.cfg
    return len(model.layers) * block_size * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * model.embed.weight.element_size()
