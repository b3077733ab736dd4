"""The served path against the in-process engine, on the same workload and the same cores.

    .venv/bin/python bench/bench_served.py                 # the default model, TP = 1 on 2 cores
    .venv/bin/python bench/bench_served.py --requests 16 --max-output 64
    .venv/bin/python bench/bench_served.py --tp 2         # `make serve`'s layout: a rank per core

Runs bench/bench_engine.py's workload (64 requests, prompts 16-512, outputs 16-256 tokens, greedy,
EOS ignored) three ways, alternately, `--repeats` times:

  engine   the engine stepped in this process (bench_engine's own figure); with --tp 2, rank 0's
           engine in a child process and rank 1 in another, a core each, over shared memory, as
           bench/bench_vs_vllm.py runs them
  offline  cluster.offline.LLM: the same engine inside a Ray actor, requests and outputs over Ray
  grpc     `tpserve serve` in a process of its own, all requests at once from an asyncio client

then the engine once more, and prints each way's throughput (best of the repeats) and two ratios
to the engine's: best over best, and paired -- each served run over the mean of the two engine runs
just before and after it, the median of those. Our VMs' speed drifts by a fifth within minutes, so
runs far apart in time do not compare, and a way whose best run fell in a fast spell looks better
than it is; the paired ratio compares only neighbours. Last, `served_vs_engine_<way>: <paired
ratio>` (the goal is at least 0.95 for both).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402

from bench_engine import make_engine, run_ours, workload  # noqa: E402
from worker import host_memory  # noqa: E402

CONFIG = """
model: {{path: {model}}}
parallel: {{tensor_parallel_size: {tp}}}
device: {{type: cpu, cpus_per_rank: {cores}}}
engine: {{max_model_len: 2048, kv_cache_tokens: 65536, max_batch_size: 64, max_tokens_per_step: 512,
          kv_cache_populate: before_ready}}
server: {{host: 127.0.0.1, port: 0, max_queued_requests: 1024}}
"""


def engine_way(path, reqs, args) -> float:
    if args.tp > 1:
        return tp_engine_way(path, reqs, args)
    torch.set_num_threads(args.cores)
    engine = make_engine(path, kv_tokens=65536, max_batch=64, step_tokens=512)
    run_ours(engine, reqs[:2])  # warm-up
    return run_ours(engine, reqs)["throughput"]


def tp_engine_way(path, reqs, args) -> float:
    """The ranks in processes of their own, no Ray: bench_vs_vllm's in-process tensor parallelism."""
    import bench_vs_vllm

    job = {"model": str(path), "dtype": "float32", "cores": f"tp{args.tp}",
           "warmup": [[list(p), n] for p, n in reqs[:2]], "workloads": {"mixed": [[list(p), n] for p, n in reqs]}}
    done = bench_vs_vllm._tp2(job)["workloads"]["mixed"]
    assert sum(done["count"].values()) == sum(n for _, n in reqs)
    return sum(done["count"].values()) / done["wall_s"]


def offline_way(model, reqs, args) -> float:
    from cluster.config import DeploymentConfig
    from cluster.offline import LLM
    from worker.sampling import SamplingParams

    cfg = DeploymentConfig.for_model(model, tensor_parallel_size=args.tp, type="cpu",
                                     cpus_per_rank=args.cores // args.tp, max_model_len=2048, kv_cache_tokens=65536,
                                     max_batch_size=64, max_tokens_per_step=512, kv_cache_populate="before_ready")
    llm = LLM(cfg)
    try:
        params = lambda n: SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)  # noqa: E731
        llm.generate([p for p, _ in reqs[:2]], [params(n) for _, n in reqs[:2]])  # warm-up
        t0 = time.perf_counter()
        outs = llm.generate([p for p, _ in reqs], [params(n) for _, n in reqs])
        wall = time.perf_counter() - t0
    finally:
        llm.shutdown()
    assert sum(len(o.token_ids) for o in outs) == sum(n for _, n in reqs)
    return sum(n for _, n in reqs) / wall


def grpc_way(model, reqs, args) -> float:
    from cluster.client import AsyncClient

    with tempfile.TemporaryDirectory(prefix="tpserve-served-") as tmp:
        cfg = Path(tmp) / "served.yaml"
        cfg.write_text(CONFIG.format(model=model, tp=args.tp, cores=args.cores // args.tp))
        proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", str(cfg)], cwd=ROOT,
                                stderr=subprocess.PIPE, text=True)
        try:
            address = next(m.group(1) for line in proc.stderr
                           if (m := re.search(r"serving .* on (\S+) ", line)))

            async def run(batch):
                async with AsyncClient(address, timeout=3600) as client:
                    results = await asyncio.gather(*(client.generate(token_ids=p, max_tokens=n, temperature=0.0,
                                                                     ignore_eos=True) for p, n in batch))
                return sum(r.completion_tokens for r in results)

            asyncio.run(run(reqs[:2]))  # warm-up
            t0 = time.perf_counter()
            made = asyncio.run(run(reqs))
            wall = time.perf_counter() - t0
        finally:
            proc.send_signal(2)
            proc.wait(60)
    assert made == sum(n for _, n in reqs)
    return made / wall


def main() -> int:
    from cluster.model_store import resolve_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-output", type=int, default=256)
    ap.add_argument("--cores", type=int, default=2, help="cores for the model: its ranks' threads and Ray CPUs")
    ap.add_argument("--tp", type=int, default=1, choices=[1, 2], help="tensor-parallel size (2: a core a rank)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.tp == 2 and args.cores != 2:
        ap.error("--tp 2 runs a rank on each of 2 cores (--cores 2)")
    host_memory.restart_with_rank_environment()  # the in-process engine starts as a served rank does
    path = resolve_model(args.model)
    vocab = __import__("json").loads((Path(path) / "config.json").read_text())["vocab_size"]
    reqs = workload(args.requests, vocab, 0, args.max_output)
    ways = {"engine": lambda: engine_way(path, reqs, args), "offline": lambda: offline_way(args.model, reqs, args),
            "grpc": lambda: grpc_way(args.model, reqs, args)}
    runs = {name: [] for name in ways}

    def measure(i: int, name: str) -> None:
        runs[name].append(ways[name]())
        print(f"run {i + 1}: {name:8s} {runs[name][-1]:7.1f} tok/s", flush=True)

    for i in range(args.repeats):
        for name in ways:
            measure(i, name)
    measure(args.repeats, "engine")  # once more, after the last served runs: each has one on both sides
    engine = runs["engine"]

    def paired(name: str) -> float:
        return statistics.median(r / ((engine[i] + engine[i + 1]) / 2) for i, r in enumerate(runs[name]))

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"\n{len(reqs)} requests, {sum(n for _, n in reqs)} output tokens, TP = {args.tp} on {args.cores} cores, "
          f"{cpu}")
    print(f"{'way':10s} {'best tok/s':>10s} {'best/best':>10s} {'paired':>8s}")
    for name, tok_s in runs.items():
        print(f"{name:10s} {max(tok_s):10.1f} {max(tok_s) / max(engine):10.2f} "
              f"{paired(name) if name != 'engine' else 1.0:8.2f}")
    for name in ("offline", "grpc"):
        print(f"served_vs_engine_{name}: {paired(name):.2f}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
