"""glibc's allocator, told to keep the memory a step frees: the next step reuses it without page faults.

Every layer of a step allocates its activations and frees them again; a 512-token step's gate/up
projection alone is 6 MB in float32. By default glibc serves blocks above a (sliding) mmap
threshold with fresh mappings that it unmaps when they are freed, and it gives the top of its
heap back to the kernel whenever more than 128 KB of it is free. Either way the next step writes
to fresh pages, and the kernel zero-fills every 4 KB page on its first write. Measured on a 2-core
AMD EPYC (Zen 5), one core, `bench_vs_vllm`'s mixed workload on llama-even float32 in process:
2.34 million page faults and 3.7 s of system time in a 37 s run; with the settings below 1.27
million (the rest are the one-time loads of weights and cache) and 2.0 s, and the throughput went
from 225 to 243 tokens/s, the median time to first token from 9.9 to 8.1 s. vLLM's CPU guide asks
for a preloaded tcmalloc for the same reason; these settings need nothing installed.

Huge pages. Where the kernel hands out transparent huge pages only to memory that asks for them
(`/sys/kernel/mm/transparent_hugepage/enabled` = madvise, the common default), every weight, cache
block and activation lies on 4 KB pages: a batch-1 decode step streams 131,000 of them for the
default model's 538 MB of float32 weights, each a TLB miss. glibc (2.35 on) asks for huge pages
on all the memory it maps when its tunable ``glibc.malloc.hugetlb=1`` is set, but it reads its
tunables once, when the process starts: `rank_environment()` is what a process that will run a
rank must be started with, and the controller starts its rank actors with it. Measured on the
same machine, two threads, in process, two runs each: batch-1 decode 14.8-15.2 -> 14.7 ms
(float32) and 9.4-9.5 -> 9.0-9.2 ms (bfloat16); the mixed workload in bfloat16 647-693 ->
697-699 tokens/s.

The cost: the process keeps the memory of its largest step mapped while it lives, and huge pages
round its mappings up to 2 MB and make the first touch of memory slower where the kernel is slow
to hand them out: on that VM, loading the default model with a 65,536-token cache took 2.6-5.5 s
instead of 0.9 s, and `tpserve serve` was ready in 12.8 s instead of 7.8-10.3 s (system time, in
the page faults; no compaction stalls). The ``TPSERVE_MALLOC`` environment variable chooses:
``keep`` (the default: both) or ``system`` (glibc's own behaviour, unchanged);
``GLIBC_TUNABLES=glibc.malloc.hugetlb=0`` keeps the first and drops the huge pages.

The KV cache does not come from the heap: `zeroed()` maps it on its own, where the kernel
hands out every page already zeroed when it is first written, so allocating gigabytes of cache
costs nothing at load (`torch.zeros` wrote all of it: 2 GB took 1.3-3.5 s on a 2-core Zen 3 VM,
the longest step of `tpserve serve`'s start-up). `Populator` then faults the pages in ahead of
use, by default on a thread at nice 19 once the rank is loaded (engine.kv_cache_populate).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import os
import platform
import sys
import threading

import torch

log = logging.getLogger(__name__)

MALLOC_CHOICES = ("keep", "system")
# mallopt's parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks up to 32 MB come from the heap, not from mmap
TRIM_THRESHOLD = 1 << 30  # give the heap's top back only once a GB of it is free
TOP_PAD = 64 << 20  # grow the heap 64 MB at a time
HUGE_PAGES = "glibc.malloc.hugetlb=1"  # malloc madvises what it maps MADV_HUGEPAGE
MADV_POPULATE_WRITE = 23  # madvise(2), Linux 5.14 on: fault the pages in as if written, content kept
POPULATE_CHUNK = 2 << 20  # one huge page per madvise call: the thread yields between them
RESTARTED = "TPSERVE_RESTARTED_FOR_MEMORY"  # set in a process `restart_with_rank_environment` started


def choice() -> str:
    value = os.environ.get("TPSERVE_MALLOC", "keep")
    if value not in MALLOC_CHOICES:
        raise ValueError(f"TPSERVE_MALLOC must be one of {MALLOC_CHOICES}, got {value!r}")
    return value


def _glibc_linux() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@functools.cache
def keep_freed_memory() -> bool:
    """Applies the settings above to this process once (glibc only; TPSERVE_MALLOC=system leaves
    glibc alone). True when they are in force."""
    ok = False
    if choice() == "keep" and _glibc_linux():
        try:
            mallopt = ctypes.CDLL(None).mallopt
            mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
            ok = all(mallopt(param, value) == 1 for param, value in (
                (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))
        except (OSError, AttributeError) as e:
            log.warning("tpserve: could not tune glibc's allocator: %s", e)
    return ok


def rank_environment() -> dict[str, str]:
    """The environment variables a process that will run a rank must start with: GLIBC_TUNABLES
    with `HUGE_PAGES` added to whatever tunables this process was given (an operator's own
    ``glibc.malloc.hugetlb`` stands). Empty with TPSERVE_MALLOC=system and off glibc."""
    if choice() != "keep" or not _glibc_linux():
        return {}
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb=" not in tunables:
        tunables = ":".join(t for t in (tunables, HUGE_PAGES) if t)
    return {"GLIBC_TUNABLES": tunables}


def _initial_environment() -> dict[str, str]:
    """The environment this process was started with (what glibc read), not os.environ now."""
    try:
        raw = open("/proc/self/environ", "rb").read()
    except OSError:
        return dict(os.environ)
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def started_with_rank_environment() -> bool:
    """Whether this process was started with everything `rank_environment()` asks for."""
    initial = _initial_environment()
    return all(initial.get(k) == v for k, v in rank_environment().items())


def restart_with_rank_environment() -> None:
    """For a script that runs a rank in its own process (the benchmarks' in-process engines):
    starts it again, same interpreter and arguments, with `rank_environment()` when it was not
    started with it; returns where nothing is missing. Call it first, before any work."""
    if started_with_rank_environment() or os.environ.get(RESTARTED):
        return
    sys.stdout.flush(), sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, {**os.environ, **rank_environment(), RESTARTED: "1"})


def available_bytes() -> int | None:
    """This machine's memory available to new allocations without swapping (Linux's
    MemAvailable), or None where /proc/meminfo does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def huge_pages_asked() -> bool:
    """Whether this process was started with glibc asked for transparent huge pages."""
    return HUGE_PAGES in _initial_environment().get("GLIBC_TUNABLES", "").split(":")


def zeroed(nbytes: int) -> torch.Tensor:
    """`nbytes` of zeros (uint8) in a private anonymous mapping of their own: the kernel gives
    each page zero-filled on its first touch, so nothing is written now. Advised to huge pages
    where the process asked glibc for them (what glibc would do with a mapping it made). The
    tensor keeps the mapping alive."""
    mem = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge_pages_asked() and hasattr(mmap, "MADV_HUGEPAGE"):
        mem.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(mem, dtype=torch.uint8)[:nbytes]


class Populator:
    """Faults in the pages of `memory` (a tensor on memory from `zeroed`) ahead of their first
    use, so that no step pays for them; the content stays what it is (zeros, or what a step wrote
    meanwhile). `run()` does it on the calling thread; `start()` on a daemon thread at nice 19,
    in huge-page chunks with the GIL released (a ctypes call), so that it runs mostly on cores a
    rank's compute threads leave idle (beside a busy nice-0 thread the scheduler still gives it
    about 1.5 % of the core). `done` is set when every page is in,
    or at once where the kernel cannot (before Linux 5.14): pages then come in on first use."""

    def __init__(self, memory: torch.Tensor):
        self.memory = memory
        self.done = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run(self) -> bool:
        """True when every page is in (False: stopped, or the kernel cannot)."""
        try:
            madvise = ctypes.CDLL(None, use_errno=True).madvise
            madvise.argtypes, madvise.restype = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int
            start, end = self.memory.data_ptr(), self.memory.data_ptr() + self.memory.numel()
            start -= start % mmap.PAGESIZE
            for at in range(start, end, POPULATE_CHUNK):
                if self._stop.is_set():
                    return False
                if madvise(at, min(POPULATE_CHUNK, end - at), MADV_POPULATE_WRITE) != 0:
                    log.debug("tpserve: pages not populated ahead (madvise: %s)", os.strerror(ctypes.get_errno()))
                    return False
            return True
        except (OSError, AttributeError):  # no libc with madvise
            return False
        finally:
            self.done.set()

    def start(self) -> None:
        def low_priority_run():
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            except OSError:
                pass
            self.run()

        self._thread = threading.Thread(target=low_priority_run, name="tpserve-populate", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
