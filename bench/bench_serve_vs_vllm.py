"""tpserve serve against vllm serve through vLLM's own serving benchmark, side by side.

    make bench-vllm BENCH_ARGS=...                  # builds .venv-vllm (see bench_vs_vllm.py); then:
    .venv/bin/python bench/bench_serve_vs_vllm.py --vllm-python .venv-vllm/bin/python
    .venv/bin/python bench/bench_serve_vs_vllm.py --request-rate 4 --num-prompts 128

A third-party client measures both servers the same way: `vllm bench serve` (run from vLLM's venv
by bench/vllm_bench_client.py) with the OpenAI backend, the random dataset (fixed seed, input and
output lengths, EOS ignored), the same request rate and prompt count, streaming completions. The
servers, each started fresh and measured in turn on the same machine:

* vLLM's CPU build: `vllm.entrypoints.openai.api_server`, TP 1 on both cores
  (VLLM_CPU_OMP_THREADS_BIND=0-1, no reserved core, 4 GiB KV cache, tcmalloc preloaded);
* tpserve: `tpserve serve` with the OpenAI-compatible HTTP API, one replica of TP 1 with both
  cores (cpus_per_rank 2) on an embedded Ray.

Default model: SmolLM2-135M-Instruct in float32. Prints throughput (requests/s, output tok/s),
TTFT and ITL p50/p99 per engine, a table, and one line per metric:
``serve_vs_vllm_<metric>: <ours / theirs>`` (for latencies below 1 is better, for throughput above).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from bench_vs_vllm import TCMALLOC  # noqa: E402

NAME = "smollm2-135m-instruct"
METRICS = [("request_throughput", "req/s", True), ("output_throughput", "out tok/s", True),
           ("median_ttft_ms", "TTFT p50 ms", False), ("p99_ttft_ms", "TTFT p99 ms", False),
           ("median_itl_ms", "ITL p50 ms", False), ("p99_itl_ms", "ITL p99 ms", False)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout_s:g} s")


def start_vllm(args, model_dir: str, port: int, log) -> subprocess.Popen:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="4", VLLM_CPU_OMP_THREADS_BIND="0-1",
               VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    if os.path.exists(TCMALLOC):
        env["LD_PRELOAD"] = TCMALLOC
    return subprocess.Popen([args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
                             "--served-model-name", NAME, "--host", "127.0.0.1", "--port", str(port),
                             "--dtype", args.dtype, "--max-model-len", str(args.max_model_len)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)


def start_tpserve(args, port: int, tmp: Path, log) -> subprocess.Popen:
    cfg = tmp / "serve.yaml"
    cfg.write_text(f"model: {{path: {NAME}, dtype: {args.dtype}}}\n"
                   "parallel: {tensor_parallel_size: 1}\n"
                   "device: {type: cpu, cpus_per_rank: 2}\n"
                   f"engine: {{max_model_len: {args.max_model_len}}}\n"
                   "server: {host: 127.0.0.1, port: 0}\n"
                   f"http: {{enabled: true, port: {port}}}\n")
    return subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", str(cfg)], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)


def bench(args, model_dir: str, port: int, tmp: Path) -> dict:
    cmd = [args.vllm_python, str(ROOT / "bench" / "vllm_bench_client.py"), "--backend", "openai",
           "--base-url", f"http://127.0.0.1:{port}", "--endpoint", "/v1/completions", "--model", NAME,
           "--tokenizer", model_dir, "--dataset-name", "random", "--random-input-len", str(args.input_len),
           "--random-output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
           "--request-rate", str(args.request_rate), "--seed", str(args.seed), "--ignore-eos",
           "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,99"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=tmp)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"vllm bench serve failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def run_engine(name: str, args, model_dir: str, tmp: Path) -> dict:
    port = free_port()
    with open(tmp / f"{name}.log", "w") as log:
        proc = (start_vllm(args, model_dir, port, log) if name == "vLLM" else start_tpserve(args, port, tmp, log))
        try:
            startup = wait_ready(f"http://127.0.0.1:{port}/v1/models", proc, 600)
            print(f"  {name}: ready in {startup:.0f} s; benchmarking", flush=True)
            result = bench(args, model_dir, port, tmp)
            result["startup_s"] = startup
            return result
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--request-rate", type=float, default=8.0)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    # the engines run in other working directories: `make bench-vllm` passes a relative path
    args.vllm_python = os.path.abspath(args.vllm_python)

    from cluster.model_store import resolve_model

    model_dir = str(resolve_model(NAME))
    print(f"vllm bench serve: {args.num_prompts} random prompts of {args.input_len} tokens, {args.output_len} "
          f"output tokens each, {args.request_rate:g} requests/s, seed {args.seed}; {NAME} {args.dtype}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="tpserve-serve-bench-") as tmp:
        for name in ("vLLM", "tpserve"):
            results[name] = run_engine(name, args, model_dir, Path(tmp))
    print(f"\n{'engine':8s} " + " ".join(f"{label:>12s}" for _, label, _ in METRICS) + f" {'start-up':>9s}")
    for name, r in results.items():
        print(f"{name:8s} " + " ".join(f"{r.get(key, float('nan')):12.2f}" for key, _, _ in METRICS)
              + f" {r['startup_s']:8.0f}s")
    print()
    for key, label, higher_better in METRICS:
        ours, theirs = results["tpserve"].get(key), results["vLLM"].get(key)
        if ours is not None and theirs:
            better = "higher" if higher_better else "lower"
            print(f"serve_vs_vllm_{re.sub(r'[^a-z0-9]+', '_', key)}: {ours / theirs:.2f} ({better} is better)")
    completed = {n: r.get("completed") for n, r in results.items()}
    print(f"requests completed: {completed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
