"""Runs checkpoints at a given TP size, one spawned process per rank, gloo (or shm) on a free port.

Ranks run on CPU unless `devices` names a device per rank (`bench/gpu_check.py` runs two ranks on
one GPU over gloo, or one per GPU over NCCL).

Rank 0 drives a plain greedy loop over the runner: one prefill step for all prompts asking for
every position's logits, then one decode step per new token. The other ranks follow the broadcast
plans. Results come back through a queue: rank 0's logits and tokens, every rank's loaded bytes.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import traceback

import torch
import torch.distributed as dist

from sharding.arch import ModelConfig
from sharding.group import TPGroup, open_store
from sharding.loader import Checkpoint
from sharding.plan import ShardingPlan
from worker.kv_cache import BlockManager
from worker.runner import ModelRunner
from worker.step import StepInput

BLOCK_SIZE = 4
NUM_BLOCKS = 512


def greedy(runner: ModelRunner, prompts: list[list[int]], new_tokens: int):
    """(per-prompt logits of every prompt position, per-prompt generated tokens, per-prompt
    logits of every decode step)."""
    bs = runner.block_size
    bm = BlockManager(runner.cache.num_blocks, bs)
    step = StepInput.build([(p, 0, bm.allocate(i, len(p))) for i, p in enumerate(prompts)], bs, logits="all")
    logits = runner.run(step)
    prompt_logits = list(logits.split([len(p) for p in prompts]))
    seqs = [list(p) + [int(lg[-1].argmax())] for p, lg in zip(prompts, prompt_logits)]
    decode_logits = [[] for _ in prompts]
    for _ in range(new_tokens - 1):
        items = [([s[-1]], len(s) - 1, bm.allocate(i, len(s))) for i, s in enumerate(seqs)]
        for i, row in enumerate(runner.run(StepInput.build(items, bs))):
            seqs[i].append(int(row.argmax()))
            decode_logits[i].append(row)
    steps = [torch.stack(rows) if rows else None for rows in decode_logits]
    return prompt_logits, [s[len(p):] for s, p in zip(seqs, prompts)], steps


def _rank_main(rank, tp, port, jobs, new_tokens, backend, device, runner_options, out):
    try:
        torch.set_num_threads(1)
        if device.startswith("cuda"):
            torch.cuda.set_device(device)  # before the process group: NCCL binds to it
        store = dist.TCPStore("127.0.0.1", port, tp, False, timeout=datetime.timedelta(seconds=60))
        group = TPGroup.connect(store, rank, tp, device, backend=backend, timeout_s=60)
        for job, (path, prompts, dtype) in enumerate(jobs):
            cfg = ModelConfig.from_dir(path)
            plan = ShardingPlan.build(cfg, tp, Checkpoint(path).names)
            runner, report = ModelRunner.load(path, cfg, plan.ranks[rank], group, dtype=dtype,
                                               num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, **runner_options)
            out.put(("bytes", job, rank, report.parameter_bytes, plan.ranks[rank].bytes(dtype)))
            if rank == 0:
                logits, tokens, steps = greedy(runner, prompts, new_tokens)
                # numpy, not tensors: torch would share tensors through fds that die with this process
                out.put(("result", job, [lg.float().cpu().numpy() for lg in logits], tokens,
                         [st.float().cpu().numpy() if st is not None else None for st in steps]))
                runner.stop_peers()
            else:
                runner.follow()
            stack = runner.model._stack
            out.put(("stack", job, rank, stack.steps if stack is not None else 0))
        group.close()
    except BaseException:
        out.put(("error", rank, traceback.format_exc()))


def run_tp(jobs, tp: int, new_tokens: int = 32, backend: str = "gloo", timeout_s: float = 300,
           devices: list[str] | None = None, runner_options: dict | None = None):
    """jobs: [(checkpoint dir, prompts, dtype)]. Returns per job: {"logits", "tokens",
    "decode_logits", "bytes", "stack_steps"} where bytes[rank] = (bytes loaded, bytes the plan
    assigns) and stack_steps[rank] = the steps the rank's decode stack ran (`worker.model.DecodeStack`).
    `devices`: each rank's device (default: all on CPU); `runner_options`: more ModelRunner.load
    arguments."""
    ctx = mp.get_context("spawn")
    store = open_store("127.0.0.1", 0, tp + 1, True, 60)  # the parent hosts the rendezvous
    out = ctx.Queue()
    devices = devices or ["cpu"] * tp
    procs = [ctx.Process(target=_rank_main, args=(r, tp, store.port, jobs, new_tokens, backend, devices[r],
                                                  runner_options or {}, out))
             for r in range(tp)]
    for p in procs:
        p.start()
    results = [{"bytes": {}, "stack_steps": {}} for _ in jobs]
    pending = len(jobs) * (2 * tp + 1)
    try:
        while pending:
            msg = out.get(timeout=timeout_s)
            if msg[0] == "error":
                raise RuntimeError(f"rank {msg[1]} failed:\n{msg[2]}")
            if msg[0] == "bytes":
                results[msg[1]]["bytes"][msg[2]] = (msg[3], msg[4])
            elif msg[0] == "stack":
                results[msg[1]]["stack_steps"][msg[2]] = msg[3]
            else:
                results[msg[1]].update(logits=[torch.from_numpy(a) for a in msg[2]], tokens=msg[3],
                                       decode_logits=[None if a is None else torch.from_numpy(a)
                                                      for a in msg[4]])
            pending -= 1
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return results
