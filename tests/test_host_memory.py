"""worker.host_memory: an engine that frees a step's activations gets that memory back from the
allocator without page faults, and TPSERVE_MALLOC=system leaves glibc alone."""

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
    env = {**os.environ, "TPSERVE_MALLOC": choice}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    kept, faults = out.stdout.split()[-2:]
    return kept == "True", int(faults)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_an_engines_steps_reuse_freed_memory_without_page_faults(smollm2_dir):
    kept, faults_kept = _page_faults("keep")
    untouched, faults_system = _page_faults("system")
    assert kept and not untouched
    # glibc's defaults unmap and trim what each step frees: every step faults its pages in afresh
    # (~1.5 million faults for these prefills on a Zen 5 machine)
    assert faults_system > 50_000
    assert faults_kept < faults_system / 50, (faults_kept, faults_system)


def test_a_bad_choice_names_the_variable(monkeypatch):
    monkeypatch.setenv("TPSERVE_MALLOC", "tcmalloc")
    with pytest.raises(ValueError, match="TPSERVE_MALLOC must be one of"):
        host_memory.choice()
