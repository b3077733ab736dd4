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
`TINY_MAX_ROWS` rows), as does a torch built without oneDNN.
"""

from __future__ import annotations

import os

import torch

GEMM_CHOICES = ("auto", "blas", "onednn")
PACKABLE = (torch.float32, torch.bfloat16)
TINY_MAX_ROWS = 8  # with plain weights, our GEMV runs up to here (the decode-sized inputs)
PACK_ROWS = 64  # the batch size oneDNN is told to expect when packing (it made no difference)


def choice() -> str:
    """``TPSERVE_GEMM``: auto (oneDNN where it packs the weight), onednn, or blas."""
    value = os.environ.get("TPSERVE_GEMM", "auto")
    if value not in GEMM_CHOICES:
        raise ValueError(f"TPSERVE_GEMM must be one of {GEMM_CHOICES}, got {value!r}")
    return value


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
