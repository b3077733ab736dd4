"""Micro-benchmark: all-reduce latency of gloo vs the shared-memory communicator.

Starts N local processes (default 2), each with torch.set_num_threads(1), builds a gloo
process group and a ShmCommunicator over the same TCPStore, and times all-reduces (float32;
`--dtype bfloat16` as a bfloat16 model's ranks send them) of several sizes on every rank: gloo,
the communicator's Python steps, and its native ones (tpkernels/csrc/shm_all_reduce.cpp, where
the native kernels build). Rank 0 prints the median
and p99 per size and way, then a summary line (shm: the way a serving rank takes):

    allreduce_4KiB_median_us: shm=X gloo=Y ratio=Z

Usage: python bench/bench_collectives.py [--world 2] [--capacity 1048576] [--pin] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from sharding.shm import ShmCommunicator  # noqa: E402

SIZES = [64, 1024, 4096, 64 * 1024, 1 << 20, 4 << 20]  # bytes
ITER_BUDGET_BYTES = 400 << 20  # fewer iterations for big messages


def _iters(nbytes: int, cap: int) -> int:
    return max(30, min(cap, ITER_BUDGET_BYTES // nbytes))


def _time_op(op, n: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        op()
    out = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        op()
        out.append((clock() - t0) / 1e3)
    return out


def _summary(times: list[float]) -> tuple[float, float]:
    times = sorted(times)
    return statistics.median(times), times[min(len(times) - 1, int(0.99 * len(times)))]


def _rank_main(rank: int, world: int, port: int, capacity: int, pin: bool, dtype: str, results) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world + 1, False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=dist.PrefixStore("gloo", store),
                            rank=rank, world_size=world)
    comm = ShmCommunicator.create(store, rank, world, capacity_bytes=capacity,
                                  timeout_s=60, tag="bench")
    if pin:
        # Only this (the main) thread: gloo's I/O threads, already started, stay unpinned.
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[rank % len(cpus)]})
    from tpkernels import native

    ways = [("gloo", lambda: dist.all_reduce(t), 1500, None), ("shm python", lambda: comm.all_reduce(t), 5000, False)]
    if native.available():
        ways.append(("shm native", lambda: comm.all_reduce(t), 5000, True))
    rows = []
    for nbytes in SIZES:
        dt = getattr(torch, dtype)
        t = torch.zeros(nbytes // dt.itemsize, dtype=dt)
        row = {"bytes": nbytes}
        for name, op, cap, use_native in ways:
            comm.native_all_reduce = bool(use_native)
            comm.barrier()
            n = _iters(nbytes, cap)
            row[name] = _summary(_time_op(op, n, warmup=max(10, n // 20)))
        rows.append(row)
    comm.close()
    dist.destroy_process_group()
    if rank == 0:
        results.put(rows)


def _fmt_size(n: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n // scale} {unit}"
    return f"{n} B"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--capacity", type=int, default=1 << 20, help="shm bytes per slot")
    ap.add_argument("--pin", action="store_true",
                    help="pin each rank's main thread to its own CPU")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = ap.parse_args()
    if not ShmCommunicator.supported():
        sys.exit("shared-memory collectives are not supported on this machine")

    master = dist.TCPStore("127.0.0.1", 0, args.world + 1, True,
                           timeout=timedelta(seconds=60), wait_for_workers=False)
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_rank_main, nprocs=args.world, start_method="spawn",
                       args=(args.world, master.port, args.capacity, args.pin, args.dtype, results))
    rows = results.get()

    print(f"# all-reduce {args.dtype}, {args.world} local processes, {os.cpu_count()} CPUs, "
          f"loadavg {os.getloadavg()[0]:.2f}, pin={args.pin}, shm capacity {args.capacity} B")
    ways = [w for w in ("gloo", "shm python", "shm native") if w in rows[0]]
    serving = ways[-1]  # native where it built
    print("    size | " + " | ".join(f"{w + ' med':>15} {'p99':>8}" for w in ways)
          + f" | gloo/{serving}   (microseconds)")
    for row in rows:
        print(f"{_fmt_size(row['bytes']):>8} | " + " | ".join(f"{row[w][0]:15.1f} {row[w][1]:8.1f}" for w in ways)
              + f" | {row['gloo'][0] / row[serving][0]:8.1f}")
    four_k = next(r for r in rows if r["bytes"] == 4096)
    s, g = four_k[serving][0], four_k["gloo"][0]
    extra = f" python={four_k['shm python'][0]:.1f}" if serving != "shm python" else ""
    print(f"allreduce_4KiB_median_us: shm={s:.1f} gloo={g:.1f} ratio={g / s:.1f}{extra}")


if __name__ == "__main__":
    main()
