"""The kernels a rank's forward runs, and the one place that decides which: once per model by its
device and dtype (`Kernels.select`), per step by the step's size (`Kernels.ops`), per matrix
product by the input's rows (`Kernels.matmul`). `sharding` (the tensor-parallel layers) and
`worker` (the model, attention, the engine) both sit on top of this package; it imports neither.

A transformer block has three pieces of element-wise work that fused kernels do in one pass
(residual add + RMS norm; rotary embedding + the KV-cache write; silu·up), and one operation,
decode attention, that a kernel can do straight from the paged cache. Three sets of operations:

* `TorchOps`: plain aten operators, any device, dtype and size. The reference formulation, and
  what prefill steps run on CPU for their element-wise work.
* `NativeOps`: `tpkernels.native`'s C++ kernels, for float32 and bfloat16 steps of at most
  `DECODE_MAX_ROWS` tokens on CPU.
* `TritonOps`: `tpkernels.triton_ops`, for CUDA, every step, any dtype.

`Kernels.select` makes the per-model choice; `Kernels.ops(tokens)` gives a step its set, which
the step's `Batch` carries to every layer.

Matrix products have three kernels on CPU. Decode-sized inputs (at most `native.DECODE_MAX_ROWS`
rows) are memory-bound: our matrix-vector kernel (`native.small_linear`) streams the weight once at
close to memory bandwidth; where it is not built, oneDNN; MKL's BLAS, which `F.linear` uses,
re-packs the weight per call and runs those shapes 1.3-2.5x slower. Up to `gemm.TINY_MAX_ROWS` the
GEMV always runs; from there to 16 rows oneDNN's blocking can already win (it did from 9 rows on
an AMD Zen 5), so that class is timed per weight (`gemm.onednn_beats_gemv`). Larger inputs (prefill, large
decode batches) are compute-bound and go to whichever of BLAS and oneDNN is faster on this CPU for
the weight's shape and the input's size class, 17-64 rows or more (`gemm.onednn_is_faster`). The kernels sum in different orders (all
fp32-accurate), which moves logits by ~1e-5 to 1e-4. On CUDA every product is `F.linear`.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from tpkernels import gemm, native

log = logging.getLogger(__name__)

CHOICES = ("auto", "torch", "native", "triton")


def _triton_importable() -> bool:
    if importlib.util.find_spec("triton") is None:
        log.warning("tpserve: triton is not installed; CUDA steps use the plain torch path")
        return False
    return True


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates the two halves of each head: x (tokens, heads, d) → [x₁cos − x₂sin, x₂cos + x₁sin]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class TorchOps:
    name = "torch"

    @staticmethod
    def add_rms_norm(x, delta, weight, eps):
        """(x + delta, rms_norm(x + delta) · weight)."""
        x = x + delta
        return x, F.rms_norm(x, tuple(weight.shape), weight, eps)

    @staticmethod
    def rope_and_cache(q, k, v, rope, slots, cache):
        """q, k rotated (when the model has rope), then k and v stored at cache slots `slots`."""
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        cache.write(slots, k, v)
        return q, k

    @staticmethod
    def silu_mul(gate_up):
        gate, up = gate_up.chunk(2, dim=-1)  # this rank's [gate; up] rows
        return F.silu(gate) * up


class NativeOps:
    name = "native"

    @staticmethod
    def add_rms_norm(x, delta, weight, eps):
        return native.add_rms_norm(x, delta, weight, eps)

    @staticmethod
    def rope_and_cache(q, k, v, rope, slots, cache):
        if rope is not None:  # in place, on this step's fresh projection
            native.rope_(q, *rope)
            native.rope_(k, *rope)
        cache.write(slots, k, v)
        return q, k

    @staticmethod
    def silu_mul(gate_up):
        return native.silu_mul(gate_up)


class TritonOps:
    name = "triton"

    def __init__(self):
        from tpkernels import triton_ops  # imports triton: only where these kernels are chosen

        self._k = triton_ops

    def add_rms_norm(self, x, delta, weight, eps):
        return self._k.add_rms_norm(x, delta, weight, eps)

    def rope_and_cache(self, q, k, v, rope, slots, cache):
        cos, sin = rope if rope is not None else (None, None)
        self._k.rope_and_cache_(q, k, v, cos, sin, slots, cache.k, cache.v)
        return q, k

    def silu_mul(self, gate_up):
        return self._k.silu_mul(gate_up)


TORCH_OPS = TorchOps()


class Matmul:
    """y = x Wᵀ (+ b) on one weight, with the kernel for each call picked by its rows: `tiny` up to
    `gemm.TINY_MAX_ROWS`, `small` up to `native.DECODE_MAX_ROWS`, `medium` up to
    `gemm.MEDIUM_MAX_ROWS`, `large` above; each one of "native" | "onednn" | "torch", decided by
    `Kernels.matmul`."""

    __slots__ = ("weight", "bias", "tiny", "small", "medium", "large")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, tiny: str, small: str, medium: str,
                 large: str):
        self.weight, self.bias = weight, bias
        self.tiny, self.small, self.medium, self.large = tiny, small, medium, large

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        kernel = (self.tiny if rows <= gemm.TINY_MAX_ROWS else self.small if rows <= native.DECODE_MAX_ROWS
                  else self.medium if rows <= gemm.MEDIUM_MAX_ROWS else self.large)
        if kernel == "native":
            return native.small_linear(x if x.stride(-1) == 1 else x.contiguous(), self.weight, self.bias)
        if kernel == "onednn":
            return gemm.onednn(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


@dataclass(frozen=True)
class Kernels:
    name: str  # "torch" | "native" | "triton"
    fused: object  # the op set of steps it applies to
    fused_max_tokens: int | None  # steps above this many tokens use TORCH_OPS; None: no limit
    # decode attention read through the block tables:
    # (q, k_cache, v_cache, block_tables, context_lens, scale, window, out) -> None
    decode_attention: Callable | None

    def matmul(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Matmul:
        """The product with `weight` (out, in) (+ `bias`), its kernels chosen here: see the module."""
        tiny = small = medium = large = "torch"
        if weight.device.type == "cpu" and weight.numel() > 0:
            onednn = gemm.onednn_usable(weight)
            gemv = self.name == "native" and weight.dtype in native.SMALL_DTYPES and weight.is_contiguous()
            if onednn and weight.dtype in native.SMALL_DTYPES:
                tiny = small = "onednn"
            if gemv:  # batch 1 to 8: the GEMV; 9 to 16: the GEMV where it beats oneDNN on this weight
                tiny = "native"
                if not onednn or not gemm.onednn_beats_gemv(weight):
                    small = "native"
            if onednn and gemm.onednn_is_faster(weight, gemm.MEDIUM_ROWS):
                medium = "onednn"
            if onednn and gemm.onednn_is_faster(weight, gemm.LARGE_ROWS):
                large = "onednn"
        return Matmul(weight, bias, tiny, small, medium, large)

    def ops(self, num_tokens: int):
        """The op set of a step of `num_tokens` tokens."""
        if self.fused_max_tokens is None or num_tokens <= self.fused_max_tokens:
            return self.fused
        return TORCH_OPS

    @classmethod
    def select(cls, device: torch.device, dtype: torch.dtype, choice: str = "auto") -> "Kernels":
        """auto: Triton on CUDA, the native kernels on CPU where they build, else plain torch.
        "triton" also runs on CPU tensors under the Triton interpreter (tests)."""
        if choice not in CHOICES:
            raise ValueError(f"kernels must be one of {CHOICES}, got {choice!r}")
        if choice == "auto":
            choice = ("triton" if device.type == "cuda" and _triton_importable()
                      else "native" if device.type == "cpu" and native.available() else "torch")
        if choice == "triton":
            from tpkernels.triton_attention import paged_decode_attention

            return cls("triton", TritonOps(), None, paged_decode_attention)
        if choice == "native":
            if device.type != "cpu" or not native.available():
                raise ValueError(f"the native kernels run on CPU only and must build here "
                                 f"({native.unavailable_reason() or device})")
            small = dtype in native.SMALL_DTYPES
            return cls("native", NativeOps() if small else TORCH_OPS, native.DECODE_MAX_ROWS,
                       native.paged_decode_attention)
        return cls("torch", TORCH_OPS, None, None)
