"""Matrix products on CPU: which of BLAS (MKL's sgemm, what `F.linear` calls) and oneDNN runs a
prefill-sized product faster on this CPU, and the oneDNN call itself.

The answer depends on the CPU, the weight's shape and the number of rows: on an AMD Zen 5, MKL's
sgemm ran at 207 GFLOP/s and oneDNN at 474 on 128 rows, while on an Intel Xeon oneDNN was 5-25 %
faster than MKL for 17-64 rows only. So it is timed, once per weight shape, dtype, thread count and
size class per process (best of three): `MEDIUM_ROWS` stands for decode batches of 17-64 rows,
`LARGE_ROWS` for prefill chunks. ``TPSERVE_GEMM=blas`` or ``onednn`` decides instead.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

GEMM_CHOICES = ("auto", "blas", "onednn")
_faster: dict[tuple, bool] = {}  # (out, in, dtype, threads, rows) -> oneDNN beat BLAS
TINY_MAX_ROWS = 8  # up to here our GEMV always runs (the native kernels' decode path)
SMALL_ROWS = 12  # 9-16-row batches: the GEMV against oneDNN, timed at this many rows
MEDIUM_MAX_ROWS = 64  # decode batches up to here are timed as MEDIUM_ROWS rows
MEDIUM_ROWS, LARGE_ROWS = 48, 128


def onednn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def onednn_usable(w: torch.Tensor) -> bool:
    """oneDNN's matmul on the plain weight, where this torch build has it."""
    if w.device.type != "cpu" or w.numel() == 0 or not torch.backends.mkldnn.is_available():
        return False
    try:
        onednn(w.new_zeros(1, w.shape[1]), w, None)
    except (RuntimeError, AttributeError):
        return False
    return True


def onednn_is_faster(w: torch.Tensor, rows: int = LARGE_ROWS) -> bool:
    """Whether oneDNN runs a `rows`-row product on `w` faster than BLAS here (see the module)."""
    choice = os.environ.get("TPSERVE_GEMM", "auto")
    if choice not in GEMM_CHOICES:
        raise ValueError(f"TPSERVE_GEMM must be one of {GEMM_CHOICES}, got {choice!r}")
    if choice != "auto":
        return choice == "onednn"
    return _onednn_wins(_faster, (*w.shape, w.dtype, torch.get_num_threads(), rows), w, rows,
                        lambda x: F.linear(x, w))


_gemv_slower: dict[tuple, bool] = {}  # (out, in, dtype, threads) -> oneDNN beat the GEMV


def onednn_beats_gemv(w: torch.Tensor) -> bool:
    """Whether oneDNN runs a `SMALL_ROWS`-row product on `w` faster than our GEMV
    (`tpkernels.native.small_linear`, which must be loaded), timed once per weight shape."""
    from tpkernels import native

    return _onednn_wins(_gemv_slower, (*w.shape, w.dtype, torch.get_num_threads()), w, SMALL_ROWS,
                        lambda x: native.small_linear(x, w, None), runs=6)


def _onednn_wins(cache: dict, key: tuple, w: torch.Tensor, rows: int, other, runs: int = 3) -> bool:
    """oneDNN against `other(x)` on a `rows`-row input, best of `runs` each; answered once per key."""
    if key not in cache:
        x = torch.randn(rows, w.shape[1], dtype=w.dtype)
        cache[key] = _best_of(lambda: onednn(x, w, None), runs) < _best_of(lambda: other(x), runs)
    return cache[key]


def _best_of(fn, runs: int = 3) -> float:
    fn()  # first call: allocations, oneDNN's kernel generation
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)
