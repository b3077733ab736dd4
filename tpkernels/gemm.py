"""Matrix products on CPU through oneDNN, on weights packed once into its blocked layout.

oneDNN (what torch's mkldnn operators call) picks its kernel for the CPU it runs on at run time:
AVX2, AVX-512, AVX512-BF16 (`vdpbf16ps`, twice the float32 rate), AMX where present. Given a
weight in oneDNN's own blocked layout (`pack`, once, at load), every call streams it as it lies.
Given a plain weight, as `F.linear` would pass it, it re-lays the weight out on every call, and
MKL's BLAS (what `F.linear` runs for float32) does the same. On an AMD Zen 5 core, for the
default model's shapes (GFLOP/s, float32, one thread):

    rows     plain oneDNN   packed oneDNN   F.linear (MKL)
    16       139-158        187-238         89-93
    48       203-217        238-255         104-108
    512      253-265        262-274         115-120

and in bfloat16 the packed product reached 459 GFLOP/s at 16 rows and 540 at 512, while our own
bfloat16 GEMV (`tpkernels.native.small_linear`) ran a single row at half the packed speed and 8
rows at a sixth of it. So one packed copy serves every size of input; the weight is not kept
twice. ``TPSERVE_GEMM=blas`` keeps plain weights instead (BLAS, and our GEMV for up to
`TINY_MAX_ROWS` rows), as does a torch built without oneDNN. Where oneDNN has no bfloat16 (it needs
AVX512-BW/VL/DQ or AVX-NE-CONVERT; an AVX2-only Zen 3 has neither), a bfloat16 weight is packed by
us (`packed_layout`) and every product runs our kernel's AVX2 path, which widens the weight to
float32 as it streams it: half the bytes of a float32 weight at the float32 kernel's speed (on two
Zen 3 cores, a layer set of the bench Llama's products at 31 rows: 46 ms, float32 60, widening per
call with `widened` 92; at 512 rows 110, 98 and 116). Without our kernels, `widened`.

For decode-sized inputs (1 to `PACKED_GEMM_MAX_ROWS` rows) our own kernel (`native.packed_gemm`)
reads the packed bytes where they lie: below a few rows a oneDNN call is mostly its fixed cost
(~10 us, against 14-75 us of streaming for the default model's per-layer weights in bfloat16),
and up to ~100 rows our kernel streams each weight once and runs on it from cache faster than
oneDNN does (its header has the figures: on two Zen 5 cores, with the default model's products
streamed from memory, oneDNN took 1.1-1.5x our time in bfloat16 from 1 to 128 rows, 1.0-1.3x
in float32; at 512 rows 1.02x and 0.94x, so prefill-sized inputs stay on oneDNN). It knows one
layout per dtype (`packed_layout`); oneDNN's is its own business, so each weight is checked
byte for byte at load (`packed_as_gemm_reads`) and stays on oneDNN where its bytes lie otherwise.
oneDNN 3 (torch 2.13) packs float32 in that layout with AVX2 too (all but 144-192 outputs, blocked
by 16 there), so an AVX2-only CPU runs the kernel's 8-lane float32 path: on a Zen 3 core a batch-1
step of the default model took 45 ms against 80 with oneDNN's products.
"""

from __future__ import annotations

import ctypes
import os

import torch
import torch.nn.functional as F

GEMM_CHOICES = ("auto", "blas", "onednn")
PACKABLE = (torch.float32, torch.bfloat16)
TINY_MAX_ROWS = 8  # with plain weights, our GEMV runs up to here (the decode-sized inputs)
PACKED_GEMM_MAX_ROWS = 128  # with packed weights, `native.packed_gemm` runs up to here (decode steps)
BLOCK = 64  # outputs per block of the packed layouts `native.packed_gemm` reads
PACK_ROWS = 64  # the batch size oneDNN is told to expect when packing (it made no difference)


def choice() -> str:
    """``TPSERVE_GEMM``: auto (oneDNN where it packs the weight, our kernel on the packed bytes for
    1 to `PACKED_GEMM_MAX_ROWS` rows where it can read them), onednn (oneDNN for every size), or
    blas (plain weights)."""
    value = os.environ.get("TPSERVE_GEMM", "auto")
    if value not in GEMM_CHOICES:
        raise ValueError(f"TPSERVE_GEMM must be one of {GEMM_CHOICES}, got {value!r}")
    return value


def bf16_is_slow() -> bool:
    """Whether this CPU lacks the bfloat16 instructions oneDNN needs (AVX512-BW/VL/DQ or
    AVX-NE-CONVERT), as an AVX2-only Zen 3 does. There torch's own bfloat16 product is slow: on one
    Zen 3 core, for a 1536 x 576 weight, 3.8 ms at 16 rows and 112 ms at 512, where widening both
    operands to float32 per call and rounding the result once (`widened`) took 1.0 and 13.5 ms."""
    return not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported()


def widened(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x wᵀ (+ b) computed in float32 from bfloat16 operands (exact), rounded once to x's dtype, as
    oneDNN's bfloat16 kernels round. The float32 copy of w lives for the call only: the weight stays
    in bfloat16 in memory."""
    return F.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)


def onednn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x wᵀ (+ b) by oneDNN; `w` plain or packed."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def pack(w: torch.Tensor) -> torch.Tensor | None:
    """`w` (out, in) copied into oneDNN's blocked layout for this CPU, or None where oneDNN cannot
    take it (not a CPU float32/bfloat16 weight, torch without oneDNN, TPSERVE_GEMM=blas)."""
    if (choice() == "blas" or w.device.type != "cpu" or w.dtype not in PACKABLE or w.dim() != 2
            or w.numel() == 0 or not torch.backends.mkldnn.is_available()):
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), PACK_ROWS)
        onednn(w.new_zeros(1, w.shape[1]), packed, None)  # a build that packs but cannot multiply
    except (RuntimeError, AttributeError):
        return None
    return packed


def packed_pointer(packed: torch.Tensor) -> int:
    """The address of a packed weight's bytes (it has no storage torch would hand out)."""
    return torch.ops.mkldnn.data_ptr(packed)


def packed_layout(w: torch.Tensor) -> torch.Tensor:
    """`w` (out, in) as `native.packed_gemm` reads it, outputs padded with zeros to blocks of 64:
    float32 [out / 64][in][64], bfloat16 [out / 64][in / 2][64][2]."""
    n, k = w.shape
    blocks = -(-n // BLOCK)
    padded = torch.zeros(blocks * BLOCK, k, dtype=w.dtype)
    padded[:n] = w
    if w.dtype == torch.bfloat16:
        return padded.view(blocks, BLOCK, k // 2, 2).permute(0, 2, 1, 3).contiguous()
    return padded.view(blocks, BLOCK, k).permute(0, 2, 1).contiguous()


def packed_as_gemm_reads(w: torch.Tensor, packed: torch.Tensor) -> bool:
    """Whether oneDNN packed `w` into exactly the bytes of `packed_layout(w)`. oneDNN picks its
    layout per CPU and per version; `native.packed_gemm` is used only on weights where this holds,
    checked byte for byte once, at load."""
    n, k = w.shape
    if n % 16 or (w.dtype == torch.bfloat16 and k % 2) or w.dtype not in PACKABLE:
        return False
    try:
        nbytes = torch.ops.mkldnn._nbytes(packed)
        address = packed_pointer(packed)
    except (AttributeError, RuntimeError):  # a torch without these accessors
        return False
    expected = packed_layout(w).view(-1)
    if nbytes != expected.numel() * expected.element_size():
        return False
    ints = torch.int16 if w.dtype == torch.bfloat16 else torch.int32  # compared as bits: NaN == NaN
    raw = torch.frombuffer((ctypes.c_byte * nbytes).from_address(address), dtype=ints)
    return torch.equal(raw, expected.view(ints))
