"""The Triton paged decode-attention kernel (tpkernels/triton_attention.py) against an independent
float64 reference. On CUDA it runs compiled; without a GPU, on CPU tensors under Triton's
interpreter, so the cases stay small (a few sequences, a few dozen blocks).

Every case is built so that reading anything but the attended slots shows: the block tables are
shuffled, their padding columns name a poison block, and every slot a sequence does not attend
(before its window, past its end, in blocks nobody owns) holds K = 1e4 (a score that would swamp
the softmax) and V = NaN (which survives any weighting, even by zero). `out` starts as NaN, so a
row the kernel forgets to write shows too.

Tolerances. float32: 1e-5 absolute against float64 (scores and sums are float32; values are
O(1)). bfloat16 and float16: the reference is computed from the same rounded inputs, so what is
left is the kernel's two roundings to the storage format: the softmax weights before the P·V
product (the normaliser sums the unrounded weights), which moves the output by at most one step
of the format times max|v|, and the final output, at most one step times |out|. One step is
2^-7 relative for bfloat16 (8 significant bits), 2^-10 for float16 (11). A step, not half of one:
Triton 3.6's interpreter converts float32 to bfloat16 by truncation, not rounding to nearest."""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():  # the interpreter is chosen when a kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tpkernels.triton_attention import paged_decode_attention  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
POISON_K, POISON_V = 1e4, float("nan")
STEP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}  # one step of the format, relative


def _attended(length: int, window: int | None) -> range:
    return range(max(0, length - window) if window else 0, length)


def _make_case(dtype, d, hq, hkv, bs, lens, window, seed, pad_cols=2):
    """q as the head slice of a fused qkv row; K/V caches (hkv, num_blocks, bs*d) with each
    sequence's blocks scattered in no order; tables (n, W) whose padding columns name a poison
    block; every slot not attended under `window` poisoned (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    n, owned = len(lens), [math.ceil(length / bs) for length in lens]
    num_blocks = sum(owned) + 3  # one poison block, two nobody owns
    ids = torch.randperm(num_blocks, generator=g).tolist()
    poison = ids.pop()
    tables = torch.full((n, max(owned) + pad_cols), poison, dtype=torch.int64)
    live = torch.zeros(num_blocks, bs, dtype=torch.bool)  # slots some sequence attends
    for i, length in enumerate(lens):
        blocks = [ids.pop() for _ in range(owned[i])]
        tables[i, :owned[i]] = torch.tensor(blocks)
        for pos in _attended(length, window):
            live[blocks[pos // bs], pos % bs] = True
    live = live.repeat_interleave(d, dim=1)  # (num_blocks, bs*d), as a cache row
    k = torch.where(live, torch.randn(hkv, num_blocks, bs * d, generator=g), POISON_K).to(dtype)
    v = torch.where(live, torch.randn(hkv, num_blocks, bs * d, generator=g), POISON_V).to(dtype)
    qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=g).to(dtype)
    q = qkv[:, :hq * d].view(n, hq, d)  # rows (hq + 2*hkv)*d apart
    lens = torch.tensor(lens, dtype=torch.int64)
    return [t.to(DEVICE) for t in (q, k, v, tables, lens)]


def _reference(q, k, v, tables, lens, scale, window):
    """float64; per sequence and query head, keys and values fetched token by token."""
    q, k, v, tables, lens = (t.cpu() for t in (q, k, v, tables, lens))
    n, hq, d = q.shape
    hkv, bs = k.shape[0], k.shape[2] // d
    out = torch.empty(n, hq, d, dtype=torch.float64)
    for i in range(n):
        slots = [(int(tables[i, pos // bs]), (pos % bs) * d) for pos in _attended(int(lens[i]), window)]
        for h in range(hq):
            kvh = h // (hq // hkv)
            keys = torch.stack([k[kvh, b, o:o + d] for b, o in slots]).double()
            vals = torch.stack([v[kvh, b, o:o + d] for b, o in slots]).double()
            p = torch.softmax(keys @ q[i, h].double() * scale, dim=0)
            out[i, h] = p @ vals
    return out


def _tolerance(dtype, ref, v):
    """Per element; see the module docstring."""
    if dtype == torch.float32:
        return torch.full_like(ref, 1e-5)
    vmax = v[v.isfinite()].double().abs().max().item()
    return STEP[dtype] * (ref.abs() + vmax) + 1e-5


def _check(out, ref, tol):
    got = out.cpu().double()
    assert not got.isnan().any(), f"{int(got.isnan().sum())} outputs are NaN (unwritten, or poison read)"
    excess = (got - ref).abs() - tol
    worst = int(excess.argmax())  # flat index of the element furthest past its tolerance
    assert (excess <= 0).all(), (f"error {excess.flatten()[worst] + tol.flatten()[worst]:.3g} at flat index "
                                 f"{worst}, tolerance {tol.flatten()[worst]:.3g}")


CASES = [  # dtype, head_dim, q_heads, kv_heads, block_size, window, partition_size
    (torch.float32, 64, 9, 3, 16, None, None),  # SmolLM2's shape; one partition
    (torch.float32, 64, 9, 3, 16, None, 32),  # the same split: later partitions past short contexts
    (torch.float32, 8, 4, 4, 4, None, None),  # MHA, the smallest head
    (torch.float32, 40, 8, 2, 5, 7, None),  # GQA 4, a head size padded to 64, an odd block size
    (torch.float32, 128, 4, 1, 16, 33, 48),  # MQA; a partition size no power of two
    (torch.float32, 64, 6, 2, 4, 1, 16),  # window 1: all partitions but the last skipped
    (torch.float32, 40, 3, 3, 5, 1000, 24),  # a window longer than every context
    (torch.float32, 128, 8, 2, 4, 20, 20),  # window == partition: it spans one or two
    (torch.bfloat16, 64, 9, 3, 16, None, None),
    (torch.bfloat16, 128, 8, 2, 16, 20, 32),
    (torch.bfloat16, 40, 12, 3, 4, 9, 24),
    (torch.float16, 128, 8, 2, 5, 20, None),
    (torch.float16, 8, 4, 1, 4, None, 16),
    (torch.float16, 64, 9, 3, 16, 1, None),
]


def _case_id(case):
    dtype, d, hq, hkv, bs, window, part = case
    return f"{str(dtype)[6:]}-d{d}-{hq}q{hkv}kv-bs{bs}-w{window}-p{part}"


@pytest.mark.parametrize("dtype,d,hq,hkv,bs,window,partition", CASES, ids=[_case_id(c) for c in CASES])
def test_matches_float64_reference(dtype, d, hq, hkv, bs, window, partition):
    # lengths: one token, around a block boundary, and two long ones with ragged last tiles
    lens = [1, bs - 1, bs, bs + 1, 67, 150]
    q, k, v, tables, ctx = _make_case(dtype, d, hq, hkv, bs, lens, window, seed=d * 100 + hq * 10 + bs)
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)
    scale = d ** -0.5
    paged_decode_attention(q, k, v, tables, ctx, scale, window, out, partition_size=partition)
    ref = _reference(q, k, v, tables, ctx, scale, window)
    _check(out, ref, _tolerance(dtype, ref, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("partition", [None, 4])
def test_single_token_is_its_value_exactly(dtype, partition):
    # One attended token (a context of one, or window 1): its softmax weight is exactly 1.
    q, k, v, tables, ctx = _make_case(dtype, 64, 6, 2, 4, [1, 9], 1, seed=5)
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)
    paged_decode_attention(q, k, v, tables, ctx, 0.125, 1, out, partition_size=partition)
    for i, last in enumerate((0, 8)):
        row = v.view(2, -1, 4, 64)[:, tables[i, last // 4], last % 4]  # (hkv, d)
        assert torch.equal(out[i], row.repeat_interleave(3, dim=0))


def test_strided_out_and_int32_indices():
    # out a view into a wider buffer (rows d + 8 apart): the columns between stay untouched
    d, hq, hkv, bs = 40, 4, 2, 4
    q, k, v, tables, ctx = _make_case(torch.float32, d, hq, hkv, bs, [3, 30, 17], 6, seed=11)
    wide = torch.full((3, hq, d + 8), float("nan"), device=DEVICE)
    out = wide[:, :, :d]
    paged_decode_attention(q, k, v, tables.int(), ctx.int(), d ** -0.5, 6, out, partition_size=8)
    ref = _reference(q, k, v, tables, ctx, d ** -0.5, 6)
    _check(out, ref, _tolerance(torch.float32, ref, v))
    assert wide[:, :, d:].isnan().all()


def test_rejects_bad_inputs():
    q, k, v, tables, ctx = _make_case(torch.float32, 8, 4, 2, 4, [5], None, seed=0)
    out = torch.empty_like(q)
    q_cols = q.transpose(1, 2).contiguous().transpose(1, 2)  # head_dim strided
    with pytest.raises(ValueError, match="head_dim"):
        paged_decode_attention(q_cols, k, v, tables, ctx, 1.0, None, out)
    with pytest.raises(ValueError, match="share a dtype"):
        paged_decode_attention(q, k, v, tables, ctx, 1.0, None, out.double())
    with pytest.raises(ValueError, match="share a dtype"):
        paged_decode_attention(q, k.double(), v.double(), tables, ctx, 1.0, None, out)
    with pytest.raises(ValueError, match="multiple of hkv"):
        paged_decode_attention(q[:, :3], k, v, tables, ctx, 1.0, None, out[:, :3])
    with pytest.raises(ValueError, match="int32 or int64"):
        paged_decode_attention(q, k, v, tables.float(), ctx, 1.0, None, out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("partition", [None, 16])
def test_cuda_graph_replays_with_new_lengths(partition):
    """Captured once, replayed after the lengths and the query change in place: the launch reads
    no tensor value on the host (capture would fail), and the replay follows the new values."""
    dtype, d, hq, hkv, bs = torch.bfloat16, 64, 9, 3, 16
    long_lens, short_lens = [40, 100, 17], [5, 33, 16]  # the short ones attend a subset of the slots
    q, k, v, tables, ctx = _make_case(dtype, d, hq, hkv, bs, long_lens, None, seed=3)
    q = q.clone()
    ctx.copy_(torch.tensor(short_lens))
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)
    paged_decode_attention(q, k, v, tables, ctx, d ** -0.5, None, out, partition_size=partition)  # compiles
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode_attention(q, k, v, tables, ctx, d ** -0.5, None, out, partition_size=partition)
    for lens in (short_lens, long_lens):
        ctx.copy_(torch.tensor(lens))
        q.copy_(torch.randn(q.shape, generator=torch.Generator().manual_seed(sum(lens))).to(dtype))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = _reference(q, k, v, tables, ctx, d ** -0.5, None)
        _check(out, ref, _tolerance(dtype, ref, v))
