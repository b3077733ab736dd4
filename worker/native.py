"""Native CPU kernels for decode steps.

* `csrc/paged_attention.cpp`: decode attention read straight from the paged KV cache. The
  pure-torch path (`worker.attention`) has to copy each sequence's blocks into a padded buffer
  before `scaled_dot_product_attention` can use them; on CPU that copy and the padded attention
  cost more than the attention itself. The kernel walks the block tables instead and reads every
  cached key and value exactly once.
* `csrc/decode_ops.cpp`: float32 and bfloat16 operations on decode-sized inputs (a few rows): a
  matrix-vector product that streams each weight once at close to memory bandwidth, and fused
  residual-add + RMS norm, rotary embedding and silu·up, which replace a few dozen small aten
  calls per layer. bfloat16 is computed in float32 and rounded where transformers' modules round.
  Larger inputs (prefill) keep the torch operators, so prompt logits stay those of transformers.

It is compiled on first use against the installed torch with the system C++ compiler (``$CXX``,
else ``c++``), about 20 s, and cached under ``$TPSERVE_CACHE/native`` (default
``~/.cache/tpserve/native``) keyed by the sources, the torch version and this CPU, so every process
after the first just loads it. ``make`` builds it at install time (``python -m worker.native``).
Builders racing each other are safe: each writes a private file and renames it into place.

Where it cannot be built (no compiler) or is switched off (``TPSERVE_NATIVE=0``), the torch path
runs instead, with one warning; results agree within float rounding (tests/test_native.py).
CUDA always uses the torch path.

DECODE_MAX_ROWS is where the small-input operations stop paying: past it, blocked GEMMs (oneDNN's or
BLAS's, `sharding.layers.Linear` times which) win.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = sorted((Path(__file__).resolve().parent / "csrc").glob("*.cpp"))
LIB_NAME = "tpserve_native.so"
_state: dict[str, object] = {}  # "loaded": bool, "error": str
DECODE_MAX_ROWS = 16


def _cache_root() -> Path:
    root = os.environ.get("TPSERVE_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "tpserve") / "native"


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in text.splitlines() if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(sorted(set(keep)))


def _compile_command(compiler: str, sources: list[Path], out: Path) -> list[str]:
    tdir = Path(torch.__file__).resolve().parent
    abi = int(torch.compiled_with_cxx11_abi())
    return [
        compiler, "-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++20",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-w",
        f"-I{tdir / 'include'}", f"-I{tdir / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
        *map(str, sources), f"-L{tdir / 'lib'}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{tdir / 'lib'}",
        "-o", str(out),
    ]


def library_path() -> Path:
    """Where these sources, built against this torch for this CPU, are cached."""
    key = hashlib.sha256()
    for part in (*(s.read_bytes() for s in SOURCES), torch.__version__.encode(), _cpu_identity().encode(),
                 " ".join(_compile_command("c++", [Path("src")], Path("out"))).encode()):
        key.update(part)
    return _cache_root() / key.hexdigest()[:16] / LIB_NAME


def build(quiet: bool = False) -> Path:
    """Compiles the kernels unless they are cached; returns the library's path. Raises RuntimeError."""
    lib = library_path()
    if lib.is_file():
        return lib
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r} not found; set CXX or install g++)")
    lib.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        log.warning("tpserve: compiling the native kernels (once per machine, ~20 s)")
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    try:
        proc = subprocess.run(_compile_command(compiler, SOURCES, Path(tmp)), capture_output=True, text=True,
                              timeout=600)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise RuntimeError(f"{compiler} failed: " + " | ".join(tail))
        os.replace(tmp, lib)  # atomic: a racing builder's result is identical
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def available() -> bool:
    """True once the kernels are loaded into this process (building it if needed)."""
    if "loaded" not in _state:
        if os.environ.get("TPSERVE_NATIVE", "1") == "0":
            _state.update(loaded=False, error="switched off by TPSERVE_NATIVE=0")
        else:
            try:
                torch.ops.load_library(str(build()))
                _state["loaded"] = True
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                _state.update(loaded=False, error=str(e))
                log.warning("tpserve: native kernels unavailable, using the torch path: %s", e)
    return bool(_state["loaded"])


def unavailable_reason() -> str | None:
    return None if available() else str(_state.get("error"))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           window: int | None, out: torch.Tensor) -> None:
    """out[i] = attention of q[i] (heads, d) over the first context_lens[i] cached tokens of the
    sequence whose blocks block_tables[i] lists (the last `window` of them, when given)."""
    torch.ops.tpserve.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens,
                                             scale, window or 0, out)


SMALL_DTYPES = (torch.float32, torch.bfloat16)  # what the decode-sized operations take


def small_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x Wᵀ (+ b) for a few rows of x (rows contiguous); W (out, in) contiguous; one dtype of
    SMALL_DTYPES for all."""
    out = x.new_empty((x.shape[0], weight.shape[0]))
    torch.ops.tpserve.small_linear(x, weight, bias, out)
    return out


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta) · weight), in one pass; contiguous (rows, hidden)."""
    residual, out = torch.empty_like(x), torch.empty_like(x)
    torch.ops.tpserve.add_rms_norm(x, delta, weight, eps, residual, out)
    return residual, out


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotates x (tokens, heads, d) in place; cos, sin hold d/2 values per token."""
    torch.ops.tpserve.rope_(x, cos, sin)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up for gate_up = [gate | up] (rows, 2f)."""
    out = gate_up.new_empty((gate_up.shape[0], gate_up.shape[1] // 2))
    torch.ops.tpserve.silu_mul(gate_up, out)
    return out


def main() -> int:
    """``python -m worker.native``: build (or find) the kernels and say where they are."""
    try:
        lib = build()
    except RuntimeError as e:
        print(f"native kernels not built ({e}); the torch path will be used", file=sys.stderr)
        return 0
    print(f"native kernels: {lib}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
