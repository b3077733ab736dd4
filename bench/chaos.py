"""Chaos: kill ranks under load and check that no request is lost and no output changes.

    .venv/bin/python bench/chaos.py                      # 2 replicas of TP 1, 3 minutes, a kill every 20 s
    .venv/bin/python bench/chaos.py --tp 2 --minutes 5

Serves the default model in this process (2 replicas on an embedded Ray, gloo, 127.0.0.1) and
keeps `--streams` (16) concurrent streaming requests going through gRPC: a fixed pool of prompts,
half greedy, half seeded sampling, each with a different length. First every request of the pool
runs once undisturbed: those outputs are the reference. Then, for `--minutes`, the same requests
run again round the pool while a rank chosen at random (any replica, any rank) is killed with
SIGKILL every `--kill-every` seconds (skipped while a replica is still being rebuilt, so that one
stays up). Each stream's longest pause between two deltas is recorded.

Prints the requests completed, the requests that failed (goal 0), the outputs that differ from
their reference (goal 0), p50/p99 of each stream's longest pause, the failovers and every rebuild
time; exits 1 when a request failed or an output differed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from cluster.client import AsyncClient, TPServeError  # noqa: E402
from cluster.config import DeploymentConfig  # noqa: E402
from cluster.model_store import DEFAULT_MODEL, resolve_model  # noqa: E402
from server_util import ServerThread  # noqa: E402

TOPICS = ["a lighthouse", "the ocean", "a small robot", "winter", "a market", "a train journey", "bees",
          "the moon", "a library", "an old clock", "rain in the city", "a mountain village"]


def pool(size: int, seed: int) -> list[dict]:
    """The requests: prompt and sampling, half greedy, half seeded, lengths 32-96 tokens."""
    rng = random.Random(seed)
    reqs = []
    for i in range(size):
        sampling = dict(temperature=0.0) if i % 2 == 0 else dict(temperature=0.8, top_p=0.95, seed=1000 + i)
        reqs.append(dict(prompt=f"Write a short story about {TOPICS[i % len(TOPICS)]} (version {i}):",
                         max_tokens=rng.randint(32, 96), ignore_eos=True, **sampling))
    return reqs


async def stream_one(client: AsyncClient, req: dict) -> tuple[list[int], float]:
    """Tokens of one streamed request and its longest pause between deltas (from admission)."""
    stream = client.stream(**req)
    await stream.start()
    tokens, last, longest = [], time.monotonic(), 0.0
    async for delta in stream:
        now = time.monotonic()
        longest, last = max(longest, now - last), now
        tokens += delta.token_ids
    return tokens, longest


class Killer(threading.Thread):
    """Every `every` seconds, SIGKILL a random rank of a healthy replica (none while one rebuilds)."""

    def __init__(self, server, every: float, seed: int):
        super().__init__(daemon=True, name="chaos-killer")
        self.server, self.every, self.rng = server, every, random.Random(seed)
        self.stopping = threading.Event()
        self.kills: list[tuple[float, int, int]] = []  # (time, replica, rank)
        self.rebuilds: list[float] = []  # seconds from a kill to the replica serving again
        self.skipped = 0

    def run(self):
        controller = self.server.server.controller
        while not self.stopping.wait(self.every):
            replicas = list(controller.replicas)
            if not all(r.healthy for r in replicas):
                self.skipped += 1
                continue
            victim = self.rng.choice(replicas)
            rank = self.rng.randrange(len(victim.nodes))
            killed_at = time.monotonic()
            os.kill(victim.nodes[rank]["pid"], signal.SIGKILL)
            self.kills.append((killed_at, victim.replica_id, rank))
            print(f"  kill: replica {victim.replica_id} rank {rank}", flush=True)
            while not self.stopping.is_set():  # until the rebuilt replica serves again
                now = controller.replicas[victim.replica_id]
                if now is not victim and now.healthy and self._routable(victim.replica_id):
                    self.rebuilds.append(time.monotonic() - killed_at)
                    print(f"  rebuilt: replica {victim.replica_id} in {self.rebuilds[-1]:.1f} s", flush=True)
                    break
                time.sleep(0.1)

    def _routable(self, replica_id: int) -> bool:
        return any(s.replica_id == replica_id and s.healthy for s in self.server.server.router.replica_states())


async def drive(address: str, reqs: list[dict], streams: int, until: float | None):
    """`streams` workers take requests round the pool (once through, or until `until`)."""
    results: list[tuple[int, list[int] | TPServeError, float]] = []
    order = iter(range(10**9)) if until else iter(range(len(reqs)))

    async with AsyncClient(address, timeout=600) as client:
        async def worker():
            for n in order:
                if until and time.monotonic() > until:
                    return
                i = n % len(reqs)
                try:
                    tokens, pause = await stream_one(client, reqs[i])
                    results.append((i, tokens, pause))
                except TPServeError as err:
                    results.append((i, err, 0.0))

        await asyncio.gather(*(worker() for _ in range(streams)))
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--pool", type=int, default=32)
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--kill-every", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    cfg = DeploymentConfig.for_model(
        str(resolve_model(DEFAULT_MODEL)), replicas=2, tensor_parallel_size=args.tp, type="cpu", backend="gloo",
        max_batch_size=16, max_tokens_per_step=256, max_model_len=512, kv_cache_tokens=8192,
        host="127.0.0.1", port=0, rebuild_failed_replicas=True,
        num_cpus=max(2 * args.tp, os.cpu_count() or 1))  # Ray CPUs: every rank gets one, cores or not
    reqs = pool(args.pool, args.seed)
    with ServerThread(cfg) as server:
        print(f"reference: {len(reqs)} requests, undisturbed", flush=True)
        reference = {i: tokens for i, tokens, _ in asyncio.run(drive(server.address, reqs, args.streams, None))
                     if not isinstance(tokens, TPServeError)}
        if len(reference) != len(reqs):
            print("the undisturbed run itself failed requests; not a chaos result")
            return 1
        print(f"chaos: {args.minutes:g} min, {args.streams} streams, a rank killed every {args.kill_every:g} s",
              flush=True)
        killer = Killer(server, args.kill_every, args.seed)
        killer.start()
        started = time.monotonic()
        results = asyncio.run(drive(server.address, reqs, args.streams, started + args.minutes * 60))
        killer.stopping.set()
        killer.join(5)
        failovers = sum(server.server.metrics.registry.get_sample_value(
            "tpserve_request_failovers_total", {"replica": str(r)}) or 0 for r in range(2))

    failed = [(i, r) for i, r, _ in results if isinstance(r, TPServeError)]
    done = [(i, r, p) for i, r, p in results if not isinstance(r, TPServeError)]
    differ = [i for i, r, _ in done if r != reference[i]]
    pauses = sorted(p for _, _, p in done)
    p99 = pauses[min(len(pauses) - 1, int(0.99 * len(pauses)))] if pauses else float("nan")
    print(f"\n{'requests completed':32s} {len(done)}")
    print(f"{'requests failed':32s} {len(failed)}  (goal 0)")
    for i, err in failed[:5]:
        print(f"    request {i}: {err.code.name}: {err.message[:160]}")
    print(f"{'outputs differing from reference':32s} {len(differ)}  (goal 0)")
    print(f"{'longest pause in a stream':32s} p50 {statistics.median(pauses):.2f} s, p99 {p99:.2f} s, "
          f"max {pauses[-1]:.2f} s" if pauses else "")
    print(f"{'kills':32s} {len(killer.kills)} (skipped {killer.skipped} while a replica was rebuilding)")
    print(f"{'requests failed over':32s} {failovers:.0f}")
    print(f"{'rebuild times':32s} " + ", ".join(f"{t:.1f} s" for t in killer.rebuilds))
    return 1 if failed or differ else 0


if __name__ == "__main__":
    sys.exit(main())
