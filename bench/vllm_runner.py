"""Runs one workload through vLLM and prints its timings as JSON; bench/bench_vs_vllm.py starts
it with the Python of vLLM's own virtualenv (`make bench-vllm` makes it), never ours.

    .venv-vllm/bin/python bench/vllm_runner.py job.json > result.json

job.json: {"model": dir, "dtype": "float32"|"bfloat16", "tp": 1|2, "max_model_len": int,
"workloads": {name: [[prompt_token_ids, max_tokens], ...]}, "warmup": [[ids, n], ...]}. The
workloads run one after the other; each one's requests are greedy with EOS ignored, all
submitted at once to vLLM's asynchronous engine (AsyncLLM), which streams every request's
tokens, so time to first token and time per output token are measured as for tpserve. The
thread binding and KV-cache size come from the environment the caller sets
(VLLM_CPU_OMP_THREADS_BIND, VLLM_CPU_NUM_OF_RESERVED_CPU, VLLM_CPU_KVCACHE_SPACE, LD_PRELOAD).
Prints a line ``RESULT {"startup_s", "workloads": {name: {"wall_s", "first": {id: s},
"last": {id: s}, "count": {id: n}, "tokens": {id: [ids]}}}}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time


async def run(job: dict) -> dict:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    t0 = time.perf_counter()
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=job["model"], dtype=job["dtype"], tensor_parallel_size=job["tp"],
        max_model_len=job["max_model_len"], disable_log_stats=True, enable_prefix_caching=True,
        max_num_seqs=job.get("max_num_seqs", 64), skip_tokenizer_init=True))  # token ids in and out
    startup = time.perf_counter() - t0
    result = {"startup_s": startup, "workloads": {}}
    try:
        await _all(engine, job["warmup"], "w", SamplingParams, RequestOutputKind)
        for name, requests in job["workloads"].items():
            t1 = time.perf_counter()
            result["workloads"][name] = await _all(engine, requests, f"{name}-", SamplingParams, RequestOutputKind)
            result["workloads"][name]["wall_s"] = time.perf_counter() - t1
    finally:
        engine.shutdown()
    return result


async def _all(engine, requests, tag, SamplingParams, RequestOutputKind) -> dict:
    first, last, count, tokens = {}, {}, {}, {}
    t0 = time.perf_counter()

    async def one(i, ids, n):
        rid = f"{tag}{i}"
        sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
        got = []
        async for out in engine.generate({"prompt_token_ids": ids}, sp, rid):
            new = out.outputs[0].token_ids
            if new:
                now = time.perf_counter() - t0
                first.setdefault(str(i), now)
                last[str(i)] = now
                got += list(new)
        count[str(i)], tokens[str(i)] = len(got), got

    await asyncio.gather(*(one(i, ids, n) for i, (ids, n) in enumerate(requests)))
    return {"first": first, "last": last, "count": count, "tokens": tokens}


def main() -> int:
    with open(sys.argv[1]) as f:
        job = json.load(f)
    result = asyncio.run(run(job))
    sys.stdout.write("\nRESULT " + json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
