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
else ``c++``), one compiler per source file and core, 20-60 s, and cached under
``$TPSERVE_CACHE/native`` (default ``~/.cache/tpserve/native``) keyed by the sources, the torch
version and this CPU, so every process after the first just loads it. ``make`` builds it at install time (``python -m tpkernels``).
Builders racing each other are safe: each writes a private file and renames it into place.

Where it cannot be built (no compiler) or is switched off (``TPSERVE_NATIVE=0``), the torch path
runs instead, with one warning; results agree within float rounding (tests/test_native.py).
CUDA always uses the torch path.

Instruction sets. The sources are plain C++ with GCC vector extensions, so the compiler's target
decides which instructions they become. The build that serves targets this machine
(``-march=native``: AVX2, AVX-512, AVX512-BF16, ... whatever the CPU reports, and the cache key
holds the CPU's flags, so a machine with other features gets its own build). The same sources also
build for each x86-64 level the CPU can run (`ISA_LEVELS`: v2 = SSE4.2 only, v3 = AVX2 + FMA,
v4 = AVX-512), each under its own operator namespace, so the tests check every path this machine
can execute against float64 (`variant`), and ``TPSERVE_NATIVE_ISA=x86-64-v3`` (read at import)
serves from a lower level, e.g. to reproduce an AVX2-only machine's numbers on an AVX-512 one.

DECODE_MAX_ROWS: steps of up to this many tokens run the fused element-wise operations (add + RMS
norm, rope, silu·up); larger ones run torch's operators. The GEMV (`small_linear`) serves only where
weights stay plain (see `tpkernels.gemm`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = sorted(CSRC.glob("*.cpp"))
HEADERS = sorted(CSRC.glob("*.h"))
LIB_NAME = "tpserve_native.so"
_state: dict[str, object] = {}  # "loaded": bool, "error": str
DECODE_MAX_ROWS = 16

# x86-64 micro-architecture levels (the psABI's), with the /proc/cpuinfo flags each needs.
ISA_LEVELS = {
    "x86-64-v2": ("sse4_2", "ssse3", "popcnt", "cx16"),
    "x86-64-v3": ("avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"),
    "x86-64-v4": ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"),
}
NATIVE = "native"  # -march=native: everything this CPU has
ISA = os.environ.get("TPSERVE_NATIVE_ISA", NATIVE)  # the build that serves


def _cache_root() -> Path:
    root = os.environ.get("TPSERVE_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "tpserve") / "native"


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> list[str] | None:
    """The distinct /proc/cpuinfo lines that builds depend on (model name, flags), sorted; None
    where it cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return sorted({ln for ln in text.splitlines() if ln.split(":")[0].strip() in ("model name", "flags", "Features")})


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    lines = _cpuinfo()
    return "\n".join(lines) if lines is not None else platform.processor() or platform.machine()


def _cpu_flags() -> set[str]:
    flags = next((ln for ln in _cpuinfo() or () if ln.split(":")[0].strip() == "flags"), "")
    return set(flags.partition(":")[2].split())


def isas_here() -> list[str]:
    """The builds this CPU can run: "native" first (what serves), then each x86-64 level it has."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return [NATIVE]
    flags = _cpu_flags()
    return [NATIVE, *(level for level, need in ISA_LEVELS.items() if flags.issuperset(need))]


def namespace(isa: str) -> str:
    """The operator namespace of a build: "tpserve" for the one that serves, one per other level."""
    return "tpserve" if isa == ISA else "tpserve_" + isa.replace("-", "_")


def _compile_flags(isa: str) -> list[str]:
    if isa != NATIVE and isa not in ISA_LEVELS:
        raise ValueError(f"TPSERVE_NATIVE_ISA must be one of {[NATIVE, *ISA_LEVELS]}, got {isa!r}")
    tdir = Path(torch.__file__).resolve().parent
    abi = int(torch.compiled_with_cxx11_abi())
    return [
        "-O3", f"-march={isa}", "-fopenmp", "-fPIC", "-std=c++20",
        f"-DTPSERVE_NS={namespace(isa)}", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-w",
        f"-I{tdir / 'include'}", f"-I{tdir / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
    ]


def _compile_command(compiler: str, source: Path, out: Path, isa: str = ISA) -> list[str]:
    """One source file to an object file."""
    return [compiler, *_compile_flags(isa), "-c", str(source), "-o", str(out)]


def _link_command(compiler: str, objects: list[Path], out: Path) -> list[str]:
    tlib = Path(torch.__file__).resolve().parent / "lib"
    return [compiler, "-shared", "-fopenmp", *map(str, objects), f"-L{tlib}", "-lc10", "-ltorch_cpu",
            f"-Wl,-rpath,{tlib}", "-o", str(out)]


def library_path(isa: str = ISA) -> Path:
    """Where these sources, built against this torch for this CPU and instruction set, are cached."""
    key = hashlib.sha256()
    commands = _compile_command("c++", Path("src"), Path("obj"), isa) + _link_command("c++", [Path("obj")], Path("out"))
    for part in (*(s.read_bytes() for s in SOURCES + HEADERS), torch.__version__.encode(),
                 _cpu_identity().encode(), " ".join(commands).encode()):
        key.update(part)
    return _cache_root() / key.hexdigest()[:16] / LIB_NAME


def _run_tool(command: list[str]) -> None:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"{command[0]} failed: " + " | ".join(tail))


def build(quiet: bool = False, isa: str = ISA) -> Path:
    """Compiles the kernels for `isa` unless they are cached; returns the library's path. Raises
    RuntimeError.

    Each source file compiles in a compiler process of its own, as many at once as this process
    may use cores (each spends most of its time in torch's headers), then one link."""
    lib = library_path(isa)
    if lib.is_file():
        return lib
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r} not found; set CXX or install g++)")
    lib.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        log.warning("tpserve: compiling the native kernels for %s (once per machine, 20-60 s)", isa)
    work = Path(tempfile.mkdtemp(dir=lib.parent))
    try:
        objects = [work / (s.stem + ".o") for s in SOURCES]
        biggest_first = sorted(zip(SOURCES, objects), key=lambda so: -so[0].stat().st_size)
        jobs = max(1, min(len(SOURCES), len(os.sched_getaffinity(0))))
        with ThreadPoolExecutor(jobs) as pool:
            for done in [pool.submit(_run_tool, _compile_command(compiler, s, o, isa)) for s, o in biggest_first]:
                done.result()
        tmp = work / LIB_NAME
        _run_tool(_link_command(compiler, objects, tmp))
        os.replace(tmp, lib)  # atomic: a racing builder's result is identical
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return lib


def available() -> bool:
    """True once the kernels are loaded into this process (building it if needed)."""
    if "loaded" not in _state:
        if os.environ.get("TPSERVE_NATIVE", "1") == "0":
            _state.update(loaded=False, error="switched off by TPSERVE_NATIVE=0")
        else:
            try:
                torch.ops.load_library(str(build(isa=ISA)))
                _state["loaded"] = True
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                _state.update(loaded=False, error=str(e))
                log.warning("tpserve: native kernels unavailable, using the torch path: %s", e)
    return bool(_state["loaded"])


def loaded() -> bool:
    """True when the kernels are loaded already; unlike `available()`, never starts a build."""
    return bool(_state.get("loaded"))


def unavailable_reason() -> str | None:
    return None if available() else str(_state.get("error"))


SMALL_DTYPES = (torch.float32, torch.bfloat16)  # what the decode-sized operations take


class Ops:
    """The operators of one build, called through its namespace (``torch.ops.<namespace>``)."""

    def __init__(self, isa: str):
        self.isa = isa
        self._ns = getattr(torch.ops, namespace(isa))

    def paged_decode_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                               window: int | None, out: torch.Tensor) -> None:
        """out[i] = attention of q[i] (heads, d) over the first context_lens[i] cached tokens of the
        sequence whose blocks block_tables[i] lists (the last `window` of them, when given)."""
        self._ns.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, window or 0, out)

    def small_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x Wᵀ (+ b) for a few rows of x (rows contiguous); W (out, in) contiguous; one dtype of
        SMALL_DTYPES for all."""
        out = x.new_empty((x.shape[0], weight.shape[0]))
        self._ns.small_linear(x, weight, bias, out)
        return out

    def packed_gemm_supported(self, dtype: torch.dtype) -> bool:
        """Whether this build has `packed_gemm` for `dtype` (float32: AVX2 + FMA or AVX-512; bfloat16:
        AVX512-BF16)."""
        return bool(self._ns.packed_gemm_supported(dtype))

    def packed_gemm(self, x: torch.Tensor, address: int, n: int, bias: torch.Tensor | None) -> torch.Tensor:
        """x Wᵀ (+ b) for any number of rows of x (rows contiguous), W (n, in) read at `address` in the
        layout of `gemm.packed_layout` (oneDNN's packing where `gemm.packed_as_gemm_reads`)."""
        out = x.new_empty((x.shape[0], n))
        self._ns.packed_gemm(x, address, n, bias, out)
        return out

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, rms_norm(x + delta) · weight), in one pass; contiguous (rows, hidden)."""
        residual, out = torch.empty_like(x), torch.empty_like(x)
        self._ns.add_rms_norm(x, delta, weight, eps, residual, out)
        return residual, out

    def rope_(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotates x (tokens, heads, d) in place; cos, sin hold d/2 values per token."""
        self._ns.rope_(x, cos, sin)

    def rope_and_cache_(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        rope: tuple[torch.Tensor, torch.Tensor] | None, slots: torch.Tensor,
                        k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        """q (tokens, heads, d) and k (tokens, kv_heads, d) rotated in place by rope's (cos, sin)
        when given, then k and v stored at the caches' slots (tokens,); caches (kv_heads, blocks,
        block_size * d)."""
        cos, sin = rope if rope is not None else (None, None)
        self._ns.rope_and_cache_(q, k, v, cos, sin, slots, k_cache, v_cache)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) · up for gate_up = [gate | up] (rows, 2f)."""
        out = gate_up.new_empty((gate_up.shape[0], gate_up.shape[1] // 2))
        self._ns.silu_mul(gate_up, out)
        return out

    def decode_stack_create(self, tensors: list[torch.Tensor | None], addresses: list[int], windows: list[int],
                            sizes: list[int], eps: float, scale: float) -> torch.Tensor:
        """A model's transformer blocks for `decode_stack_run` (csrc/decode_stack.cpp): per layer the
        tensors [attn_norm, mlp_norm, k_cache, v_cache, qkv_bias, o_bias, in_bias, out_bias] (biases
        may be None), the packed weights' addresses [qkv, o, in, out] and the sliding window (0:
        none); sizes [hidden, q_heads, kv_heads, head_dim, ffn outputs (2 f)]. The returned
        one-byte tensor owns the stack (and keeps the tensors alive)."""
        return self._ns.decode_stack_create(tensors, addresses, windows, sizes, eps, scale)

    def decode_stack_run(self, stack: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         slots: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                         channel: list[int] = (), who: str = "", timeout_s: float = 0.0,
                         step: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Every block of `stack` on x (tokens, hidden), each token a row of the paged kernel:
        (x, delta, step), the residual stream as the Python blocks leave it. At more than one rank,
        `channel` .. `step` are a shared-memory communicator's (`ShmCommunicator.native`): each
        block's row-parallel products are all-reduced on it, and `step` comes back advanced."""
        return self._ns.decode_stack_run(stack, x, cos, sin, slots, block_tables, context_lens, list(channel), who,
                                         timeout_s, step)

    def shm_all_reduce_(self, t: torch.Tensor, channel: list[int], who: str, timeout_s: float, step: int) -> int:
        """Sums t over the ranks of a shared-memory communicator in place, in its steps after `step`;
        returns the last step done (csrc/shm_all_reduce.h; `ShmCommunicator.native` supplies the
        arguments and turns its errors into the communicator's)."""
        return self._ns.shm_all_reduce_(t, channel, who, timeout_s, step)

    def vector_lanes(self) -> int:
        """The float32 lanes of this build's widest vectors: 16 where it has the AVX-512 paths, else 8."""
        return int(self._ns.vector_lanes())

    def argmax_rows(self, x: torch.Tensor) -> torch.Tensor:
        """x.argmax(-1) for (rows, n) float32 or bfloat16 without NaN, rows contiguous: int64 (rows,)."""
        out = torch.empty(x.shape[0], dtype=torch.int64)
        self._ns.argmax_rows(x, out)
        return out

    def greedy_rows(self, x: torch.Tensor) -> torch.Tensor:
        """As `argmax_rows`, for any rows: -1 where a row's maximum is not a finite number (a NaN in
        the row, +inf, or every value -inf), the rows greedy sampling must refuse."""
        out = torch.empty(x.shape[0], dtype=torch.int64)
        self._ns.greedy_rows(x, out)
        return out


_serving = Ops(ISA)  # what the model calls, once `available()` has loaded it
paged_decode_attention = _serving.paged_decode_attention
small_linear = _serving.small_linear
packed_gemm = _serving.packed_gemm
packed_gemm_supported = _serving.packed_gemm_supported
add_rms_norm = _serving.add_rms_norm
rope_ = _serving.rope_
rope_and_cache_ = _serving.rope_and_cache_
silu_mul = _serving.silu_mul
vector_lanes = _serving.vector_lanes
decode_stack_create = _serving.decode_stack_create
decode_stack_run = _serving.decode_stack_run
shm_all_reduce_ = _serving.shm_all_reduce_
argmax_rows = _serving.argmax_rows
greedy_rows = _serving.greedy_rows

_variants: dict[str, Ops] = {}


def variant(isa: str) -> Ops:
    """The operators built for `isa` (one of `isas_here()`), built and loaded on first use. Raises
    RuntimeError where it cannot be built, ValueError for an instruction set this CPU lacks."""
    if isa not in isas_here():
        raise ValueError(f"this CPU cannot run {isa!r} (it runs {isas_here()})")
    if isa == ISA:
        if not available():
            raise RuntimeError(unavailable_reason())
        return _serving
    if isa not in _variants:
        torch.ops.load_library(str(build(quiet=True, isa=isa)))
        _variants[isa] = Ops(isa)
    return _variants[isa]


def main() -> int:
    """``python -m tpkernels [ISA ...]``: build (or find) the kernels that serve, or those for
    the named instruction sets ("all": every one this CPU runs), and say where they are."""
    isas = sys.argv[1:] or [ISA]
    if isas == ["all"]:
        isas = isas_here()
    try:
        for isa in isas:
            print(f"native kernels ({isa}): {build(isa=isa)}")
    except RuntimeError as e:
        print(f"native kernels not built ({e}); the torch path will be used", file=sys.stderr)
    return 0
