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

import torch


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
    def __init__(self, num_kv_heads: int, num_blocks: int, block_size: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, scratch: Scratch):
        shape = (num_kv_heads, num_blocks, block_size * head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.scratch = scratch.take

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: (tokens, num_kv_heads, head_dim) stored at cache slots `slots` (tokens,)."""
        h, d = self.num_kv_heads, self.head_dim
        self.k.view(h, -1, d).index_copy_(1, slots, k.transpose(0, 1))
        self.v.view(h, -1, d).index_copy_(1, slots, v.transpose(0, 1))


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int,
                 block_size: int, dtype: torch.dtype, device: torch.device):
        self.num_blocks, self.block_size = num_blocks, block_size  # blocks for sequences
        self.pad_block = num_blocks
        self.blocks_per_head = num_blocks + 1  # the cache's second dimension: the pad block included
        scratch = Scratch(block_size * head_dim, dtype, device)
        self.layers = [
            LayerCache(num_kv_heads, self.blocks_per_head, block_size, head_dim, dtype, device, scratch)
            for _ in range(num_layers)
        ]

    @staticmethod
    def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                        dtype: torch.dtype) -> int:
        elem = torch.tensor([], dtype=dtype).element_size()
        return 2 * num_layers * num_kv_heads * head_dim * block_size * elem


class OutOfBlocks(RuntimeError):
    pass


class BlockManager:
    """Free list of block ids and each sequence's block table. Block ids are the same on every rank."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self.tables: dict[int, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

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
        table.extend(self._free.pop() for _ in range(need))
        return table

    def free(self, seq_id: int) -> int:
        """Returns `seq_id`'s blocks to the free list; the number freed."""
        table = self.tables.pop(seq_id, [])
        self._free.extend(reversed(table))
        return len(table)
