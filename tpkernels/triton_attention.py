"""Decode attention straight from the paged KV cache, as a Triton kernel (the CUDA serving path).

What it computes: for each sequence i (one query token each) and query head h,
``out[i, h] = softmax(scale · q[i, h] · Kᵀ) · V`` over the sequence's first ``context_lens[i]``
cached tokens, or only the last ``window`` of them when a window is given. Query head h reads KV
head ``h // (hq // hkv)`` (GQA; MQA when hkv == 1). It is the same operation as the C++ CPU
kernel (`tpkernels.native.paged_decode_attention`, csrc/paged_attention.cpp), with the same
signature.

Cache layout (worker/kv_cache.py): ``(hkv, num_blocks, block_size * d)``, contiguous; token slot
t of block b for KV head h is ``cache[h, b, t*d:(t+1)*d]``. Block ``block_tables[i, j]`` holds
positions ``j*block_size ..`` of sequence i; table columns past the sequence's end are never read.

Grid: one program per (sequence, KV head, partition). A program scores the G = hq / hkv query
heads of its KV head together, so every K and V row is loaded once for the whole group (the
kernel is memory-bound). It walks its token range in tiles of BLOCK_N tokens, fetching each
token's row through the block table (any block size works, not only powers of two), and keeps an
online softmax in float32: running max m, running sum l, unnormalised accumulator acc. Scores
and the weighted sum of V are `tl.dot`s, with the group padded to 16 rows (tl.dot's minimum) and
head_dim to a power of two >= 16, the padding masked off.

Why partitions (flash-decoding): at batch 1 with a few KV heads a (sequence, KV head) grid is a
handful of programs on a GPU with ~130 SMs. The context is therefore cut into partitions of
`partition_size` tokens, each program writes its partial (m, l, acc) to float32 scratch, and a
second small kernel merges the partials of each (sequence, query head). With one partition the
first kernel normalises and writes `out` itself and the second is not launched.

No host synchronisation, ever: the function is called inside CUDA graph capture, so the grid,
the number of partitions (``ceil(W * block_size / partition_size)``, W the table's width) and
the scratch sizes come from tensor shapes only. Context lengths are read by the kernels on the
device: a program whose partition holds none of its sequence's attended tokens loads nothing and
stores a neutral partial (max -inf, sum 0), and the merge kernel reads only the partitions that
hold attended tokens.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

DEFAULT_PARTITION = 256  # tokens per partition; a multiple of every tile size below
_LOG2E = 1.0 / math.log(2.0)  # softmax runs in base 2: exp(x) = exp2(x · log2 e)


@triton.jit
def _dot(a, b, INTERPRET: tl.constexpr):
    """a @ b accumulated in float32; float32 operands without TF32 rounding."""
    if INTERPRET:  # Triton 3.6's interpreter misreads bfloat16 in tl.dot; float32 is exact for it
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _attended_range(lens_ptr, i, window):
    """[start, end) of the positions sequence i attends: its last `window` tokens (0: all)."""
    end = tl.load(lens_ptr + i).to(tl.int32)
    start = tl.where(window > 0, tl.maximum(end - window, 0), 0)
    return start, end


@triton.jit
def _attend_tile(t0, hi, q, k_head, v_head, table, m, l, acc, qk_scale, dd,
                 D: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr):
    """Folds positions [t0, min(t0 + BLOCK_N, hi)), t0 < hi, into the group's online softmax:
    m (BLOCK_G,) running max of the base-2 scores, l (BLOCK_G,) running sum of exp2(score - m),
    acc (BLOCK_G, BLOCK_D) running sum of exp2(score - m) · v."""
    pos = t0 + tl.arange(0, BLOCK_N)
    valid = pos < hi
    block = tl.load(table + pos // BS, mask=valid, other=0).to(tl.int64)
    rows = (block * (BS * D) + (pos % BS) * D)[:, None] + dd[None, :]  # (BLOCK_N, BLOCK_D)
    kv_mask = valid[:, None] & (dd < D)[None, :]
    k = tl.load(k_head + rows, mask=kv_mask, other=0.0)
    v = tl.load(v_head + rows, mask=kv_mask, other=0.0)
    s = _dot(q, tl.trans(k), INTERPRET) * qk_scale  # (BLOCK_G, BLOCK_N)
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: position t0 is valid
    alpha = tl.exp2(m - m_new)
    w = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(w, axis=1)
    acc = acc * alpha[:, None] + _dot(w.to(v.dtype), v, INTERPRET)
    return m_new, l, acc


@triton.jit(do_not_specialize=["window"])
def _partition_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, m_ptr, l_ptr, acc_ptr,
                      qk_scale, window, s_qn, s_qh, s_on, s_oh, s_kh, s_tn,
                      G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, PARTITION: tl.constexpr,
                      BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                      SPLIT: tl.constexpr, INTERPRET: tl.constexpr):
    i = tl.program_id(0)  # sequence
    h = tl.program_id(1)  # KV head
    p = tl.program_id(2)  # partition: positions [p*PARTITION, (p+1)*PARTITION)
    start, end = _attended_range(lens_ptr, i, window)
    lo = tl.maximum(start, p * PARTITION)  # this program's tokens: [lo, hi), maybe empty
    hi = tl.minimum(end, (p + 1) * PARTITION)

    g = tl.arange(0, BLOCK_G)  # query head h*G + g of the group; rows g >= G are padding
    dd = tl.arange(0, BLOCK_D)  # head_dim lanes; dd >= D are padding
    row_mask = (g < G)[:, None] & (dd < D)[None, :]
    q_head = h * G + g
    q_ptrs = q_ptr + i.to(tl.int64) * s_qn + q_head[:, None] * s_qh + dd[None, :]
    q = tl.load(q_ptrs, mask=row_mask, other=0.0)  # (BLOCK_G, BLOCK_D), storage dtype
    k_head = k_ptr + h.to(tl.int64) * s_kh  # this KV head's (num_blocks, BS * D) plane
    v_head = v_ptr + h.to(tl.int64) * s_kh
    table = tables_ptr + i.to(tl.int64) * s_tn

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    if INTERPRET:  # the same tiles, as a while loop: see _INTERPRET
        t0 = lo
        while t0 < hi:
            m, l, acc = _attend_tile(t0, hi, q, k_head, v_head, table, m, l, acc, qk_scale, dd,
                                     D, BS, BLOCK_N, INTERPRET)
            t0 += BLOCK_N
    else:
        for t0 in range(lo, hi, BLOCK_N):
            m, l, acc = _attend_tile(t0, hi, q, k_head, v_head, table, m, l, acc, qk_scale, dd,
                                     D, BS, BLOCK_N, INTERPRET)

    if SPLIT:  # partials at [i, q_head, p] of (n, hq, P) and (n, hq, P, D) float32 scratch
        slot = (i.to(tl.int64) * (G * tl.num_programs(1)) + q_head) * tl.num_programs(2) + p
        tl.store(m_ptr + slot, m, mask=g < G)
        tl.store(l_ptr + slot, l, mask=g < G)
        tl.store(acc_ptr + slot[:, None] * D + dd[None, :], acc, mask=row_mask)
    else:  # the only partition: l > 0 as every sequence attends at least one token
        o = acc / l[:, None]
        o_ptrs = out_ptr + i.to(tl.int64) * s_on + q_head[:, None] * s_oh + dd[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _merge_partial(p, base, m, l, acc, m_ptr, l_ptr, acc_ptr, dd, D: tl.constexpr):
    """Folds partition p's partial (m_p, l_p, acc_p) into the running (m, l, acc)."""
    m_p = tl.load(m_ptr + base + p)
    l_p = tl.load(l_ptr + base + p)
    acc_p = tl.load(acc_ptr + (base + p) * D + dd, mask=dd < D, other=0.0)
    m_new = tl.maximum(m, m_p)
    alpha = tl.exp2(m - m_new)  # rescales what was merged so far
    beta = tl.exp2(m_p - m_new)  # rescales partition p
    return m_new, l * alpha + l_p * beta, acc * alpha + acc_p * beta


@triton.jit(do_not_specialize=["window"])
def _combine_kernel(m_ptr, l_ptr, acc_ptr, lens_ptr, out_ptr, window, num_partitions, s_on, s_oh,
                    D: tl.constexpr, PARTITION: tl.constexpr, BLOCK_D: tl.constexpr,
                    INTERPRET: tl.constexpr):
    i = tl.program_id(0)  # sequence
    qh = tl.program_id(1)  # query head
    start, end = _attended_range(lens_ptr, i, window)
    first, last = start // PARTITION, (end - 1) // PARTITION  # the partitions with attended tokens
    dd = tl.arange(0, BLOCK_D)
    base = (i.to(tl.int64) * tl.num_programs(1) + qh) * num_partitions

    m = tl.full([], float("-inf"), tl.float32)
    l = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    if INTERPRET:  # the same partitions, as a while loop: see _INTERPRET
        p = first
        while p <= last:
            m, l, acc = _merge_partial(p, base, m, l, acc, m_ptr, l_ptr, acc_ptr, dd, D)
            p += 1
    else:
        for p in range(first, last + 1):
            m, l, acc = _merge_partial(p, base, m, l, acc, m_ptr, l_ptr, acc_ptr, dd, D)
    o_ptrs = out_ptr + i.to(tl.int64) * s_on + qh * s_oh + dd
    tl.store(o_ptrs, (acc / l).to(out_ptr.dtype.element_ty), mask=dd < D)


# Under TRITON_INTERPRET=1 (decided when triton.jit runs) the kernels take two detours, same
# arithmetic: Triton 3.6's interpreter
# * feeds tl.dot's bfloat16 operands to NumPy as their raw uint16 bits, so they go in as float32;
# * turns a tensor range() bound into a Python int with int() on a 1-element array, which NumPy
#   >= 2.4 refuses (triton-lang/triton#9171), so the loops over tiles and partitions are `while`
#   loops there. Compiled, they are `for` loops, which Triton can software-pipeline.
_INTERPRET = isinstance(_partition_kernel, InterpretedFunction)


def _check(q, k_cache, v_cache, block_tables, context_lens, out) -> None:
    """Shapes, strides and dtypes only: nothing here reads a tensor's values."""
    if q.dim() != 3 or k_cache.dim() != 3 or out.shape != q.shape:
        raise ValueError("q and out must be (n, hq, d) and the caches (hkv, num_blocks, block_size * d)")
    if q.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("q and out need a contiguous last (head_dim) dimension")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and v_cache.shape == k_cache.shape):
        raise ValueError("k_cache and v_cache must be contiguous and of one shape")
    if not q.dtype == k_cache.dtype == v_cache.dtype == out.dtype:
        raise ValueError("q, k_cache, v_cache and out must share a dtype")
    tensors = (q, k_cache, v_cache, block_tables, context_lens, out)
    if len({t.device for t in tensors}) != 1:
        raise ValueError("all tensors must be on one device")
    n, hq, d = q.shape
    if hq % k_cache.shape[0] or k_cache.shape[2] % d:
        raise ValueError("hq must be a multiple of hkv, and a cache row whole head_dim vectors")
    index_types = (torch.int32, torch.int64)
    if block_tables.dtype not in index_types or context_lens.dtype not in index_types:
        raise ValueError("block_tables and context_lens must be int32 or int64")
    if block_tables.dim() != 2 or block_tables.shape[0] != n or block_tables.stride(1) != 1:
        raise ValueError("block_tables must be (n, W) with contiguous rows")
    if context_lens.shape != (n,) or not context_lens.is_contiguous():
        raise ValueError("context_lens must be a contiguous (n,) tensor")


def _tile_tokens(block_d: int, elem_size: int, partition: int) -> int:
    """Tokens per tile: a K tile of about 16 KB (16 to 64 rows), no wider than the partition.
    (ptxas for sm_90, 4 warps: 70-160 registers and no spills for d = 64 and 128 in each dtype;
    64 rows of float32 at d = 128 would spill.)"""
    tile = max(16, min(64, 16384 // (block_d * elem_size)))
    return max(16, min(tile, triton.next_power_of_2(partition)))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           window: int | None, out: torch.Tensor, *,
                           partition_size: int | None = None) -> None:
    """out[i] = attention of q[i] (hq, d) over the first context_lens[i] cached tokens of the
    sequence whose blocks block_tables[i] lists (only the last `window` of them, when given).

    q and out: (n, hq, d) of one dtype (float32, bfloat16, float16), any strides with a
    contiguous last dimension. k_cache, v_cache: contiguous (hkv, num_blocks, block_size * d).
    block_tables: (n, W) int64 or int32 with contiguous rows; context_lens: (n,) int64 or int32,
    each >= 1. window: None or 0 for all tokens. partition_size: tokens per partition (default
    DEFAULT_PARTITION). Launches from shapes only: safe inside CUDA graph capture."""
    _check(q, k_cache, v_cache, block_tables, context_lens, out)
    n, hq, d = q.shape
    hkv = k_cache.shape[0]
    group, block_size = hq // hkv, k_cache.shape[2] // d
    if n == 0:
        return
    partition = partition_size or DEFAULT_PARTITION
    if partition < 1 or (window or 0) < 0:
        raise ValueError(f"partition_size and window must be positive, got {partition_size}, {window}")
    num_partitions = max(1, triton.cdiv(block_tables.shape[1] * block_size, partition))
    block_d = max(16, triton.next_power_of_2(d))
    split = num_partitions > 1
    if split:
        m = torch.empty((n, hq, num_partitions), dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
        acc = torch.empty((n, hq, num_partitions, d), dtype=torch.float32, device=q.device)
    else:
        m = l = acc = out  # not touched: the kernel writes out directly
    window = window or 0
    _partition_kernel[(n, hkv, num_partitions)](
        q, k_cache, v_cache, block_tables, context_lens, out, m, l, acc,
        scale * _LOG2E, window, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), block_tables.stride(0),
        G=group, D=d, BS=block_size, PARTITION=partition,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d,
        BLOCK_N=_tile_tokens(block_d, q.element_size(), partition), SPLIT=split,
        INTERPRET=_INTERPRET, num_warps=4)
    if split:
        _combine_kernel[(n, hq)](m, l, acc, context_lens, out, window, num_partitions,
                                 out.stride(0), out.stride(1), D=d, PARTITION=partition,
                                 BLOCK_D=block_d, INTERPRET=_INTERPRET, num_warps=1)
