"""worker.host_memory: an engine that frees a step's activations gets that memory back from the
allocator without page faults; a process started with `rank_environment()` gets its memory on
huge pages; TPSERVE_MALLOC=system leaves glibc alone."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from worker import host_memory

ROOT = Path(__file__).resolve().parents[1]
GLIBC_LINUX = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                 reason="glibc only")

# Prefills of fresh prompts and a few decodes on the default model; page faults of a second batch.
CHILD = textwrap.dedent("""
    import random, resource, sys
    sys.path[:0] = [{root!r}, {tests!r}]
    from cluster.model_store import DEFAULT_MODEL, resolve_model
    from engine_util import greedy, make_engine, run
    from worker import host_memory
    from worker.engine import Request

    engine = make_engine(str(resolve_model(DEFAULT_MODEL)))

    def batch(tag):  # unlike prompts each time: the prefix cache must not skip their prefills
        rng = random.Random(tag)
        run(engine, [Request(f"{{tag}}{{i}}", [rng.randrange(100, 40000) for _ in range(rng.randrange(64, 600))],
                             greedy(rng.randrange(4, 24), ignore_eos=True)) for i in range(16)])

    batch("warm-up")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    batch("measured")
    print(host_memory.keep_freed_memory(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _page_faults(choice: str) -> tuple[bool, int]:
    code = CHILD.format(root=str(ROOT), tests=str(ROOT / "tests"))
    # Every product on oneDNN, as on a CPU without AVX-512: each oneDNN call allocates buffers of
    # its own, and those are what glibc's defaults hand back and fault in again. Where our own
    # kernel runs the decode steps' products it allocates nothing, and this workload faulted ~80
    # times either way on a Zen 5 machine.
    env = {**os.environ, "TPSERVE_MALLOC": choice, "TPSERVE_GEMM": "onednn"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    kept, faults = out.stdout.split()[-2:]
    return kept == "True", int(faults)


@GLIBC_LINUX
def test_an_engines_steps_reuse_freed_memory_without_page_faults(smollm2_dir):
    kept, faults_kept = _page_faults("keep")
    untouched, faults_system = _page_faults("system")
    assert kept and not untouched
    # glibc's defaults unmap and trim what each step frees, so steps fault their pages in afresh:
    # 32,000-384,000 faults for this batch over eight runs on a Zen 5 machine (how much glibc trims
    # depends on which thread frees what, when)
    assert faults_system > 10_000
    assert faults_kept < faults_system / 50, (faults_kept, faults_system)


def test_a_bad_choice_names_the_variable(monkeypatch):
    monkeypatch.setenv("TPSERVE_MALLOC", "tcmalloc")
    with pytest.raises(ValueError, match="TPSERVE_MALLOC must be one of"):
        host_memory.choice()



def _thp_mode() -> str | None:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")]


@GLIBC_LINUX
def test_rank_environment_adds_huge_pages_to_the_operators_tunables(monkeypatch):
    monkeypatch.delenv("TPSERVE_MALLOC", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert host_memory.rank_environment() == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert host_memory.rank_environment() == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")  # the operator's own choice stands
    assert host_memory.rank_environment() == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    monkeypatch.setenv("TPSERVE_MALLOC", "system")
    assert host_memory.rank_environment() == {}


HUGE_CHILD = textwrap.dedent("""
    import sys
    sys.path[:0] = [{root!r}]
    import torch
    from worker import host_memory
    x = torch.ones(256 << 20, dtype=torch.uint8)  # 256 MB, written
    huge = next(int(line.split()[1]) for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages"))
    print(host_memory.started_with_rank_environment(), huge, " ".join(sys.argv[1:]))
""")


def _huge_child(env: dict, *argv: str, restart: bool = False) -> tuple[bool, int, str]:
    code = HUGE_CHILD.format(root=str(ROOT))
    if restart:
        code = code.replace("import torch\n", "import torch\nfrom worker import host_memory\n"
                            "host_memory.restart_with_rank_environment()\n", 1)
    base = {k: v for k, v in os.environ.items()
            if k not in ("GLIBC_TUNABLES", "TPSERVE_MALLOC", host_memory.RESTARTED)}
    out = subprocess.run([sys.executable, "-c", code, *argv], env={**base, **env}, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    started, huge, args = (out.stdout.strip().split(" ", 2) + [""])[:3]
    return started == "True", int(huge), args


@GLIBC_LINUX
@pytest.mark.skipif(_thp_mode() != "madvise", reason="transparent huge pages only where asked for (madvise)")
def test_a_process_started_with_the_rank_environment_gets_huge_pages(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("TPSERVE_MALLOC", raising=False)
    env = host_memory.rank_environment()
    started, huge_kb, _ = _huge_child(env)
    assert started and huge_kb >= 128 << 10, huge_kb  # at least half of the 256 MB on 2 MB pages
    started, huge_kb, _ = _huge_child({})
    assert not started and huge_kb < 8 << 10, huge_kb
    # a script that asks to be restarted with it gets it, and keeps its arguments
    started, huge_kb, args = _huge_child({}, "--flag", "two words", restart=True)
    assert started and huge_kb >= 128 << 10 and args == "--flag two words"
    # TPSERVE_MALLOC=system: nothing asked, nothing restarted
    started, huge_kb, _ = _huge_child({"TPSERVE_MALLOC": "system"}, restart=True)
    assert started and huge_kb < 8 << 10  # started with everything asked of it: nothing


# -- the KV cache's own mapping ------------------------------------------------------------------
LINUX = pytest.mark.skipif(platform.system() != "Linux", reason="Linux only (mincore, MADV_POPULATE_WRITE)")


def _resident(t) -> tuple[int, int]:
    """(pages of `t` in memory, pages of `t`), by mincore(2); reads nothing."""
    import ctypes
    import mmap

    nbytes = t.numel() * t.element_size()
    pages = -(-nbytes // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    mincore = ctypes.CDLL(None, use_errno=True).mincore
    mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    assert mincore(t.data_ptr(), nbytes, vec) == 0, os.strerror(ctypes.get_errno())
    return sum(b & 1 for b in vec), pages


def _cache(num_blocks: int = 63):
    import torch

    from worker.kv_cache import KVCache

    # 2 layers x K, V x 2 heads x 64 blocks x 128 tokens x 64 dims x 4 bytes = 16 MiB
    return KVCache(2, 2, 64, num_blocks, 128, torch.float32, torch.device("cpu"))


@LINUX
def test_a_host_kv_cache_holds_no_memory_until_written_or_populated():
    import torch

    cache = _cache()
    memory = cache.populator.memory
    resident, pages = _resident(memory)
    assert pages == 16 << 20 >> 12 and resident == 0, resident  # allocated, nothing written
    slots = torch.tensor([5, 130, 8000])
    k, v = torch.randn(3, 2, 64), torch.randn(3, 2, 64)
    cache.layers[1].write(slots, k, v)
    written, _ = _resident(memory)
    assert 0 < written <= pages // 4, written  # the pages (huge or small) of six rows
    if not cache.populator.run():
        pytest.skip("this kernel cannot populate ahead (MADV_POPULATE_WRITE, Linux 5.14)")
    assert _resident(memory) == (pages, pages) and cache.populator.done.is_set()
    # populating faulted the pages in and changed nothing in them
    layer = cache.layers[1]
    assert torch.equal(layer.k.view(2, -1, 64)[:, slots], k.transpose(0, 1))
    assert torch.equal(layer.v.view(2, -1, 64)[:, slots], v.transpose(0, 1))
    assert memory.view(torch.float32).count_nonzero() == k.count_nonzero() + v.count_nonzero()  # the rest: 0


@LINUX
def test_kv_cache_population_choices():
    on_use, ahead, background = _cache(), _cache(), _cache()
    on_use.populate("on_use")
    ahead.populate("before_ready")
    background.populate("background")
    assert background.populator.done.wait(60)
    assert _resident(on_use.populator.memory)[0] == 0
    for cache in (ahead, background):
        resident, pages = _resident(cache.populator.memory)
        assert resident == pages
    with pytest.raises(ValueError, match="populate: one of"):
        on_use.populate("eager")
    background.close()  # ended already: returns at once


ZEROED_CHILD = textwrap.dedent("""
    import sys
    sys.path[:0] = [{root!r}]
    from worker import host_memory

    def huge_kb():
        return next(int(line.split()[1]) for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages"))

    before = huge_kb()
    populator = host_memory.Populator(host_memory.zeroed(256 << 20))
    print(populator.run(), huge_kb() - before)
""")


@GLIBC_LINUX
@pytest.mark.skipif(_thp_mode() != "madvise", reason="transparent huge pages only where asked for (madvise)")
def test_the_kv_cache_mapping_is_on_huge_pages_where_the_rank_environment_asks(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("TPSERVE_MALLOC", raising=False)
    for env, huge in ((host_memory.rank_environment(), True), ({}, False)):
        base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        out = subprocess.run([sys.executable, "-c", ZEROED_CHILD.format(root=str(ROOT))], env={**base, **env},
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        populated, huge_kb = out.stdout.split()
        if populated != "True":
            pytest.skip("this kernel cannot populate ahead (MADV_POPULATE_WRITE, Linux 5.14)")
        assert (int(huge_kb) >= 128 << 10) == huge, (env, huge_kb)  # half of 256 MB on 2 MB pages
