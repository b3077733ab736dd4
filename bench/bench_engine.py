"""Engine throughput and latency against transformers' generate(), on one fixed workload.

    .venv/bin/python bench/bench_engine.py              # the default model, TP = 1, in process
    .venv/bin/python bench/bench_engine.py --requests 16 --max-output 64   # a quicker look

Workload (seeded): N requests, prompts of 16-512 random tokens, outputs of 16-256 tokens, all
arriving at once, greedy, EOS ignored so every request produces exactly its length. The same
requests run through our engine (continuous batching) and through transformers' generate() in
static batches of 16 (left-padded; a batch runs until its longest request is done). Prints
throughput, time to first token and time per output token (p50/p99) for both, then the batch-1
decode step against the memory-bandwidth floor, the share of each step spent outside the forward
pass, and last the line ``throughput_ratio_vs_transformers: X.XX``.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cluster.config import DEFAULT_BLOCK_SIZE  # noqa: E402
from sharding.arch import ModelConfig  # noqa: E402
from sharding.group import TPGroup  # noqa: E402
from sharding.plan import ShardingPlan  # noqa: E402
from worker import host_memory  # noqa: E402
from worker.engine import Engine, Request  # noqa: E402
from worker.runner import ModelRunner  # noqa: E402
from worker.sampling import SamplingParams  # noqa: E402

HF_BATCH = 16


def workload(n: int, vocab: int, seed: int, max_output: int):
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        prompt = [rng.randrange(100, vocab) for _ in range(rng.randint(16, 512))]
        reqs.append((prompt, rng.randint(16, max_output)))
    return reqs


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


def memory_bandwidth(x: torch.Tensor | None = None) -> float:
    """Bytes/s reading a 1 GiB tensor (best of 5), the floor's denominator; `x`: the tensor to read,
    else a fresh one."""
    x = torch.ones(1 << 28) if x is None else x
    x.sum()
    best = min(_timed(x.sum) for _ in range(5))
    return x.numel() * x.element_size() / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# -- ours -------------------------------------------------------------------------------------
def make_engine(path, *, kv_tokens: int = 65536, max_batch: int = 64, step_tokens: int = 512,
                dtype: str = "float32", device: str = "cpu", cuda_graphs: bool = False,
                block_size: int | None = None) -> Engine:
    """One rank's engine over the checkpoint at `path`, with no tokenizer (token ids in and out).
    `cuda_graphs`: decode steps of up to `max_batch` sequences replay CUDA graphs. `block_size`:
    None for a served replica's default on this device."""
    cfg = ModelConfig.from_dir(path)
    plan = ShardingPlan.build(cfg, 1)
    block_size = block_size or DEFAULT_BLOCK_SIZE[device]
    blocks = -(-kv_tokens // block_size)
    runner, _ = ModelRunner.load(path, cfg, plan.ranks[0], TPGroup.single(device), dtype=dtype,
                                 num_blocks=blocks, block_size=block_size, max_positions=2048,
                                 cuda_graphs_up_to=max_batch if cuda_graphs else 0)
    return Engine(runner, tokenizer=None, eos_token_ids=cfg.eos_token_ids, vocab_size=cfg.vocab_size,
                  max_batch_size=max_batch, max_tokens_per_step=step_tokens,
                  max_model_len=2048, num_blocks=blocks)


def run_ours(engine: Engine, reqs):
    first, last, count = {}, {}, {}
    t0 = time.perf_counter()
    for i, (prompt, n) in enumerate(reqs):
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        engine.add_request(Request(str(i), prompt, params))
    while engine.has_work:
        outs = engine.step()
        now = time.perf_counter() - t0
        for o in outs:
            if o.token_ids:
                first.setdefault(o.request_id, now)
                last[o.request_id] = now
                count[o.request_id] = count.get(o.request_id, 0) + len(o.token_ids)
    wall = time.perf_counter() - t0
    return _summary(reqs, first, last, count, wall)


def b1_against_floor(engine: Engine, weight_bytes: int, rounds: int = 5, steps: int = 24) -> tuple[float, float, float]:
    """The batch-1 decode step against the memory-bandwidth floor. The VMs' bandwidth drifts (on
    the Zen 5 VM between 42 and 83 GB/s from hour to hour, and within a minute), so a step time and
    a bandwidth read minutes apart compare by chance: each round times a batch-1 stream (its median
    step) and reads the bandwidth right after, and the ratio is that step over that round's floor.
    Returns the medians over the rounds of (step seconds, bytes/s, ratio)."""
    x = torch.ones(1 << 28)
    rounds_ = []
    for _ in range(rounds):
        step = decode_step_b1(engine, steps)
        bandwidth = memory_bandwidth(x)
        rounds_.append((step, bandwidth, step * bandwidth / weight_bytes))
    return tuple(statistics.median(r[i] for r in rounds_) for i in range(3))


def decode_step_b1(engine: Engine, steps: int = 48) -> float:
    """Median engine step time of a single sequence in its decode phase."""
    engine.add_request(Request("b1", list(range(100, 132)), SamplingParams(max_tokens=steps, temperature=0.0,
                                                                           ignore_eos=True)))
    engine.step()  # prefill
    times = []
    while engine.has_work:
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# -- transformers ---------------------------------------------------------------------------
class _StepClock:
    """A generate() streamer that timestamps every step (the first put() is the prompt)."""

    def __init__(self, t0):
        self.t0, self.times = t0, []

    def put(self, value):
        self.times.append(time.perf_counter() - self.t0)

    def end(self):
        pass


def run_transformers(path, reqs, device: str = "cpu", dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    pad = 0
    first, last, count = {}, {}, {}
    t0 = time.perf_counter()
    for b in range(0, len(reqs), HF_BATCH):
        batch = reqs[b:b + HF_BATCH]
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch], device=device)
        steps = max(n for _, n in batch)
        clock = _StepClock(t0)
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                           do_sample=False, pad_token_id=pad, streamer=clock)
        token_times = clock.times[1:]  # [0] is the prompt itself
        for j, (_, n) in enumerate(batch):
            rid = str(b + j)
            first[rid], last[rid], count[rid] = token_times[0], token_times[n - 1], n
    wall = time.perf_counter() - t0
    return _summary(reqs, first, last, count, wall)


def _summary(reqs, first, last, count, wall):
    useful = sum(n for _, n in reqs)
    assert sum(count.values()) == useful, "every request produced exactly its length"
    tpot = [(last[r] - first[r]) / (count[r] - 1) for r in first if count[r] > 1]
    return {
        "throughput": useful / wall,
        "wall": wall,
        "ttft_p50": pct(first.values(), 50), "ttft_p99": pct(first.values(), 99),
        "tpot_p50": pct(tpot, 50), "tpot_p99": pct(tpot, 99),
    }


def main():
    from cluster.model_store import DEFAULT_MODEL, resolve_model  # the default model's GGUF reader

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-output", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--step-tokens", type=int, default=512)
    ap.add_argument("--kv-tokens", type=int, default=65536)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args()
    host_memory.restart_with_rank_environment()  # the in-process engine starts as a served rank does
    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    cfg = ModelConfig.from_dir(path)
    reqs = workload(args.requests, cfg.vocab_size, args.seed, args.max_output)
    print(f"workload: {len(reqs)} requests, prompts {min(len(p) for p, _ in reqs)}-"
          f"{max(len(p) for p, _ in reqs)} tokens, outputs {min(n for _, n in reqs)}-"
          f"{max(n for _, n in reqs)} tokens ({sum(n for _, n in reqs)} in all), {args.threads} threads")

    engine = make_engine(path, kv_tokens=args.kv_tokens, max_batch=args.max_batch, step_tokens=args.step_tokens,
                         dtype=args.dtype)
    decode_step_b1(engine, 4)  # warm-up
    ours = run_ours(engine, reqs)
    t = engine.timings.as_dict()
    step_total = t["schedule"] + t["forward"] + t["sample"] + t["postprocess"]
    outside = (t["schedule"] + t["sample"] + t["postprocess"] + t["broadcast"]) / step_total
    weight_bytes = ShardingPlan.build(cfg, 1).ranks[0].bytes(args.dtype)
    b1, bandwidth, b1_ratio = b1_against_floor(engine, weight_bytes)
    floor = weight_bytes / bandwidth

    hf = None if args.skip_transformers else run_transformers(path, reqs, dtype=getattr(torch, args.dtype))
    rows = [("tpserve engine", ours)] + ([("transformers generate (batches of 16)", hf)] if hf else [])
    print(f"\n{'':40s} {'tok/s':>8s} {'wall s':>8s} {'TTFT p50':>9s} {'TTFT p99':>9s} "
          f"{'TPOT p50':>9s} {'TPOT p99':>9s}")
    for name, r in rows:
        print(f"{name:40s} {r['throughput']:8.1f} {r['wall']:8.1f} {r['ttft_p50']:8.2f}s {r['ttft_p99']:8.2f}s "
              f"{r['tpot_p50'] * 1e3:7.1f}ms {r['tpot_p99'] * 1e3:7.1f}ms")
    print(f"\nengine steps: {t['steps']}, per step: schedule {t['schedule'] / t['steps'] * 1e3:.2f} ms, "
          f"forward {t['forward'] / t['steps'] * 1e3:.1f} ms, sample {t['sample'] / t['steps'] * 1e3:.2f} ms, "
          f"postprocess {t['postprocess'] / t['steps'] * 1e3:.2f} ms")
    print(f"share of step time outside the forward pass: {outside * 100:.1f}%  (goal < 10%)")
    print(f"memory bandwidth (1 GiB read, median of 5 rounds): {bandwidth / 1e9:.1f} GB/s; weights "
          f"{weight_bytes / 1e6:.0f} MB -> floor {floor * 1e3:.1f} ms/step")
    print(f"batch-1 decode step: {b1 * 1e3:.1f} ms; against the floor read in the same round, median "
          f"{b1_ratio:.2f}x  (goal <= 1.2x)")
    if hf:
        print(f"throughput_ratio_vs_transformers: {ours['throughput'] / hf['throughput']:.2f}")


if __name__ == "__main__":
    main()
