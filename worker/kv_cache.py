"""The paged KV cache: fixed-size blocks of token slots, and the block manager that hands them out.

Every rank holds, for each layer, K and V for *its own* KV heads only, laid out
``(num_kv_heads, num_blocks, block_size * head_dim)``: one block of one head is a contiguous row,
so gathering a sequence's blocks is a row copy, and the gathered ``(heads, seqs, len, head_dim)``
view needs no further copy. Slot s is token ``s % block_size`` of block ``s // block_size``.

One block more than asked for is allocated: the *pad block* (id ``num_blocks``), which the block
manager never hands out. Padded rows of a step (`worker.cuda_graphs` pads decode batches to fixed
sizes) write their K/V there and attend over it, so they can never touch a sequence's blocks.

The block manager runs on rank 0 only (the scheduler's side); the other ranks just obey the slot
numbers in each step's plan.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

import torch

from worker import host_memory

POPULATE_CHOICES = ("background", "before_ready", "on_use")  # engine.kv_cache_populate


class Scratch:
    """Output buffers for K/V gathers, shared by all layers (they run one after another) and
    grown on demand: allocating tens of MB afresh per layer costs more in page faults than the
    copy into them."""

    def __init__(self, row: int, dtype: torch.dtype, device: torch.device):
        self.row, self.dtype, self.device = row, dtype, device
        self.k = self.v = torch.empty((0, row), dtype=dtype, device=device)

    def take(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        if rows > self.k.shape[0]:
            grow = max(rows, 2 * self.k.shape[0])
            self.k = torch.empty((grow, self.row), dtype=self.dtype, device=self.device)
            self.v = torch.empty((grow, self.row), dtype=self.dtype, device=self.device)
        return self.k[:rows], self.v[:rows]


class LayerCache:
    def __init__(self, k: torch.Tensor, v: torch.Tensor, head_dim: int, scratch: Scratch):
        """k, v: zeroed, (num_kv_heads, num_blocks, block_size * head_dim)."""
        self.k, self.v = k, v
        self.num_kv_heads, self.head_dim = k.shape[0], head_dim
        self.scratch = scratch.take

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: (tokens, num_kv_heads, head_dim) stored at cache slots `slots` (tokens,)."""
        h, d = self.num_kv_heads, self.head_dim
        self.k.view(h, -1, d).index_copy_(1, slots, k.transpose(0, 1))
        self.v.view(h, -1, d).index_copy_(1, slots, v.transpose(0, 1))


class KVCache:
    """Every layer's K and V. On the host they lie in one mapping from `host_memory.zeroed`, whose
    pages the kernel zero-fills on first touch: nothing is written at allocation, and `populate`
    faults the pages in ahead of use (now, or on a low-priority thread). On a GPU: `torch.zeros`."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int,
                 block_size: int, dtype: torch.dtype, device: torch.device):
        self.num_blocks, self.block_size = num_blocks, block_size  # blocks for sequences
        self.pad_block = num_blocks
        self.blocks_per_head = num_blocks + 1  # the cache's second dimension: the pad block included
        scratch = Scratch(block_size * head_dim, dtype, device)
        shape = (num_kv_heads, self.blocks_per_head, block_size * head_dim)
        per_tensor = num_kv_heads * self.blocks_per_head * block_size * head_dim
        self.populator: host_memory.Populator | None = None
        if torch.device(device).type == "cpu":
            memory = host_memory.zeroed(
                self.blocks_per_head * self.bytes_per_block(num_layers, num_kv_heads, head_dim, block_size, dtype))
            self.populator = host_memory.Populator(memory)
            flat = memory.view(dtype)
            tensors = [flat[i * per_tensor:(i + 1) * per_tensor].view(shape) for i in range(2 * num_layers)]
        else:
            tensors = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(2 * num_layers)]
        self.layers = [LayerCache(tensors[2 * i], tensors[2 * i + 1], head_dim, scratch) for i in range(num_layers)]

    def populate(self, when: str) -> None:
        """Host memory only: fault the cache's pages in `before_ready` (before this returns), in
        the `background` (a thread at nice 19), or `on_use` (never ahead: each comes in when a
        step first writes it, and the process holds only what has been used)."""
        if when not in POPULATE_CHOICES:
            raise ValueError(f"populate: one of {POPULATE_CHOICES}, got {when!r}")
        if self.populator is None or when == "on_use":
            return
        if when == "before_ready":
            self.populator.run()
        else:
            self.populator.start()

    def close(self) -> None:
        """Stops a background populate (it holds the memory until it ends)."""
        if self.populator is not None:
            self.populator.stop()

    @staticmethod
    def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                        dtype: torch.dtype) -> int:
        elem = torch.tensor([], dtype=dtype).element_size()
        return 2 * num_layers * num_kv_heads * head_dim * block_size * elem


class OutOfBlocks(RuntimeError):
    pass


class BlockManager:
    """Block ids, each sequence's block table, and the prefix cache. Block ids are the same on
    every rank; this runs on rank 0 only.

    Blocks are reference-counted. A full block whose tokens, and every token before them, have
    been computed is *registered* (`commit`) under an exact key: the content id of the block
    before it (-1 for a sequence's first block) and its own tokens. A new sequence whose tokens
    start with registered blocks shares them (`share_prefix`) instead of computing them again.
    Keys chain through content ids, never hashes, so two different prefixes can never collide.

    A block whose last user ends returns to the free list with its content and key intact, and
    is taken back by the next sequence that needs that prefix; the free list hands out the least
    recently freed block first, and only then is its content forgotten (evicted). A sequence's
    blocks are freed last-first, so a prefix outlives the tails that hang off it.

    Invariants: a block is in the free list iff its reference count is 0; a block with a key is
    full and its K/V are final, so no sequence ever writes into it (`share_prefix` leaves at
    least the last token of a sequence to compute, in a block of its own); `cached[key_of[b]] is b`.
    """

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix_caching = prefix_caching
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # first: next out
        self._refs = [0] * num_blocks
        self.tables: dict[int, list[int]] = {}
        self._cached: dict[tuple, int] = {}  # key -> block
        self._key_of: dict[int, tuple] = {}  # block -> its key
        self._content_id: dict[int, int] = {}  # registered block -> id its successors' keys name
        self._content_ids = itertools.count()
        self._chain: dict[int, tuple[int, int]] = {}  # seq -> (blocks registered, last content id)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        """Registered blocks, in use or free (free ones until they are handed out again)."""
        return len(self._cached)

    def blocks_needed(self, seq_id: int, num_tokens: int) -> int:
        """Blocks to add so that `seq_id` can hold `num_tokens` tokens in total."""
        have = len(self.tables.get(seq_id, ()))
        return max(0, -(-num_tokens // self.block_size) - have)

    def can_allocate(self, seq_id: int, num_tokens: int) -> bool:
        return self.blocks_needed(seq_id, num_tokens) <= len(self._free)

    def allocate(self, seq_id: int, num_tokens: int) -> list[int]:
        """Grow `seq_id`'s table to hold `num_tokens` tokens; returns the whole table."""
        need = self.blocks_needed(seq_id, num_tokens)
        if need > len(self._free):
            raise OutOfBlocks(f"sequence {seq_id} needs {need} blocks, {len(self._free)} free")
        table = self.tables.setdefault(seq_id, [])
        for _ in range(need):
            block, _ = self._free.popitem(last=False)
            self._forget(block)  # its old content, if any, is evicted now
            self._refs[block] = 1
            table.append(block)
        return table

    def free(self, seq_id: int) -> int:
        """Drops `seq_id`'s references; blocks nobody else uses return to the free list (keeping
        their content until handed out again). Returns the number of blocks in its table."""
        table = self.tables.pop(seq_id, [])
        self._chain.pop(seq_id, None)
        for block in reversed(table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None
        return len(table)

    # -- the prefix cache -----------------------------------------------------------------------
    def share_prefix(self, seq_id: int, token_ids: list[int]) -> int:
        """For a sequence with no blocks yet: shares the registered blocks its tokens start with,
        leaving at least its last token to compute. Returns the number of tokens they hold."""
        if not self.prefix_caching or seq_id in self.tables:
            return 0
        bs, parent, shared = self.block_size, -1, []
        for i in range((len(token_ids) - 1) // bs):
            block = self._cached.get((parent, tuple(token_ids[i * bs:(i + 1) * bs])))
            if block is None:
                break
            shared.append(block)
            parent = self._content_id[block]
        if not shared:
            return 0
        for block in shared:
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1
        self.tables[seq_id] = shared
        self._chain[seq_id] = (len(shared), parent)
        return len(shared) * bs

    def commit(self, seq_id: int, token_ids: list[int], num_computed: int) -> None:
        """Registers `seq_id`'s blocks that `num_computed` computed tokens have filled."""
        if not self.prefix_caching:
            return
        bs, table = self.block_size, self.tables[seq_id]
        done, parent = self._chain.get(seq_id, (0, -1))
        for i in range(done, num_computed // bs):
            key = (parent, tuple(token_ids[i * bs:(i + 1) * bs]))
            holder = self._cached.get(key)
            if holder is None:  # new content: this block becomes its holder
                holder = table[i]
                self._cached[key], self._key_of[holder] = holder, key
                self._content_id[holder] = next(self._content_ids)
            parent = self._content_id[holder]  # a duplicate chains on through the holder
            done = i + 1
        self._chain[seq_id] = (done, parent)

    def _forget(self, block: int) -> None:
        key = self._key_of.pop(block, None)
        if key is not None:
            del self._cached[key]
            del self._content_id[block]
