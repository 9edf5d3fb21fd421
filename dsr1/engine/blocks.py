"""The block manager: which blocks of the paged latent cache each sequence holds, with reference counts and
prefix caching.

A block holds the latent rows of `block_size` consecutive positions of one sequence. Once a full block has
been computed it is keyed by a hash of (the previous block's hash, its token ids): the hash names the whole
prefix up to the block's end, so a later request whose prompt starts with the same tokens reuses the block
instead of recomputing it (a shared block has one reference per sequence). A block whose last reference goes
keeps its hash and contents: it is "cached-free", reusable by a prefix hit until a free block is needed and it
is evicted, least recently freed first. Blocks with nothing worth keeping are handed out before those.

Block 0 is never handed out: it is the scratch block that padding positions write to (dsr1/engine/paged.py).
"""

from __future__ import annotations

from collections import OrderedDict, deque

SCRATCH = 0  # the reserved block: padding writes here, and block-table entries past a sequence's blocks point here


def block_hash(previous: int | None, token_ids: tuple[int, ...]) -> int:
    """The key of a full block: the hash of the prefix before it and its own tokens."""
    return hash((previous, token_ids))


class BlockManager:
    def __init__(self, n_blocks: int, block_size: int, prefix_caching: bool = True):
        """n_blocks blocks of block_size positions, block SCRATCH among them (n_blocks - 1 usable)."""
        assert n_blocks >= 2, "one scratch block and at least one usable block"
        self.n_blocks, self.block_size, self.prefix_caching = n_blocks, block_size, prefix_caching
        self.refs = [0] * n_blocks  # sequences holding each block
        self.hash_of: list[int | None] = [None] * n_blocks  # a computed full block's key
        self.tokens_of: list[tuple[int, ...] | None] = [None] * n_blocks  # its tokens: a hash collision is no hit
        self.cached: dict[int, int] = {}  # key -> block id
        self.empty = deque(b for b in range(n_blocks) if b != SCRATCH)  # unreferenced blocks without a key
        self.evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced blocks with a key, least recently freed first

    @property
    def n_free(self) -> int:
        """Blocks allocate() can hand out now (empty ones, then cached-free ones evicted)."""
        return len(self.empty) + len(self.evictable)

    @property
    def n_usable(self) -> int:
        return self.n_blocks - 1

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def keys(self, token_ids: list[int]) -> list[int]:
        """The keys of the full blocks token_ids fill."""
        keys, size = [], self.block_size
        for i in range(len(token_ids) // size):
            keys.append(block_hash(keys[-1] if keys else None, tuple(token_ids[i * size : (i + 1) * size])))
        return keys

    def match(self, token_ids: list[int]) -> tuple[list[int], list[int]]:
        """The longest run of cached full blocks that token_ids start with, leaving at least the last token to
        compute (its logits choose the next token) -> (block ids, their keys). Changes nothing."""
        blocks, size = [], self.block_size
        if not self.prefix_caching:
            return blocks, []
        keys = self.keys(token_ids[: (len(token_ids) - 1) // size * size])
        for i, key in enumerate(keys):
            block = self.cached.get(key)
            if block is None or self.tokens_of[block] != tuple(token_ids[i * size : (i + 1) * size]):
                break
            blocks.append(block)
        return blocks, keys[: len(blocks)]

    def n_reviving(self, block_ids: list[int]) -> int:
        """How many of block_ids are cached-free: acquiring them takes them out of the free blocks."""
        return sum(self.refs[b] == 0 for b in block_ids)

    def acquire(self, block_ids: list[int]) -> None:
        """One more reference to each of block_ids (prefix hits)."""
        for b in block_ids:
            if self.refs[b] == 0:
                del self.evictable[b]
            self.refs[b] += 1

    def allocate(self, n: int) -> list[int]:
        """n blocks with one reference each: empty ones first, then the least recently freed cached ones."""
        assert n <= self.n_free, f"allocate({n}) with {self.n_free} free: the scheduler checks first"
        out = []
        for _ in range(n):
            if self.empty:
                b = self.empty.popleft()
            else:
                b, _ = self.evictable.popitem(last=False)
                del self.cached[self.hash_of[b]]
                self.hash_of[b] = self.tokens_of[b] = None
            self.refs[b] = 1
            out.append(b)
        return out

    def release(self, block_ids: list[int]) -> None:
        """Drop one reference to each of block_ids; a block left with none becomes free (cached-free if keyed).
        The sequence's last blocks go first, so its shared prefix stays cached longest."""
        for b in reversed(block_ids):
            assert self.refs[b] > 0, f"block {b} released more often than held"
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if self.hash_of[b] is None:
                    self.empty.append(b)
                else:
                    self.evictable[b] = None

    def register(self, block_id: int, key: int, tokens: tuple[int, ...]) -> None:
        """Key a block that has just been computed full, so later prompts can reuse it. A block already keyed
        (a prefix hit) stays as it is; so does one whose key another block already holds (the same tokens
        computed twice at once), which then is freed as an empty block."""
        if self.prefix_caching and self.hash_of[block_id] is None and key not in self.cached:
            self.cached[key] = block_id
            self.hash_of[block_id], self.tokens_of[block_id] = key, tokens
