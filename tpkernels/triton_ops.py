"""Triton kernels for the element-wise work of a transformer block on CUDA.

Eager PyTorch spends a dozen small kernels per block on work that reads each activation once:
residual add and RMS norm, rotary embedding of q and k, the KV-cache write, silu·up. At decode
sizes each of those launches costs more than its arithmetic, so here they are three kernels:

* `add_rms_norm`: r = x + delta and rms_norm(r) · weight, one program per row;
* `rope_and_cache_`: rotates q and k in place (they are views into the fused qkv projection's
  output) and writes k and v into the paged cache at their slots, one program per token (all of
  its heads: per (token, head), Triton's interpreter spent 60 % of a CPU parity test here);
* `silu_mul`: silu(gate) · up from the fused [gate | up] projection.

Rounding follows transformers' eager modules step for step (each torch operator rounds its result
to the activation dtype), so bfloat16 outputs stay as close to transformers' as its own
operators are; in float32 the rounding steps are no-ops.

Every wrapper launches from tensor shapes alone, never reading a tensor's values on the host, so
all of them can be captured in a CUDA graph. They run under the Triton interpreter on CPU tensors
too (``TRITON_INTERPRET=1``), which is how CI tests them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


@triton.jit
def _add_rms_norm_kernel(x_ptr, d_ptr, w_ptr, r_ptr, o_ptr, hidden, eps,
                         sx, sd, sr, so, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    m = cols < hidden
    x = tl.load(x_ptr + row * sx + cols, mask=m, other=0.0)
    d = tl.load(d_ptr + row * sd + cols, mask=m, other=0.0)
    dt = x.dtype
    r = (x.to(tl.float32) + d.to(tl.float32)).to(dt)  # the residual stream, rounded like x + delta
    tl.store(r_ptr + row * sr + cols, r, mask=m)
    rf = r.to(tl.float32)
    inv = tl.rsqrt(tl.sum(rf * rf, axis=0) / hidden + eps)
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    normed = (rf * inv).to(dt)  # transformers rounds before the weight multiply
    tl.store(o_ptr + row * so + cols, (normed.to(tl.float32) * w).to(dt), mask=m)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta) · weight) for (rows, hidden) inputs with contiguous rows."""
    rows, hidden = x.shape
    residual, out = torch.empty_like(x), torch.empty_like(x)
    block = triton.next_power_of_2(hidden)
    _add_rms_norm_kernel[(rows,)](x, delta, weight, residual, out, hidden, eps, x.stride(0), delta.stride(0),
                                  residual.stride(0), out.stride(0), BLOCK=block, num_warps=_warps(block))
    return residual, out


@triton.jit
def _rotate(ptr, cos, sin, half_cols, m, HALF: tl.constexpr):
    """Loads one head vector's two halves and returns them rotated: [x₁c − x₂s, x₂c + x₁s]."""
    x1 = tl.load(ptr + half_cols, mask=m, other=0.0)
    x2 = tl.load(ptr + HALF + half_cols, mask=m, other=0.0)
    dt = x1.dtype
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    # one rounding per torch operator: x1*cos, x2*sin, their difference (and the same for y2)
    y1 = ((a * cos).to(dt).to(tl.float32) - (b * sin).to(dt).to(tl.float32)).to(dt)
    y2 = ((b * cos).to(dt).to(tl.float32) + (a * sin).to(dt).to(tl.float32)).to(dt)
    return y1, y2


@triton.jit
def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slot_ptr, kc_ptr, vc_ptr,
                       sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, s_rope, cache_head, num_q_heads, num_kv_heads,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HALF: tl.constexpr,
                       BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, ROPE: tl.constexpr):
    """One token per program, all of its heads at once: a (heads, half) tile each for q and k."""
    t = tl.program_id(0)
    HALF: tl.constexpr = D // 2
    half = tl.arange(0, BLOCK_HALF)[None, :]
    full = tl.arange(0, BLOCK_D)[None, :]
    kv = tl.arange(0, BLOCK_HKV)[:, None]
    mkv = kv < num_kv_heads
    k = k_ptr + t * sk_t + kv * sk_h
    v = v_ptr + t * sv_t + kv * sv_h
    slot = tl.load(slot_ptr + t)
    # cache (kv_heads, blocks, block_size·d): slot s of head j at j·cache_head + s·d (int64: a
    # large cache passes 2^31 elements)
    dst = kv.to(tl.int64) * cache_head + slot.to(tl.int64) * D
    if ROPE:
        mh = half < HALF
        cos = tl.load(cos_ptr + t * s_rope + half, mask=mh, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + t * s_rope + half, mask=mh, other=0.0).to(tl.float32)
        qh = tl.arange(0, BLOCK_HQ)[:, None]
        mq = (qh < num_q_heads) & mh
        q = q_ptr + t * sq_t + qh * sq_h
        y1, y2 = _rotate(q, cos, sin, half, mq, HALF)
        tl.store(q + half, y1, mask=mq)
        tl.store(q + HALF + half, y2, mask=mq)
        mk = mkv & mh
        y1, y2 = _rotate(k, cos, sin, half, mk, HALF)
        tl.store(k + half, y1, mask=mk)
        tl.store(k + HALF + half, y2, mask=mk)
        tl.store(kc_ptr + dst + half, y1, mask=mk)
        tl.store(kc_ptr + dst + HALF + half, y2, mask=mk)
    mf = mkv & (full < D)
    if not ROPE:
        tl.store(kc_ptr + dst + full, tl.load(k + full, mask=mf, other=0.0), mask=mf)
    tl.store(vc_ptr + dst + full, tl.load(v + full, mask=mf, other=0.0), mask=mf)


def rope_and_cache_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor | None,
                    sin: torch.Tensor | None, slots: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor) -> None:
    """Rotates q (tokens, q_heads, d) and k (tokens, kv_heads, d) in place when cos/sin are given
    ((tokens, ·, d/2) tables, token rows contiguous), then stores k and v at cache slots `slots`
    (tokens,). q, k, v need contiguous head vectors; they may be views of one wider tensor."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    if n == 0:
        return
    rope = cos is not None
    if rope:
        cos, sin = cos.reshape(n, d // 2), sin.reshape(n, d // 2)
    block_hq, block_d = triton.next_power_of_2(hq), triton.next_power_of_2(d)
    _rope_cache_kernel[(n,)](
        q, k, v, cos if rope else q, sin if rope else q, slots, k_cache, v_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0) if rope else 0, k_cache.stride(0), hq, hkv,
        D=d, BLOCK_D=block_d, BLOCK_HALF=triton.next_power_of_2(max(d // 2, 1)),
        BLOCK_HQ=block_hq, BLOCK_HKV=triton.next_power_of_2(hkv), ROPE=rope,
        num_warps=_warps(block_hq * block_d // 2),
    )


@triton.jit
def _silu_mul_kernel(gu_ptr, o_ptr, width, s_gu, s_o, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < width
    g = tl.load(gu_ptr + row * s_gu + cols, mask=m, other=0.0)
    u = tl.load(gu_ptr + row * s_gu + width + cols, mask=m, other=0.0)
    dt = g.dtype
    gf = g.to(tl.float32)
    act = (gf * tl.sigmoid(gf)).to(dt)  # silu(gate), rounded as torch's silu rounds it
    tl.store(o_ptr + row * s_o + cols, (act.to(tl.float32) * u.to(tl.float32)).to(dt), mask=m)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up for gate_up = [gate | up] (rows, 2f) with contiguous rows."""
    rows, width = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty((rows, width))
    block = min(1024, triton.next_power_of_2(width))
    _silu_mul_kernel[(rows, triton.cdiv(width, block))](gate_up, out, width, gate_up.stride(0), out.stride(0),
                                                        BLOCK=block, num_warps=4)
    return out
