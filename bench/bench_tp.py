"""Does tensor parallelism pay on CPU? Decode-step time at TP = 1 and TP = 2, gloo vs shared memory.

    .venv/bin/python bench/bench_tp.py                 # default model and a ~1B random Llama
    .venv/bin/python bench/bench_tp.py --models default --iters 10

For each model and batch size (1 and 32 sequences, each with 128 tokens of context), one decode
step is timed in four set-ups: TP = 1 with one thread, TP = 1 with two threads, and TP = 2 with
one thread per rank over gloo and over the shared-memory communicator. Each rank is its own
process. "comm" is rank 0's wall time inside all-reduces and the logits gather per step (it
includes waiting for the slower rank), those that Python calls: where the decode stack runs the
step (`worker.model.DecodeStack`, shm only), the blocks' all-reduces happen inside it and "comm"
is the embedding's all-reduce and the gather. The last line is ``tp2_speedup_batch32: X.XX`` -- TP = 2
(shared memory) over TP = 1 (one thread) on the ~1B model at batch 32.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cluster.model_store import DEFAULT_MODEL, resolve_model  # noqa: E402
from sharding.arch import ModelConfig  # noqa: E402
from sharding.group import TPGroup, open_store  # noqa: E402
from sharding.loader import load_rank_weights  # noqa: E402
from sharding.plan import RankPlan, ShardingPlan, Split  # noqa: E402
from worker.model import Transformer  # noqa: E402
from worker.runner import ModelRunner  # noqa: E402
from worker.step import StepInput  # noqa: E402

# Llama-3.2-1B's shapes: 1.24 B parameters.
LLAMA_1B = dict(model_type="llama", vocab_size=128256, hidden_size=2048, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192,
                tie_word_embeddings=True, max_position_embeddings=2048, rope_theta=500000.0)
CONTEXT = 128
BLOCK = 16
SETUPS = [("TP=1, 1 thread", 1, 1, "gloo"), ("TP=1, 2 threads", 1, 2, "gloo"),
          ("TP=2 gloo, 1 thread/rank", 2, 1, "gloo"), ("TP=2 shm, 1 thread/rank", 2, 1, "shm")]


def random_weights(plan: RankPlan) -> dict:
    """Values do not matter for timing; shapes do. Norm weights are ones."""
    g = torch.Generator().manual_seed(plan.rank)
    out = {}
    for w in plan.weights:
        if w.tied_to is None:
            out[w.name] = (torch.ones(w.shape) if w.split is Split.REPLICATED and len(w.shape) == 1
                           else torch.randn(w.shape, generator=g) * 0.02)
    return out


def decode_step(batch: int, vocab: int) -> StepInput:
    per_seq = -(-CONTEXT // BLOCK)
    tables = torch.arange(batch * per_seq).view(batch, per_seq)
    pos = CONTEXT - 1
    return StepInput(
        input_ids=torch.randint(0, vocab, (batch,)),
        positions=torch.full((batch,), pos),
        slot_mapping=tables[:, pos // BLOCK] * BLOCK + pos % BLOCK,
        query_lens=torch.ones(batch, dtype=torch.int64),
        context_lens=torch.full((batch,), CONTEXT),
        block_tables=tables,
        logits_indices=torch.arange(batch),
        num_decodes=batch,
    )


def _rank(rank, tp, threads, backend, port, model, batches, iters, out, pin):
    torch.set_num_threads(threads)
    if pin and tp > 1:  # one core per rank, so two spinning ranks never share one
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[rank % len(cores)]})
    store = dist.TCPStore("127.0.0.1", port, tp, False, timeout=datetime.timedelta(seconds=120))
    group = TPGroup.connect(store, rank, tp, "cpu", backend=backend, timeout_s=120, tag="bench")
    cfg = ModelConfig.from_hf(LLAMA_1B) if model == "1b" else ModelConfig.from_dir(model)
    plan = ShardingPlan.build(cfg, tp).ranks[rank]
    weights = (random_weights(plan) if model == "1b"
               else load_rank_weights(model, plan, torch.float32, torch.device("cpu")))
    net = Transformer(cfg, plan, weights, group, max_positions=CONTEXT + 1)
    blocks = max(batches) * -(-CONTEXT // BLOCK)
    runner = ModelRunner(net, net.new_cache(blocks, BLOCK), group)
    if rank != 0:
        runner.follow()
        group.close()
        return
    for batch in batches:
        step = decode_step(batch, cfg.vocab_size)
        for _ in range(2):
            runner.run(step)
        times, comm = [], []
        for _ in range(iters):
            c0, t0 = group.comm_seconds, time.perf_counter()
            runner.run(step)
            times.append(time.perf_counter() - t0)
            comm.append(group.comm_seconds - c0)
        out.put((batch, statistics.median(times), statistics.median(comm)))
    runner.stop_peers()
    group.close()


def measure(model, tp, threads, backend, batches, iters, pin=False) -> dict:
    ctx = mp.get_context("spawn")
    store = open_store("127.0.0.1", 0, tp + 1, True, 120)
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, tp, threads, backend, store.port, model, batches, iters, out, pin))
             for r in range(tp)]
    for p in procs:
        p.start()
    results = {}
    for _ in batches:
        batch, step, comm = out.get(timeout=1800)
        results[batch] = (step, comm)
    for p in procs:
        p.join(timeout=60)
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="default,1b", help="comma list of: default, 1b, or a checkpoint dir")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--pin", action="store_true", help="pin each TP=2 rank to its own core")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    speedup = None
    for name in args.models.split(","):
        model = "1b" if name == "1b" else str(resolve_model(DEFAULT_MODEL if name == "default" else name))
        label = "Llama ~1.2B (random, hidden 2048, 16 layers)" if model == "1b" else f"{name} model"
        rows = {setup: measure(model, tp, threads, backend, batches, args.iters, args.pin)
                for setup, tp, threads, backend in SETUPS}
        print(f"\n{label}: decode step, {CONTEXT} tokens of context per sequence, median of {args.iters}")
        print(f"  {'':28s}" + "".join(f"{'batch ' + str(b):>24s}" for b in batches))
        for setup, res in rows.items():
            cells = "".join(f"{res[b][0] * 1e3:11.1f} ms (comm {res[b][1] * 1e3:5.2f})" for b in batches)
            print(f"  {setup:28s}{cells}")
        base = rows[SETUPS[0][0]]
        shm = rows[SETUPS[3][0]]
        for b in batches:
            share = shm[b][1] / shm[b][0] * 100
            print(f"  batch {b}: TP=2 shm is {base[b][0] / shm[b][0]:.2f}x TP=1 (1 thread), "
                  f"{rows[SETUPS[1][0]][b][0] / shm[b][0]:.2f}x TP=1 (2 threads); "
                  f"comm {share:.1f}% of the step")
        if model == "1b" and 32 in batches:
            speedup = base[32][0] / shm[32][0]
    if speedup is not None:
        print(f"tp2_speedup_batch32: {speedup:.2f}")


if __name__ == "__main__":
    main()
