"""The Triton element-wise kernels (tpkernels/triton_ops.py) against the torch formulas they replace:
add + RMS norm, rope with the KV-cache write, silu·up. On CPU they run under Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 there), on CUDA compiled.

In bfloat16 the kernels round after each step the way torch's operators do, so compiled on a GPU
rope and the cache write equal the torch formulas bit for bit. Two things loosen that: the norm's
sum runs in another order (one step of the format apart at most), and Triton 3.6's interpreter
converts float32 to bfloat16 by truncating instead of rounding to nearest, so on CPU each
rounding step may land one step of the format off, and bfloat16 results are compared within a
few steps (2^-6 relative, or of the operands' scale where a difference cancels). Compiled float32 code may contract a·b − c·d into a
fused multiply-add, so there float32 is compared within 1e-6; in the interpreter it is exact."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from tpkernels import triton_ops
from tpkernels import TorchOps, apply_rope
from worker.kv_cache import KVCache

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = DEVICE.type == "cpu"


def _within_one_step(got, ref):
    """|got - ref| at most one step of the format (bfloat16: 8 significant bits, float16: 11)."""
    bits = {torch.bfloat16: 8, torch.float16: 11}[got.dtype]
    return bool(((got.float() - ref.float()).abs() <= ref.float().abs() * 2.0 ** (1 - bits) + 1e-6).all())


def _same(got, ref, scale=1.0):
    """Equal, but for the two loosenings in the module docstring."""
    if got.dtype == torch.float32:
        return torch.equal(got, ref) if INTERPRETED else torch.allclose(got, ref, atol=1e-6, rtol=0)
    if got.dtype == torch.bfloat16 and INTERPRETED:
        return torch.allclose(got.float(), ref.float(), atol=2 ** -6 * scale, rtol=2 ** -6)
    return torch.equal(got, ref)


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=DEVICE)


def _hf_rms_norm(x, weight, eps):
    """transformers' LlamaRMSNorm, step for step."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@pytest.mark.parametrize("dtype,rows,hidden", [(torch.float32, 3, 576), (torch.float32, 1, 100),
                                               (torch.bfloat16, 5, 576), (torch.float16, 2, 72)])
def test_add_rms_norm(dtype, rows, hidden):
    wide = _randn(rows, hidden + 16, dtype=dtype, seed=1)
    x = wide[:, 8:8 + hidden]  # rows apart in memory
    delta = _randn(rows, hidden, dtype=dtype, seed=2)
    w = _randn(hidden, dtype=dtype, seed=3)
    residual, out = triton_ops.add_rms_norm(x, delta, w, 1e-5)
    assert _same(residual, x + delta)
    if dtype == torch.float32:
        s = x.double() + delta.double()
        exact = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
        assert (out.double() - exact).abs().max().item() < 1e-5
    elif INTERPRETED and dtype == torch.bfloat16:
        assert _same(out, _hf_rms_norm(residual, w, 1e-5))
    else:
        assert _within_one_step(out, _hf_rms_norm(residual, w, 1e-5))


def _qkv_case(n, hq, hkv, d, dtype, seed):
    qkv = _randn(n, (hq + 2 * hkv) * d, dtype=dtype, seed=seed)
    q = qkv[:, :hq * d].view(n, hq, d)
    k = qkv[:, hq * d:(hq + hkv) * d].view(n, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(n, hkv, d)
    return qkv, q, k, v


@pytest.mark.parametrize("dtype,hq,hkv,d,rope", [(torch.float32, 9, 3, 64, True), (torch.bfloat16, 9, 3, 64, True),
                                                 (torch.float32, 4, 1, 40, True), (torch.float16, 6, 6, 8, True),
                                                 (torch.float32, 6, 6, 8, False), (torch.bfloat16, 3, 3, 12, False)])
def test_rope_and_cache_matches_the_torch_path(dtype, hq, hkv, d, rope):
    n, bs, blocks = 7, 4, 12
    slots = list(range(blocks * bs))
    random.Random(d).shuffle(slots)
    slots = torch.tensor(slots[:n], device=DEVICE)
    angles = _randn(n, 1, d // 2, seed=5, scale=3.0)
    tables = (angles.cos().to(dtype), angles.sin().to(dtype)) if rope else None

    ours_cache = KVCache(1, hkv, d, blocks, bs, dtype, DEVICE).layers[0]
    ref_cache = KVCache(1, hkv, d, blocks, bs, dtype, DEVICE).layers[0]
    qkv, q, k, v = _qkv_case(n, hq, hkv, d, dtype, seed=d + hq)
    rq, rk = TorchOps.rope_and_cache(q.clone(), k.clone(), v.clone(), tables, slots, ref_cache)
    before_v = v.clone()
    triton_ops.rope_and_cache_(q, k, v, *(tables or (None, None)), slots, ours_cache.k, ours_cache.v)
    assert _same(q, rq, scale=4.0) and _same(k, rk, scale=4.0)  # rotated in place, inside the qkv tensor
    assert torch.equal(v, before_v)
    assert _same(ours_cache.k, ref_cache.k, scale=4.0) and torch.equal(ours_cache.v, ref_cache.v)


def test_rope_matches_transformers_rotation():
    # transformers: q·cos + rotate_half(q)·sin with rotate_half(x) = [-x₂, x₁]
    n, h, d = 3, 2, 16
    x = _randn(n, h, d, seed=9)
    ang = _randn(n, 1, d // 2, seed=10)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    half = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
    torch.testing.assert_close(apply_rope(x, ang.cos(), ang.sin()), x * cos + half * sin)


@pytest.mark.parametrize("dtype,rows,width", [(torch.float32, 3, 1536), (torch.bfloat16, 2, 1536),
                                              (torch.float32, 1, 50), (torch.float16, 4, 2100)])
def test_silu_mul(dtype, rows, width):
    gu = _randn(rows, 2 * width, dtype=dtype, seed=width, scale=4.0)
    got = triton_ops.silu_mul(gu)
    gate, up = gu.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    elif INTERPRETED and dtype == torch.bfloat16:
        assert _same(got, ref)
    else:  # torch computes the sigmoid its own way: one step of the format apart at most
        assert _within_one_step(got, ref)
