"""Decode steps replayed from CUDA graphs.

A decode step of a small model is bound by kernel launches, not by the GPU: each of its few hundred
kernels takes microseconds to launch and less to run. A CUDA graph records a step's kernels once and
replays them all with one launch. A graph fixes every tensor's shape and address, so:

* a step's sequences are padded up to a *bucket* size (1, 2, 4, then multiples of 8 up to the
  largest batch). Padded rows decode token 0 at position 0 through the cache's pad block
  (`worker.kv_cache`), so they never touch a sequence's blocks, and their logits are dropped;
* block tables are padded to the widest table the model allows (`max_positions / block_size`);
* the step's integers travel in one static int64 buffer per bucket, laid out as the step plan's
  wire payload (`worker.step`), so a replay costs one host-to-device copy and one graph launch.

Only decode-only steps that fit the largest bucket qualify; prefills and anything else run eagerly.
`pad_decodes` is also what the CPU tests check: a padded step's logits, cut back to the real rows,
equal the unpadded step's.

A bucket's graph is captured the first time a step of that size comes: the step runs once eagerly
on the static buffers (compiling and warming up every kernel), is captured, then replayed. A
serving rank 0 brings every bucket in at start-up (`ModelRunner.capture_graphs`) with `warm_up_step`s,
decode steps of `size` rows that all sit in the pad block. The ranks of a replica see the same
steps, so they capture the same bucket at the same step, as collectives in a graph require.
Capturing needs collectives that CUDA graphs can record: none (one rank) or NCCL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from worker.kv_cache import KVCache
from worker.step import StepInput


def bucket_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, ... up to max_batch_size (which is always the last one)."""
    sizes = [s for s in (1, 2, 4) if s < max_batch_size] + list(range(8, max_batch_size, 8))
    return sizes + [max_batch_size]


def bucket_for(n: int, sizes: list[int]) -> int | None:
    """The smallest bucket holding n sequences; None when n exceeds the largest."""
    return next((s for s in sizes if s >= n), None)


def pad_decodes(step: StepInput, size: int, width: int, pad_block: int, block_size: int) -> StepInput:
    """A decode-only step of n sequences as one of `size` >= n sequences whose block tables are
    `width` wide. Rows n.. decode token 0 at position 0, writing and reading only `pad_block`."""
    n = step.num_seqs
    if step.num_decodes != n or step.logits_indices.shape[0] != n:
        raise ValueError("only decode-only steps that want every row's logits are padded")
    if not n <= size or step.block_tables.shape[1] > width:
        raise ValueError(f"a step of {n} sequences, tables {step.block_tables.shape[1]} wide, "
                         f"does not fit {size} x {width}")
    extra = size - n

    def grow(t: torch.Tensor, fill: int) -> torch.Tensor:
        return torch.cat([t, torch.full((extra,), fill, dtype=torch.int64)])

    tables = torch.full((size, width), pad_block, dtype=torch.int64)
    tables[:n, :step.block_tables.shape[1]] = step.block_tables
    return StepInput(
        input_ids=grow(step.input_ids, 0),
        positions=grow(step.positions, 0),
        slot_mapping=grow(step.slot_mapping, pad_block * block_size),
        query_lens=torch.ones(size, dtype=torch.int64),
        context_lens=grow(step.context_lens, 1),
        block_tables=tables,
        logits_indices=torch.arange(size, dtype=torch.int64),
        num_decodes=size,
    )


@dataclass
class _Bucket:
    buffer: torch.Tensor  # the padded step's payload, on the device; its views feed the graph
    replay: Callable[[], torch.Tensor | None]  # runs the step on `buffer`: logits (size, vocab) or None


class DecodeGraphs:
    """Decode steps of up to `max_batch_size` sequences, run as one graph replay per step.

    `capture=False` keeps everything but the graph (each replay runs the forward eagerly on the
    static buffers): that is how CPU tests exercise the padding and the buffers."""

    def __init__(self, model, cache: KVCache, max_batch_size: int, *, capture: bool = True):
        group = model.group
        if capture and group.world_size > 1 and group.backend != "nccl":
            raise ValueError(f"CUDA graphs need NCCL collectives at TP > 1 (the backend is {group.backend})")
        if model.kernels.decode_attention is None:
            raise ValueError("CUDA graphs need a paged decode-attention kernel")
        self.model, self.cache, self.capture = model, cache, capture
        self.sizes = bucket_sizes(max_batch_size)
        self.width = -(-model.max_positions // cache.block_size)
        self.buckets: dict[int, _Bucket] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def warm_up_step(self, size: int) -> StepInput:
        """A decode step of `size` rows that read and write only the pad block: it brings the
        bucket of that size in without touching any sequence."""
        pad = self.cache.pad_block
        return StepInput.build([([0], 0, [pad])] * size, self.cache.block_size)

    def fits(self, step: StepInput) -> bool:
        n = step.num_seqs
        return (0 < n <= self.sizes[-1] and step.num_decodes == n and step.logits_indices.shape[0] == n
                and step.block_tables.shape[1] <= self.width)

    def run(self, step: StepInput) -> torch.Tensor | None:
        """Logits (n, vocab) of a step that `fits`, on rank 0 (None elsewhere); a view into the
        bucket's static output, valid until its next replay."""
        n = step.num_seqs
        size = bucket_for(n, self.sizes)
        padded = pad_decodes(step, size, self.width, self.cache.pad_block, self.cache.block_size)
        bucket = self.buckets.get(size)
        if bucket is None:
            bucket = self.buckets[size] = self._new_bucket(size, padded)
        else:
            bucket.buffer.copy_(padded.payload(), non_blocking=True)
        logits = bucket.replay()
        return None if logits is None else logits[:n]

    def _new_bucket(self, size: int, padded: StepInput) -> _Bucket:
        buffer = padded.payload().to(self.model.device)
        step = StepInput.views(buffer, size, size, self.width, size, size)  # a decode per row, each wanting logits

        def forward():
            return self.model(self.model.decode_batch(step), self.cache)

        if not self.capture:
            return _Bucket(buffer, forward)
        # Warm up on a side stream (kernels compile and allocate their workspaces outside capture).
        # It runs this very step, so its K/V writes are the ones the replay repeats.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = forward()

        def replay():
            graph.replay()
            return logits

        return _Bucket(buffer, replay)
