"""Attention over the paged KV cache, for a packed batch of decodes and prefill chunks.

Per step, `AttentionMetadata.build` turns the step plan into gather indices and masks once; every
layer then reuses them.

* Decodes (one query token each) are batched: their blocks are gathered into a padded
  ``(seqs, kv_heads, len, head_dim)`` view and the query heads of each KV head are folded into the
  query-length axis, ``(seqs, kv_heads, group, head_dim)``, so grouped-query attention needs no
  copy of K/V per query head.
* Each prefill chunk runs on its own: causal attention over its fresh K/V when nothing of the
  sequence is cached yet, else over its gathered context with an offset causal mask.

Sliding windows (Mistral, some Qwen2 layers) add ``key > query - window`` to the masks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from worker.kv_cache import LayerCache
from worker.step import StepInput


@dataclass
class PrefillChunk:
    start: int  # first packed token of the chunk
    stop: int
    cached: int  # tokens of the sequence cached before this chunk
    blocks: torch.Tensor  # (blocks,) the sequence's block ids covering its context
    masks: dict = field(default_factory=dict)  # window -> (T, context) bool, when cached or windowed


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (tokens,)
    num_decodes: int
    decode_blocks: torch.Tensor | None  # (decodes * max_blocks,) flat block ids
    decode_len: int  # padded context length of the decode batch
    decode_masks: dict  # window -> (decodes, 1, 1, decode_len) bool
    prefills: list[PrefillChunk]
    block_size: int

    @classmethod
    def build(cls, step: StepInput, block_size: int, windows: set, device: torch.device) -> "AttentionMetadata":
        nd = step.num_decodes
        qlens = step.query_lens.tolist()
        clens = step.context_lens.tolist()
        decode_blocks, decode_len, decode_masks = None, 0, {}
        if nd:
            ctx = step.context_lens[:nd]
            max_blocks = -(-max(clens[:nd]) // block_size)
            decode_blocks = step.block_tables[:nd, :max_blocks].reshape(-1).to(device)
            decode_len = max_blocks * block_size
            keys = torch.arange(decode_len)
            for w in windows:
                m = keys[None, :] < ctx[:, None]
                if w is not None:
                    m &= keys[None, :] > (ctx[:, None] - 1 - w)
                decode_masks[w] = m[:, None, None, :].to(device)
        prefills, start = [], nd
        for s in range(nd, step.num_seqs):
            T, L = qlens[s], clens[s]
            chunk = PrefillChunk(start, start + T, L - T,
                                 step.block_tables[s, : -(-L // block_size)].to(device))
            for w in windows:
                if chunk.cached or (w is not None and w < T):
                    q = torch.arange(L - T, L)[:, None]
                    k = torch.arange(L)[None, :]
                    m = k <= q
                    if w is not None:
                        m &= k > q - w
                    chunk.masks[w] = m.to(device)
            prefills.append(chunk)
            start += T
        return cls(step.slot_mapping.to(device), nd, decode_blocks, decode_len, decode_masks,
                   prefills, block_size)


def _gather(cache: torch.Tensor, blocks: torch.Tensor, head_dim: int) -> torch.Tensor:
    """cache (heads, num_blocks, block*head_dim) rows of `blocks` → (heads, len(blocks)*block, head_dim)."""
    heads = cache.shape[0]
    return cache.index_select(1, blocks).view(heads, -1, head_dim)


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache,
    meta: AttentionMetadata, window: int | None, scale: float,
) -> torch.Tensor:
    """q (tokens, q_heads, d); k, v (tokens, kv_heads, d), already written to `cache`.
    Returns (tokens, q_heads * d)."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    out = torch.empty((n, hq, d), dtype=q.dtype, device=q.device)
    nd = meta.num_decodes
    if nd:
        ks = _gather(cache.k, meta.decode_blocks, d).view(hkv, nd, meta.decode_len, d).transpose(0, 1)
        vs = _gather(cache.v, meta.decode_blocks, d).view(hkv, nd, meta.decode_len, d).transpose(0, 1)
        qd = q[:nd].view(nd, hkv, hq // hkv, d)  # query heads of one KV head are adjacent
        o = F.scaled_dot_product_attention(qd, ks, vs, attn_mask=meta.decode_masks[window], scale=scale)
        out[:nd] = o.view(nd, hq, d)
    for c in meta.prefills:
        qp = q[c.start:c.stop].transpose(0, 1).unsqueeze(0)  # (1, hq, T, d)
        mask = c.masks.get(window)
        if c.cached:
            L = c.cached + c.stop - c.start
            kp = _gather(cache.k, c.blocks, d)[:, :L].unsqueeze(0)  # (1, hkv, L, d)
            vp = _gather(cache.v, c.blocks, d)[:, :L].unsqueeze(0)
        else:
            kp = k[c.start:c.stop].transpose(0, 1).unsqueeze(0)
            vp = v[c.start:c.stop].transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(
            qp, kp, vp, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=hq != hkv,
        )
        out[c.start:c.stop] = o[0].transpose(0, 1)
    return out.view(n, hq * d)
