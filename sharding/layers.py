"""Tensor-parallel layers. Each holds one rank's slice (already read by the loader) and shows its
collective in `forward`.

Plain classes rather than ``nn.Module``: inference only, weights come from the plan, and a decode
step calls these a few hundred times, so hooks and autograd bookkeeping are pure overhead.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

from sharding.group import TPGroup
from worker import native  # the decode-sized kernels (a module of plain functions, no cycle)


GEMM_CHOICES = ("auto", "blas", "onednn")
_faster: dict[tuple, bool] = {}  # (out, in, dtype, threads) -> oneDNN beat BLAS, timed once per process


def _onednn_usable(w: torch.Tensor) -> bool:
    """oneDNN's matmul on the plain weight, where this torch build has it."""
    if w.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        _onednn(w.new_zeros(1, w.shape[1]), w, None)
    except (RuntimeError, AttributeError):
        return False
    return True


def _onednn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def _onednn_is_faster(w: torch.Tensor) -> bool:
    """Whether oneDNN runs a prefill-sized product on `w` faster than BLAS here, timed (best of
    three, 128 rows) once per weight shape and process. ``TPSERVE_GEMM=blas|onednn`` decides
    instead. The answer depends on the CPU: on an AMD Zen 5, MKL's sgemm (what `F.linear` calls)
    ran at 207 GFLOP/s and oneDNN at 474."""
    choice = os.environ.get("TPSERVE_GEMM", "auto")
    if choice not in GEMM_CHOICES:
        raise ValueError(f"TPSERVE_GEMM must be one of {GEMM_CHOICES}, got {choice!r}")
    if choice != "auto":
        return choice == "onednn"
    key = (*w.shape, w.dtype, torch.get_num_threads())
    if key not in _faster:
        x = torch.randn(128, w.shape[1], dtype=w.dtype)
        _faster[key] = _best_of(lambda: _onednn(x, w, None)) < _best_of(lambda: F.linear(x, w))
    return _faster[key]


def _best_of(fn, runs: int = 3) -> float:
    fn()  # first call: allocations, oneDNN's kernel generation
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


class Linear:
    """y = x Wᵀ (+ b) on one rank's weight.

    Two kernels on one weight, chosen per call by the number of rows. Decode-sized inputs (a few
    rows) are memory-bound: they go to our matrix-vector kernel (`worker.native`), which streams
    the weight once at close to memory bandwidth, or, where it is not built, to oneDNN; MKL's
    BLAS, which `F.linear` uses, re-packs the weight per call and runs those shapes 1.3-2.5x
    slower. Larger inputs (prefill, large decode batches) are compute-bound and go to whichever of
    BLAS and oneDNN is faster on this CPU for this weight's shape (`_onednn_is_faster`, timed once).
    The kernels sum in different orders (all fp32-accurate), which moves logits by ~1e-5 to 1e-4.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias
        self.out_features, self.in_features = weight.shape
        cpu = weight.numel() > 0 and weight.device.type == "cpu"
        small = cpu and weight.dtype in native.SMALL_DTYPES
        self.native = small and weight.is_contiguous() and native.available()
        onednn = cpu and _onednn_usable(weight)
        self.onednn = small and not self.native and onednn  # for decode-sized inputs
        self.onednn_large = onednn and _onednn_is_faster(weight)  # for the rest

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= native.DECODE_MAX_ROWS:
            if self.native:
                return native.small_linear(x if x.stride(-1) == 1 else x.contiguous(), self.weight, self.bias)
            if self.onednn:
                return _onednn(x, self.weight, self.bias)
        elif self.onednn_large:
            return _onednn(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class ColumnParallelLinear:
    """A = [A₁; …; Aₚ] split by output rows: rank r computes yᵣ = x Aᵣᵀ + bᵣ, its own slice of y.
    No communication; the next layer consumes the slice as it is."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.linear = Linear(weight, bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class RowParallelLinear:
    """A = [A₁ … Aₚ] split by input columns: rank r holds the activation slice xᵣ and computes
    the partial sum xᵣ Aᵣᵀ; y = Σᵣ xᵣ Aᵣᵀ + b. The bias is added once, after the all-reduce."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group: TPGroup):
        self.linear = Linear(weight)
        self.bias = bias
        self.group = group

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        self.group.all_reduce(y)
        if self.bias is not None:
            y += self.bias
        return y


class VocabParallelEmbedding:
    """Rank r owns vocabulary rows [start, stop). It embeds the ids it owns, writes zeros for the
    others, and an all-reduce assembles the full embedding on every rank."""

    def __init__(self, weight: torch.Tensor, start: int, group: TPGroup):
        self.weight = weight
        self.start, self.stop = start, start + weight.shape[0]
        self.group = group

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if self.group.world_size == 1:
            return F.embedding(ids, self.weight)
        foreign = (ids < self.start) | (ids >= self.stop)
        local = (ids - self.start).masked_fill(foreign, 0)
        x = F.embedding(local, self.weight).masked_fill(foreign.unsqueeze(-1), 0.0)
        self.group.all_reduce(x)
        return x


class ParallelLMHead:
    """Rank r computes the logits of its vocabulary rows; rank 0 gathers and concatenates them,
    dropping the padding rows. Returns (tokens, vocab_size) logits on rank 0, None elsewhere."""

    def __init__(self, weight: torch.Tensor, vocab_size: int, group: TPGroup):
        self.linear = Linear(weight)
        self.vocab_size = vocab_size
        self.group = group

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        local = self.linear(x)  # (tokens, padded_vocab / tp)
        parts = self.group.gather_to_first(local)
        if parts is None:
            return None
        return torch.cat(parts, dim=-1)[..., : self.vocab_size]
