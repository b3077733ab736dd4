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

Matrix products on CPU keep each weight packed once into oneDNN's blocked layout (`gemm.pack`, see
`tpkernels.gemm`): oneDNN on it beat both MKL's BLAS and our own plain-weight GEMV from a handful of
rows up on the CPU measured (AMD Zen 5), and in bfloat16 everywhere. Prefill-sized inputs run on
oneDNN. Decode-sized inputs, 1 to `gemm.PACKED_GEMM_MAX_ROWS` rows, run our own kernel on the packed
weight instead (`native.packed_gemm`: no per-call set-up, each weight streamed once), where the build
has it (float32: AVX2 + FMA or AVX-512; bfloat16: AVX512-BF16) and the weight's packed bytes are laid
out as it reads them (`gemm.packed_as_gemm_reads`). A bfloat16 weight on a CPU where oneDNN has no
bfloat16 (AVX2 only) is packed by us and runs our kernel at every size (widened as it streams).
Where oneDNN cannot take a weight (float16, a torch without oneDNN, ``TPSERVE_GEMM=blas``) the
weight stays plain: up to `gemm.TINY_MAX_ROWS` rows our GEMV (`native.small_linear`) streams it,
larger inputs go to `F.linear`. On CUDA every product is `F.linear`. The kernels sum in different
orders (all fp32-accurate), which moves logits by ~1e-5 to 1e-4.
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
    """`large`: the op set of steps above `native.DECODE_MAX_ROWS` tokens. Their silu·up is ours
    unless torch's own runs on wider vectors than our build: at 512 rows on two Zen 5 threads ours
    took 140 µs in bfloat16 against torch's 194, 80 against 150 in float32, but an 8-lane build
    there (``TPSERVE_NATIVE_ISA=x86-64-v3``) took 320 against torch's AVX-512 190. On an AVX2-only
    Zen 3, where both have 8 lanes, ours took 340 µs against 836 in float32, 672 against 881 in
    bfloat16 (512 rows, two threads)."""

    name = "native"

    def __init__(self, large: bool = False):
        if large and native.vector_lanes() < 16 and torch.backends.cpu.get_cpu_capability() == "AVX512":
            self.silu_mul = TorchOps.silu_mul

    @property
    def all_native(self) -> bool:
        """Every operation ours (`worker.model.DecodeStack` runs only those)."""
        return self.silu_mul is not TorchOps.silu_mul

    @staticmethod
    def add_rms_norm(x, delta, weight, eps):
        return native.add_rms_norm(x, delta, weight, eps)

    @staticmethod
    def rope_and_cache(q, k, v, rope, slots, cache):
        native.rope_and_cache_(q, k, v, rope, slots, cache.k, cache.v)  # in place, on this step's projection
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
    """y = x Wᵀ (+ b) on one weight: inputs of up to `small_rows` rows run `small`, larger ones
    `large`; each one of "onednn" (the weight is packed) | "packed" (our kernel on that packed weight)
    | "native" (our GEMV on a plain weight) | "widened" (bfloat16 computed in float32, `gemm.widened`)
    | "torch", decided by `Kernels.matmul`."""

    __slots__ = ("weight", "bias", "small", "large", "small_rows", "address", "outputs")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, small: str, large: str,
                 small_rows: int = gemm.TINY_MAX_ROWS, outputs: int | None = None):
        self.weight, self.bias = weight, bias
        self.small, self.large, self.small_rows = small, large, small_rows
        self.outputs = weight.shape[0] if outputs is None else outputs
        # oneDNN's packed weights have no storage torch hands out; our own (`gemm.packed_layout`) do
        self.address = None if small != "packed" else gemm.packed_pointer(weight) if weight.is_mkldnn else weight.data_ptr()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.small if x.shape[0] <= self.small_rows else self.large
        if kernel == "onednn":
            return gemm.onednn(x, self.weight, self.bias)
        if kernel == "packed":
            return native.packed_gemm(x if x.stride(-1) == 1 else x.contiguous(), self.address, self.outputs,
                                      self.bias)
        if kernel == "native":
            return native.small_linear(x if x.stride(-1) == 1 else x.contiguous(), self.weight, self.bias)
        if kernel == "widened":
            return gemm.widened(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


@dataclass(frozen=True)
class Kernels:
    name: str  # "torch" | "native" | "triton"
    fused: object  # the op set of steps it applies to
    fused_max_tokens: int | None  # steps above this many tokens use `fused_large`; None: no limit
    # decode attention read through the block tables:
    # (q, k_cache, v_cache, block_tables, context_lens, scale, window, out) -> None
    decode_attention: Callable | None
    # head sizes whose prefill attention also runs on `decode_attention`, a row per query token
    # (the native kernel's vector paths: it ran 2-3x torch's CPU SDPA on 512-token prompts)
    paged_prefill_head_multiple: int | None = None
    fused_large: object = TORCH_OPS  # the op set of steps above fused_max_tokens

    def paged_prefill(self, head_dim: int) -> bool:
        m = self.paged_prefill_head_multiple
        return m is not None and head_dim % m == 0

    def matmul(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Matmul:
        """The product with `weight` (out, in) (+ `bias`), its kernels chosen here: see the module.
        oneDNN is torch's own, so the plain "torch" kernels take it too; only the "native" set runs
        ours (`native.packed_gemm` on packed weights, the GEMV on plain ones)."""
        if (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and self.name == "native"
                and gemm.choice() == "auto" and gemm.bf16_is_slow() and native.packed_gemm_supported(torch.bfloat16)
                and weight.dim() == 2 and weight.shape[0] % 16 == 0 and weight.shape[1] % 2 == 0):
            # no bfloat16 in oneDNN here (AVX2 only): our kernel widens the weight as it streams it,
            # at every size, from our own packing of it (oneDNN would not pack it)
            return Matmul(gemm.packed_layout(weight), bias, "packed", "packed", gemm.PACKED_GEMM_MAX_ROWS,
                          outputs=weight.shape[0])
        if weight.device.type == "cpu":
            packed = gemm.pack(weight)
            if packed is not None:
                if (self.name == "native" and gemm.choice() == "auto" and native.packed_gemm_supported(weight.dtype)
                        and gemm.packed_as_gemm_reads(weight, packed)):
                    return Matmul(packed, bias, "packed", "onednn", gemm.PACKED_GEMM_MAX_ROWS)
                return Matmul(packed, bias, "onednn", "onednn")
        gemv = (self.name == "native" and weight.device.type == "cpu" and weight.dtype in native.SMALL_DTYPES
                and weight.is_contiguous() and weight.numel() > 0)
        # bfloat16 where oneDNN has none (it did not pack the weight): torch's own product is slow
        plain = ("widened" if weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and gemm.bf16_is_slow()
                 else "torch")
        return Matmul(weight, bias, "native" if gemv else plain, plain)

    def ops(self, num_tokens: int):
        """The op set of a step of `num_tokens` tokens."""
        if self.fused_max_tokens is None or num_tokens <= self.fused_max_tokens:
            return self.fused
        return self.fused_large

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
                       native.paged_decode_attention, 32 if small else None,
                       NativeOps(large=True) if small else TORCH_OPS)
        return cls("torch", TORCH_OPS, None, None)
