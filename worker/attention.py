"""Attention over the paged KV cache, for a packed batch of decodes and prefill chunks.

Per step, `AttentionMetadata.build` turns the step plan into gather indices and masks once; every
layer then reuses them.

* Decodes (one query token each) are batched. Sorted by context length and cut into groups of
  at most `DECODE_GROUP` sequences, each group's blocks are gathered into a padded
  ``(seqs, kv_heads, len, head_dim)`` view, so a short context is not padded to the longest one
  of the whole batch. The query heads of each KV head are folded into the query-length axis,
  ``(seqs, kv_heads, group, head_dim)``, so grouped-query attention needs no copy of K/V per
  query head.
* Each prefill chunk runs on its own: causal attention over its fresh K/V when nothing of the
  sequence is cached yet, else over its gathered context with an offset causal mask.

Gathers copy whole rows -- one block of one head, ``block_size * head_dim`` values -- into
scratch buffers owned by the cache and reused by every layer (a fresh tens-of-MB tensor per
layer costs more in page faults than the copy itself).

Sliding windows (Mistral, some Qwen2 layers) add ``key > query - window`` to the masks.

Where a decode-attention kernel exists (`tpkernels.native` on CPU, `tpkernels.triton_attention` on CUDA;
`tpkernels` chooses), decodes skip all of the above: it reads each sequence's blocks where
they lie, through its block table, with no copy and no padding. Short prefill chunks over a cached
context (a request whose prompt starts with a cached prefix, the later chunks of a long prompt)
go the same way: each of their query tokens is a row of its own whose context ends at its own
position, which is the causal mask. Their K/V are in the cache already: every layer writes the
step's K/V before attending. The kernel tiles adjacent rows that share cached blocks, so decodes
on the same cached prompt prefix that arrive interleaved with others are put side by side first
(`_decode_order`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from worker.kv_cache import LayerCache
from worker.step import StepInput

DECODE_GROUP = 16  # decodes per attention call: bounds the padding to similar-length contexts
# Prefill chunks over a cached context of at most this many tokens go to the paged kernel, a row
# per token; longer ones are gathered for SDPA, whose blocked matrix products win there.
PAGED_CHUNK_TOKENS = 64


@dataclass
class Gathered:
    """One padded group of sequences: which cache rows to copy and which keys are real."""

    rows: torch.Tensor  # (kv_heads * seqs * blocks,) rows of the (kv_heads * blocks_per_head, row) cache view
    seqs: int
    length: int  # padded context length, blocks * block_size
    masks: dict = field(default_factory=dict)  # window -> bool mask broadcastable to the scores


@dataclass
class DecodeGroup:
    tokens: torch.Tensor  # (seqs,) positions of these decodes in the packed batch
    kv: Gathered


@dataclass
class PrefillChunk:
    start: int  # first packed token of the chunk
    stop: int
    cached: int  # tokens of the sequence cached before this chunk
    kv: Gathered | None  # its context, when something is cached
    masks: dict = field(default_factory=dict)  # window -> (T, context) bool, when needed


@dataclass
class PagedDecodes:
    """Rows of query tokens the paged kernel serves: each row's block table and context length
    (its own position + 1), and the kernel that reads the cache through them."""

    block_tables: torch.Tensor  # (rows, max_blocks) int64, on the cache's device
    context_lens: torch.Tensor  # (rows,) int64, on the cache's device
    kernel: Callable  # (q, k_cache, v_cache, block_tables, context_lens, scale, window, out) -> None
    tokens: torch.Tensor | None = None  # (rows,) their packed token indices; None: the first rows

    @property
    def num_rows(self) -> int:
        return int(self.context_lens.shape[0])


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (tokens,)
    num_decodes: int
    decode_groups: list[DecodeGroup]
    prefills: list[PrefillChunk]
    paged_decodes: PagedDecodes | None = None

    @classmethod
    def build(cls, step: StepInput, block_size: int, windows: set, kv_heads: int, blocks_per_head: int,
              device: torch.device, decode_kernel: Callable | None = None,
              paged_prefill: bool = False) -> "AttentionMetadata":
        """`paged_prefill`: every prefill chunk goes to `decode_kernel`, a row per token (where the
        kernel outruns SDPA at any length, see `tpkernels.Kernels`); else only short chunks over a
        cached context do."""
        nd = step.num_decodes
        lens = step.query_lens.tolist(), step.context_lens.tolist()  # read back once per step
        if decode_kernel is not None:
            paged_chunks = _paged_chunks(step, *lens, paged_prefill)
            prefills = _prefills(step, *lens, block_size, windows, kv_heads, blocks_per_head, device,
                                 skip=paged_chunks)
            rows = _paged_rows(step, *lens, paged_chunks, decode_kernel, device)
            return cls(step.slot_mapping.to(device), nd, [], prefills, rows)
        prefills = _prefills(step, *lens, block_size, windows, kv_heads, blocks_per_head, device)
        clens = lens[1]
        groups = []
        order = sorted(range(nd), key=clens.__getitem__)
        for g in range(0, nd, DECODE_GROUP):
            idx = order[g:g + DECODE_GROUP]
            ctx = step.context_lens[idx]
            kv = _gathered(step.block_tables[idx], max(clens[i] for i in idx), block_size, kv_heads,
                           blocks_per_head, device)
            keys = torch.arange(kv.length)
            for w in windows:
                m = keys[None, :] < ctx[:, None]
                if w is not None:
                    m &= keys[None, :] > (ctx[:, None] - 1 - w)
                kv.masks[w] = m[:, None, None, :].to(device)  # (seqs, 1, 1, length)
            groups.append(DecodeGroup(torch.tensor(idx, device=device), kv))
        return cls(step.slot_mapping.to(device), nd, groups, prefills)


    @classmethod
    def for_decodes(cls, slot_mapping: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                    decode_kernel: Callable) -> "AttentionMetadata":
        """A decode-only step whose tensors already sit on the device: nothing is read back to the
        host, so a CUDA graph can capture the step."""
        n = slot_mapping.shape[0]
        return cls(slot_mapping, n, [], [], PagedDecodes(block_tables, context_lens, decode_kernel))


def _gathered(tables: torch.Tensor, longest: int, block_size: int, kv_heads: int, blocks_per_head: int,
              device) -> Gathered:
    """tables (seqs, *) block ids → rows of the flat (kv_heads * blocks_per_head, row) cache view."""
    nb = -(-longest // block_size)
    blocks = tables[:, :nb].reshape(-1)
    rows = (torch.arange(kv_heads)[:, None] * blocks_per_head + blocks[None, :]).reshape(-1)
    return Gathered(rows.to(device), tables.shape[0], nb * block_size)


def _paged_chunks(step: StepInput, qlens: list[int], clens: list[int], every: bool) -> set[int]:
    """The prefill sequences whose chunk the paged kernel takes: all (`every`), or those with a
    cached context and few tokens."""
    return {s for s in range(step.num_decodes, step.num_seqs)
            if every or (qlens[s] < clens[s] and qlens[s] <= PAGED_CHUNK_TOKENS)}


def _decode_order(step: StepInput) -> list[int]:
    """The decodes in step order, unless some whose tables start with the same block (a prompt
    prefix the prefix cache shares) lie apart: then grouped by that block, the groups in order of
    their first row. The kernel tiles adjacent rows that share blocks and reads those keys once
    per tile; regrouping costs a gather and a scatter of the rows, so it is done only where it
    joins rows."""
    nd = step.num_decodes
    order = list(range(nd))
    if nd < 3:
        return order
    first = step.block_tables[:nd, 0].tolist()
    groups: dict[int, list[int]] = {}
    for i, b in enumerate(first):
        groups.setdefault(b, []).append(i)
    if all(g[-1] - g[0] == len(g) - 1 for g in groups.values()):  # each group already adjacent
        return order
    return [i for g in groups.values() for i in g]


def _paged_rows(step: StepInput, qlens: list[int], clens: list[int], chunks: set[int], kernel: Callable,
                device) -> PagedDecodes:
    """The decodes (grouped by `_decode_order`), then a row per token of each chunk in `chunks`."""
    nd = step.num_decodes
    order = _decode_order(step)
    if not chunks and order == list(range(nd)):
        return PagedDecodes(step.block_tables[:nd].contiguous().to(device),
                            step.context_lens[:nd].contiguous().to(device), kernel)
    seqs, lens, tokens, start = list(order), [clens[i] for i in order], list(order), nd
    for s in range(nd, step.num_seqs):
        T, L = qlens[s], clens[s]
        if s in chunks:
            seqs += [s] * T
            lens += range(L - T + 1, L + 1)  # token j of the chunk sees the context up to itself
            tokens += range(start, start + T)
        start += T
    t = lambda xs: torch.tensor(xs, dtype=torch.int64, device=device)  # noqa: E731
    every = tokens == list(range(start))  # all the step's tokens in packed order: no index needed
    return PagedDecodes(step.block_tables[seqs].to(device), t(lens), kernel, None if every else t(tokens))


def _prefills(step, qlens: list[int], clens: list[int], block_size, windows, kv_heads, blocks_per_head, device,
              skip: set = frozenset()) -> list[PrefillChunk]:
    chunks, start = [], step.num_decodes
    for s in range(step.num_decodes, step.num_seqs):
        T, L = qlens[s], clens[s]
        if s in skip:
            start += T
            continue
        cached = L - T
        kv = (_gathered(step.block_tables[s:s + 1], L, block_size, kv_heads, blocks_per_head, device)
              if cached else None)
        chunk = PrefillChunk(start, start + T, cached, kv)
        for w in windows:
            if cached or (w is not None and w < T):
                q = torch.arange(cached, L)[:, None]
                k = torch.arange(L)[None, :]
                m = k <= q
                if w is not None:
                    m &= k > q - w
                chunk.masks[w] = m.to(device)
        chunks.append(chunk)
        start += T
    return chunks


def _gather(cache: LayerCache, kv: Gathered) -> tuple[torch.Tensor, torch.Tensor]:
    """The group's K and V, (seqs, kv_heads, length, head_dim) views of the scratch buffers."""
    h, d = cache.num_kv_heads, cache.head_dim
    k, v = cache.scratch(kv.rows.numel())
    torch.index_select(cache.k.view(-1, cache.k.shape[-1]), 0, kv.rows, out=k)
    torch.index_select(cache.v.view(-1, cache.v.shape[-1]), 0, kv.rows, out=v)
    shape = (h, kv.seqs, kv.length, d)
    return k.view(shape).transpose(0, 1), v.view(shape).transpose(0, 1)


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache,
    meta: AttentionMetadata, window: int | None, scale: float,
) -> torch.Tensor:
    """q (tokens, q_heads, d); k, v (tokens, kv_heads, d), already written to `cache`.
    Returns (tokens, q_heads * d)."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    out = torch.empty((n, hq, d), dtype=q.dtype, device=q.device)
    paged = meta.paged_decodes
    if paged is not None and paged.tokens is not None:  # decodes and short chunks: gathered rows
        rows = q.index_select(0, paged.tokens)
        served = torch.empty_like(rows)
        paged.kernel(rows, cache.k, cache.v, paged.block_tables, paged.context_lens, scale, window, served)
        out.index_copy_(0, paged.tokens, served)
    elif paged is not None and paged.num_rows:  # decodes only: the first rows, in place
        nd = paged.num_rows
        paged.kernel(q[:nd], cache.k, cache.v, paged.block_tables, paged.context_lens, scale, window, out[:nd])
    for g in meta.decode_groups:
        ks, vs = _gather(cache, g.kv)
        qd = q.index_select(0, g.tokens).view(g.kv.seqs, hkv, hq // hkv, d)  # a KV head's queries adjacent
        o = F.scaled_dot_product_attention(qd, ks, vs, attn_mask=g.kv.masks[window], scale=scale)
        out.index_copy_(0, g.tokens, o.reshape(g.kv.seqs, hq, d))
    for c in meta.prefills:
        qp = q[c.start:c.stop].transpose(0, 1).unsqueeze(0)  # (1, hq, T, d)
        mask = c.masks.get(window)
        if c.kv is not None:
            L = c.cached + c.stop - c.start
            ks, vs = _gather(cache, c.kv)  # (1, hkv, padded, d)
            kp, vp = ks[:, :, :L], vs[:, :, :L]
        else:
            kp = k[c.start:c.stop].transpose(0, 1).unsqueeze(0)
            vp = v[c.start:c.stop].transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(
            qp, kp, vp, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=hq != hkv,
        )
        out[c.start:c.stop] = o[0].transpose(0, 1)
    return out.view(n, hq * d)
