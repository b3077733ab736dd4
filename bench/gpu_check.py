"""Checks and measures tpserve's CUDA path on a machine with an NVIDIA GPU, in one command.

    make gpu-check                                # python3 bench/gpu_check.py, every check
    python3 bench/gpu_check.py --only parity,engine --json out.json
    python3 bench/gpu_check.py --device cpu --quick   # the same script at toy sizes (CI runs it)

Needs PyTorch (CUDA build), Triton, transformers, safetensors, tokenizers, numpy and pyyaml; no
Ray, no downloads, no pip: every model is a random one built on the spot with transformers' config
classes. Each check prints one line as it ends; a table follows, and the exit status is 1 when
any check failed. Benchmarks print their goal beside the figure; a missed goal is reported, not
failed. Checks, in order:

  env              GPU, driver-visible devices, versions
  kernels          the Triton kernels, compiled, against float64 / torch references
  parity-fp32-*    random Llama (9 q / 3 kv heads) and GPT-2, TP = 1, float32 with TF32 off,
                   eager and CUDA-graph decode steps: logits within 1e-4 of transformers on every
                   prompt position and every decode step, 32 greedy tokens identical
  parity-bf16-*    bfloat16: error against transformers' float32 logits at most 1.5x the error
                   of transformers' own bfloat16 run (prompt and teacher-forced decode positions)
  tp2-gloo-1gpu    TP = 2, both ranks on the one GPU, gloo carrying CUDA tensors: fp32 parity
  nccl-1rank       an NCCL group of one: all-reduce, gather, CPU-side broadcast, and an
                   all-reduce captured in a CUDA graph and replayed
  tp2-nccl         TP = 2 over NCCL with CUDA graphs (needs two GPUs; skipped otherwise)
  engine           32 concurrent greedy requests on a small KV pool: outputs identical to each
                   request alone, preemption happened, graphs replayed, every block freed
  bench-decode-b1  batch-1 decode step of a SmolLM2-135M-shaped Llama in bfloat16 (graphs and
                   eager) against the HBM floor and transformers' generate(); goal <= 1.0 ms
  bench-mixed      bench/bench_engine.py's workload (64 requests, prompts 16-512, outputs
                   16-256): engine vs transformers generate() in batches of 16; goal >= 10x
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

PROMPTS = [[5, 17, 33, 2, 9, 41, 7], [88], list(range(10, 40)), [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2]]
FP32_TOLERANCE = 1e-4
BF16_FACTOR = 1.5
DECODE_GOAL_MS = 1.0
MIXED_GOAL = 10.0


@dataclass
class Result:
    name: str
    status: str  # PASS | FAIL | SKIP | INFO
    seconds: float
    summary: str
    figures: dict = field(default_factory=dict)


class CheckFailed(AssertionError):
    pass


def require(ok: bool, message: str) -> None:
    if not ok:
        raise CheckFailed(message)


class Skip(Exception):
    pass


# -- models built on the spot ---------------------------------------------------------------------
def llama_config(quick: bool, **over):
    import transformers as tf

    size = dict(hidden_size=72, head_dim=8, intermediate_size=100, num_hidden_layers=2, vocab_size=101) if quick \
        else dict(hidden_size=288, head_dim=32, intermediate_size=768, num_hidden_layers=4, vocab_size=2048)
    kw = dict(num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, initializer_range=0.05,
              tie_word_embeddings=False, rope_theta=10000.0, **size)
    kw.update(over)
    return tf.LlamaConfig(**kw), tf.LlamaForCausalLM


def gpt2_config(quick: bool):
    import transformers as tf

    size = dict(n_embd=48, n_layer=2, n_head=6, vocab_size=101) if quick else dict(n_embd=256, n_layer=4, n_head=8,
                                                                                   vocab_size=2048)
    return tf.GPT2Config(n_positions=2048, initializer_range=0.05, bos_token_id=0, eos_token_id=0, **size), \
        tf.GPT2LMHeadModel


def smollm2_shape(quick: bool):
    """A random Llama of SmolLM2-135M's shape (the default model): 30 layers, 9 q / 3 kv heads."""
    import transformers as tf

    if quick:
        return llama_config(True, num_hidden_layers=2, tie_word_embeddings=True, vocab_size=512)
    return tf.LlamaConfig(hidden_size=576, head_dim=64, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                          max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=100000.0,
                          initializer_range=0.02, rms_norm_eps=1e-5), tf.LlamaForCausalLM


def save_random(config_and_class, workdir: Path, name: str, dtype) -> str:
    import torch

    cfg, cls = config_and_class
    torch.manual_seed(0)
    path = workdir / name
    cls(cfg).eval().to(dtype).save_pretrained(path)
    return str(path)


# -- running our model without an engine ----------------------------------------------------------
def load_runner(path, device, dtype="float32", *, graphs_up_to=0, kernels="auto", num_blocks=512):
    from sharding.arch import ModelConfig
    from sharding.group import TPGroup
    from sharding.plan import ShardingPlan
    from worker.runner import ModelRunner

    cfg = ModelConfig.from_dir(path)
    plan = ShardingPlan.build(cfg, 1)
    runner, report = ModelRunner.load(path, cfg, plan.ranks[0], TPGroup.single(device), dtype=dtype,
                                      num_blocks=num_blocks, block_size=16, max_positions=2048,
                                      kernels=kernels, cuda_graphs_up_to=graphs_up_to)
    return runner, report


def teacher_forced(runner, prompts, continuations):
    """Our logits for each prompt's positions (one prefill step for all prompts) and for each
    decode step fed the given continuation tokens: per prompt, (len(p) + len(c) - 1, vocab)."""
    import torch

    from worker.kv_cache import BlockManager
    from worker.step import StepInput

    bs = runner.block_size
    bm = BlockManager(runner.cache.num_blocks, bs)
    step = StepInput.build([(p, 0, bm.allocate(i, len(p))) for i, p in enumerate(prompts)], bs, logits="all")
    rows = [list(t) for t in runner.run(step).float().cpu().split([len(p) for p in prompts])]
    seqs = [list(p) for p in prompts]
    for j in range(len(continuations[0]) - 1):
        items = []
        for i, s in enumerate(seqs):
            s.append(continuations[i][j])
            items.append(([s[-1]], len(s) - 1, bm.allocate(i, len(s))))
        for i, row in enumerate(runner.run(StepInput.build(items, bs)).float().cpu()):
            rows[i].append(row)
    return [torch.stack(r) for r in rows]


def hf_reference(path, prompts, new_tokens, device, dtype):
    """transformers: each prompt's greedy continuation (full recompute per token) and its logits
    over prompt + continuation[:-1] (what our prefill and decode steps must reproduce)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    tokens, logits = [], []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device=device)
            for _ in range(new_tokens):
                nxt = model(ids).logits[0, -1].argmax()
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            tokens.append(ids[0, len(p):].tolist())
            logits.append(model(ids[:, :-1]).logits[0].float().cpu())
    del model
    return tokens, logits


def hf_logits(path, seqs, device, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    with torch.no_grad():
        out = [model(torch.tensor([s], device=device)).logits[0].float().cpu() for s in seqs]
    del model
    return out


def max_err(a_list, b_list) -> float:
    return max((a - b).abs().max().item() for a, b in zip(a_list, b_list))


# -- the checks -----------------------------------------------------------------------------------
class Checks:
    def __init__(self, args, workdir: Path):
        import torch

        self.args, self.workdir = args, workdir
        self.device = args.device
        self.cuda = args.device == "cuda"
        self.quick = args.quick
        self.new_tokens = 8 if args.quick else 32
        self.torch = torch
        self._paths: dict[str, str] = {}
        self._refs: dict[str, tuple] = {}

    def path(self, name: str) -> str:
        """The random checkpoints, built once: float32 weights."""
        import torch

        if name not in self._paths:
            make = {"llama": lambda: llama_config(self.quick), "gpt2": lambda: gpt2_config(self.quick),
                    "smollm2-shape": lambda: smollm2_shape(self.quick)}[name]
            dtype = torch.bfloat16 if name == "smollm2-shape" else torch.float32
            self._paths[name] = save_random(make(), self.workdir, name, dtype)
        return self._paths[name]

    def reference(self, name: str):
        """transformers' float32 greedy tokens and logits for PROMPTS, on this device."""
        if name not in self._refs:
            self._refs[name] = hf_reference(self.path(name), PROMPTS, self.new_tokens, self.device,
                                            self.torch.float32)
        return self._refs[name]

    # env ----------------------------------------------------------------------------------------
    def env(self):
        import torch

        fig = {"torch": torch.__version__, "python": platform.python_version(), "device": self.device}
        try:
            import triton

            fig["triton"] = triton.__version__
        except ImportError:
            fig["triton"] = "missing"
        import transformers

        fig["transformers"] = transformers.__version__
        if self.cuda:
            props = torch.cuda.get_device_properties(0)
            fig.update(gpu=props.name, gpus=torch.cuda.device_count(), sms=props.multi_processor_count,
                       memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                       capability=f"{props.major}.{props.minor}")
        else:
            fig["cpu"] = platform.processor() or platform.machine()
        summary = ", ".join(f"{k} {v}" for k, v in fig.items())
        return "INFO", summary, fig

    # kernels --------------------------------------------------------------------------------------
    def kernels(self):
        import torch

        from tpkernels import triton_ops
        from tpkernels.triton_attention import paged_decode_attention

        dev = self.device
        worst = {}
        g = torch.Generator().manual_seed(0)
        cases = [(torch.float32, 64, 9, 3, None, None), (torch.float32, 128, 8, 1, 40, 64),
                 (torch.bfloat16, 64, 9, 3, None, 32), (torch.float16, 40, 4, 4, 7, None)]
        if self.quick:
            cases = cases[:1] + cases[2:3]
        for dtype, d, hq, hkv, window, part in cases:
            bs, nblocks, n = 16, 64, 5
            k = torch.randn(hkv, nblocks, bs * d, generator=g).to(dtype).to(dev)
            v = torch.randn(hkv, nblocks, bs * d, generator=g).to(dtype).to(dev)
            lens = torch.tensor([1, 15, 17, 100, 300][:n])
            ids = list(range(nblocks))
            random.Random(d).shuffle(ids)
            width = 20
            tables = torch.tensor([ids[(j * 7) % 44:(j * 7) % 44 + width] for j in range(n)])
            q = torch.randn(n, hq, d, generator=g).to(dtype).to(dev)
            out = torch.full((n, hq, d), float("nan"), dtype=dtype, device=dev)
            kwargs = {} if part is None else {"partition_size": part}
            paged_decode_attention(q, k, v, tables.to(dev), lens.to(dev), d ** -0.5, window, out, **kwargs)
            ref = _attention_reference(q.cpu(), k.cpu(), v.cpu(), tables, lens, bs, d ** -0.5, window)
            err = (out.cpu().double() - ref).abs().max().item()
            tol = 1e-5 if dtype == torch.float32 else 3e-2
            key = f"attn {str(dtype)[6:]} d{d} {hq}/{hkv} w{window} p{part}"
            worst[key] = err
            require(err < tol, f"{key}: max error {err:.2e} > {tol}")
        x, delta = torch.randn(3, 576, generator=g).to(dev), torch.randn(3, 576, generator=g).to(dev)
        w = torch.randn(576, generator=g).to(dev)
        r, o = triton_ops.add_rms_norm(x, delta, w, 1e-5)
        s = (x + delta).double()
        worst["add_rms_norm"] = (o.double() - s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
                                 ).abs().max().item()
        require(worst["add_rms_norm"] < 1e-5, f"add_rms_norm error {worst['add_rms_norm']:.2e}")
        gu = torch.randn(3, 2 * 1536, generator=g).to(dev)
        gate, up = gu.double().chunk(2, -1)
        worst["silu_mul"] = (triton_ops.silu_mul(gu).double() - gate * torch.sigmoid(gate) * up).abs().max().item()
        require(worst["silu_mul"] < 1e-5, f"silu_mul error {worst['silu_mul']:.2e}")
        return "PASS", f"{len(worst)} cases, worst error {max(worst.values()):.1e}", worst

    # parity ---------------------------------------------------------------------------------------
    def parity_fp32(self, name):
        """Prompt logits, decode logits and greedy tokens against transformers, eager and graphed."""
        ref_tokens, ref_logits = self.reference(name)
        figs = {}
        variants = [("eager", 0)] + ([("graphs", 8)] if self.cuda else [])
        for label, graphs in variants:
            runner, _ = load_runner(self.path(name), self.device, graphs_up_to=graphs, kernels=self.args.kernels)
            mine = teacher_forced(runner, PROMPTS, ref_tokens)
            figs[f"{label} max |dlogit|"] = err = max_err(mine, ref_logits)
            require(err < FP32_TOLERANCE, f"{label}: max |dlogit| {err:.2e} >= {FP32_TOLERANCE}")
            from tp_harness import greedy

            _, tokens, _ = greedy(runner, PROMPTS, self.new_tokens)
            require(tokens == ref_tokens, f"{label}: greedy tokens differ from transformers")
            if graphs:
                figs["graph buckets"] = sorted(runner.graphs.buckets)
                require(runner.graphs.buckets, "no decode step replayed a graph")
        return "PASS", (", ".join(f"{k} {v:.1e}" for k, v in figs.items() if "dlogit" in k)
                        + f"; {len(PROMPTS)}x{self.new_tokens} greedy tokens identical"), figs

    def parity_bf16(self, name):
        import torch

        ref_tokens, ref_logits = self.reference(name)
        seqs = [p + t[:-1] for p, t in zip(PROMPTS, ref_tokens)]
        hf_bf16 = hf_logits(self.path(name), seqs, self.device, torch.bfloat16)
        runner, _ = load_runner(self.path(name), self.device, "bfloat16", graphs_up_to=8 if self.cuda else 0,
                                kernels=self.args.kernels)
        mine = teacher_forced(runner, PROMPTS, ref_tokens)
        ours, theirs = max_err(mine, ref_logits), max_err(hf_bf16, ref_logits)
        mean = lambda xs: statistics.fmean((a - b).abs().mean().item() for a, b in zip(xs, ref_logits))  # noqa: E731
        figs = {"ours max": ours, "transformers bf16 max": theirs, "ours mean": mean(mine),
                "transformers bf16 mean": mean(hf_bf16)}
        require(ours <= BF16_FACTOR * theirs,
                f"bf16 max error {ours:.3g} > {BF16_FACTOR} x transformers' own {theirs:.3g}")
        return "PASS", (f"max |dlogit| vs fp32: ours {ours:.3g}, transformers bf16 {theirs:.3g} "
                        f"(ratio {ours / theirs:.2f}, limit {BF16_FACTOR}); mean {figs['ours mean']:.2e} vs "
                        f"{figs['transformers bf16 mean']:.2e}"), figs

    # tensor parallel ------------------------------------------------------------------------------
    def _tp2(self, backend, devices, runner_options):
        from tp_harness import run_tp

        names = ["llama", "gpt2"]
        jobs = [(self.path(n), PROMPTS, "float32") for n in names]
        results = run_tp(jobs, 2, self.new_tokens, backend=backend, devices=devices,
                         runner_options=runner_options, timeout_s=240)
        figs = {}
        for n, got in zip(names, results):
            ref_tokens, ref_logits = self.reference(n)
            prompt_ref = [r[:len(p)] for r, p in zip(ref_logits, PROMPTS)]
            decode_ref = [r[len(p):] for r, p in zip(ref_logits, PROMPTS)]
            figs[n] = err = max(max_err(got["logits"], prompt_ref), max_err(got["decode_logits"], decode_ref))
            require(err < FP32_TOLERANCE, f"{n}: max |dlogit| {err:.2e}")
            require(got["tokens"] == ref_tokens, f"{n}: greedy tokens differ from transformers")
            for rank, (loaded, planned) in got["bytes"].items():
                require(loaded == planned, f"{n} rank {rank}: loaded {loaded} B, plan says {planned} B")
        return figs

    def tp2_gloo(self):
        devices = [f"{self.device}:0" if self.cuda else "cpu"] * 2
        figs = self._tp2("gloo", devices, {})
        return "PASS", "both ranks on one device: " + ", ".join(f"{k} max |dlogit| {v:.1e}" for k, v in figs.items()) \
            + ", greedy tokens identical", figs

    def nccl_one_rank(self):
        if not self.cuda:
            raise Skip("needs CUDA")
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        p = ctx.Process(target=_nccl_one_rank_main, args=(q,))
        p.start()
        try:
            status, detail = q.get(timeout=120)
        finally:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        require(status == "ok", detail)
        return "PASS", detail, {}

    def tp2_nccl(self):
        import torch

        if not self.cuda or torch.cuda.device_count() < 2:
            raise Skip(f"needs 2 GPUs ({torch.cuda.device_count() if self.cuda else 0} visible)")
        figs = self._tp2("nccl", ["cuda:0", "cuda:1"], {"cuda_graphs_up_to": 8})
        return "PASS", "with CUDA graphs: " + ", ".join(f"{k} {v:.1e}" for k, v in figs.items()), figs

    # engine ---------------------------------------------------------------------------------------
    def engine(self):
        from bench_engine import make_engine
        from worker.engine import Request
        from worker.sampling import SamplingParams

        rng = random.Random(1)
        n, out_len = (12, 6) if self.quick else (32, 24)
        vocab = llama_config(self.quick)[0].vocab_size
        prompts = [[rng.randrange(1, vocab) for _ in range(rng.randint(5, 60 if self.quick else 200))]
                   for _ in range(n)]
        need = sum(len(p) + out_len for p in prompts)
        kv_tokens = max(need // 3, max(len(p) for p in prompts) + out_len + 32)
        # 16-token blocks: a cache this small must still hold several sequences, so that they preempt
        eng = make_engine(self.path("llama"), kv_tokens=kv_tokens, max_batch=32, step_tokens=256,
                          device=self.device, cuda_graphs=self.cuda, block_size=16)

        def params():
            return SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)

        alone = {}
        for i, p in enumerate(prompts):
            alone[i] = _run(eng, [Request(f"alone-{i}", p, params())])[f"alone-{i}"]
        preempted_before = eng.scheduler.num_preemptions
        together = _run(eng, [Request(f"batch-{i}", p, params()) for i, p in enumerate(prompts)])
        differ = [i for i in range(n) if together[f"batch-{i}"] != alone[i]]
        preemptions = eng.scheduler.num_preemptions - preempted_before
        figs = {"requests": n, "kv_tokens": kv_tokens, "tokens_needed": need, "preemptions": preemptions,
                "differ": differ, "blocks_in_use_after": eng.blocks.num_used}
        if self.cuda:
            figs["graph buckets"] = sorted(eng.runner.graphs.buckets)
            require(len(figs["graph buckets"]) >= 2, f"graph buckets used: {figs['graph buckets']}")
        require(not differ, f"requests {differ} differ from their run alone")
        require(all(len(together[f"batch-{i}"]) == out_len for i in range(n)), "wrong output lengths")
        require(preemptions > 0, "no preemption happened")
        require(eng.blocks.num_used == 0, f"{eng.blocks.num_used} KV blocks still in use")
        return "PASS", (f"{n} concurrent greedy requests = alone, {preemptions} preemptions "
                        f"({kv_tokens} KV tokens for {need} needed), blocks all freed"
                        + (f", graph buckets {figs['graph buckets']}" if self.cuda else "")), figs

    # benchmarks -----------------------------------------------------------------------------------
    def bench_decode_b1(self):
        import torch

        from bench_engine import decode_step_b1, make_engine

        path = self.path("smollm2-shape")
        dtype = "bfloat16" if self.cuda else "float32"
        steps = 16 if self.quick else 200
        figs = {}
        for label, graphs in [("graphs", True), ("eager", False)] if self.cuda else [("eager", False)]:
            eng = make_engine(path, kv_tokens=4096, max_batch=64, dtype=dtype, device=self.device, cuda_graphs=graphs)
            decode_step_b1(eng, 8)  # warm-up (compiles, captures bucket 1)
            figs[f"{label} step ms"] = decode_step_b1(eng, steps) * 1e3
            figs[f"{label} forward ms"] = _forward_b1(eng, steps) * 1e3
            del eng
        weight_bytes = _weight_bytes(path, dtype)
        bandwidth = _device_bandwidth(self.device)
        figs["weights MB"] = weight_bytes / 1e6
        figs["bandwidth GB/s"] = bandwidth / 1e9
        figs["floor ms"] = weight_bytes / bandwidth * 1e3
        figs["transformers ms/token"] = _hf_decode_ms(path, self.device, getattr(torch, dtype), 16 if self.quick else 128)
        best = figs["graphs step ms" if self.cuda else "eager step ms"]
        met = "met" if best <= DECODE_GOAL_MS else "MISSED"
        graphed = (f"{best:.3f} ms with graphs ({figs['graphs forward ms']:.3f} forward), " if self.cuda else "")
        return "PASS", (f"step {graphed}{figs['eager step ms']:.3f} ms eager ({figs['eager forward ms']:.3f} "
                        f"forward); floor {figs['floor ms']:.3f} ms "
                        f"({figs['weights MB']:.0f} MB at {figs['bandwidth GB/s']:.0f} GB/s) = "
                        f"{best / figs['floor ms']:.1f}x; transformers {figs['transformers ms/token']:.2f} ms/token; "
                        f"goal <= {DECODE_GOAL_MS} ms {met}"), figs

    def bench_mixed(self):
        import torch

        from bench_engine import make_engine, run_ours, run_transformers, workload

        path = self.path("smollm2-shape")
        dtype = "bfloat16" if self.cuda else "float32"
        vocab = smollm2_shape(self.quick)[0].vocab_size
        reqs = workload(8 if self.quick else 64, vocab, 0, 24 if self.quick else 256)
        if self.quick:
            reqs = [(p[:40], n) for p, n in reqs]
        eng = make_engine(path, kv_tokens=65536, max_batch=64, dtype=dtype, device=self.device, cuda_graphs=self.cuda)
        eng.runner.capture_graphs()  # as a serving rank does before its first request
        run_ours(eng, reqs[:2])  # warm-up
        ours = run_ours(eng, reqs)
        hf = run_transformers(path, reqs, self.device, getattr(torch, dtype))
        ratio = ours["throughput"] / hf["throughput"]
        figs = {"ours tok/s": ours["throughput"], "transformers tok/s": hf["throughput"], "ratio": ratio,
                "ours TPOT p50 ms": ours["tpot_p50"] * 1e3, "ours TTFT p50 s": ours["ttft_p50"],
                "requests": len(reqs), "tokens": sum(n for _, n in reqs)}
        met = "met" if ratio >= MIXED_GOAL else "MISSED"
        return "PASS", (f"{len(reqs)} requests, {figs['tokens']} tokens: ours {ours['throughput']:.0f} tok/s, "
                        f"transformers {hf['throughput']:.0f} tok/s, ratio {ratio:.1f}x; goal >= {MIXED_GOAL:g}x {met}"), figs


def _run(engine, requests) -> dict[str, list[int]]:
    """Submits everything, steps until all requests finished; each request's token ids."""
    tokens = {r.request_id: [] for r in requests}
    for r in requests:
        engine.add_request(r)
    while engine.has_work:
        for out in engine.step():
            require(out.error is None, f"request {out.request_id} failed: {out.error}")
            tokens[out.request_id] += out.token_ids
    return tokens


def _attention_reference(q, k, v, tables, lens, bs, scale, window):
    """float64, one sequence and one query head at a time, keys fetched token by token."""
    import torch

    n, hq, d = q.shape
    hkv = k.shape[0]
    out = torch.empty(n, hq, d, dtype=torch.float64)
    kk, vv = k.double().view(hkv, -1, bs, d), v.double().view(hkv, -1, bs, d)
    for i in range(n):
        L = int(lens[i])
        pos = torch.arange(max(0, L - window) if window else 0, L)
        blocks = tables[i][pos // bs]
        for h in range(hq):
            kvh = h // (hq // hkv)
            p = torch.softmax(kk[kvh, blocks, pos % bs] @ q[i, h].double() * scale, dim=0)
            out[i, h] = p @ vv[kvh, blocks, pos % bs]
    return out


def _nccl_one_rank_main(q):
    """An NCCL group of one rank, made the way TPGroup.connect makes groups, exercised directly
    (TPGroup short-cuts collectives of one rank)."""
    try:
        import datetime

        import torch
        import torch.distributed as dist

        from sharding.group import open_store

        torch.cuda.set_device(0)
        store = open_store("127.0.0.1", 0, 1, True, 60)
        dist.init_process_group("cpu:gloo,cuda:nccl", store=dist.PrefixStore("check/pg", store), rank=0,
                                world_size=1, timeout=datetime.timedelta(seconds=60))
        x = torch.arange(8, dtype=torch.float32, device="cuda")
        dist.all_reduce(x)
        parts = [torch.empty_like(x)]
        dist.gather(x, parts, dst=0)
        plan = torch.arange(4)
        dist.broadcast(plan, src=0)  # a CPU tensor: the step plan's path, over gloo
        ok = torch.equal(x.cpu(), torch.arange(8.0)) and torch.equal(parts[0], x) and plan.tolist() == [0, 1, 2, 3]
        y = torch.ones(1024, device="cuda")
        graph = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            dist.all_reduce(y)  # warm-up outside capture
        torch.cuda.current_stream().wait_stream(s)
        try:
            with torch.cuda.graph(graph):
                dist.all_reduce(y)
            graph.replay()
            torch.cuda.synchronize()
            captured = "an all-reduce captured in a CUDA graph replayed"
        except Exception as exc:  # noqa: BLE001 - reported, not fatal: it decides graphs at TP > 1
            captured = f"graph capture of an all-reduce FAILED ({type(exc).__name__}: {str(exc)[:120]})"
            ok = False
        dist.destroy_process_group()
        q.put(("ok" if ok else "fail", f"all-reduce, gather, CPU broadcast correct; {captured}"))
    except Exception:
        q.put(("fail", traceback.format_exc()[-600:]))


def _forward_b1(engine, steps):
    """Median time of the runner's forward alone for one sequence's decode steps."""
    import torch

    from worker.step import StepInput

    runner = engine.runner
    table = list(range(-(-(32 + steps) // runner.block_size)))  # no sequence is live: any blocks do
    times = []
    for i in range(steps):
        step = StepInput.build([([1 + i % 50], 32 + i, table)], runner.block_size)
        sync(runner.model.device)
        t = time.perf_counter()
        out = runner.run(step)
        if out is not None and out.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def sync(device):
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _weight_bytes(path, dtype):
    from sharding.arch import ModelConfig
    from sharding.plan import ShardingPlan

    return ShardingPlan.build(ModelConfig.from_dir(path), 1).ranks[0].bytes(dtype)


def _device_bandwidth(device) -> float:
    """Bytes moved per second (read + written) by a 1 GiB device-to-device copy, best of 5."""
    import torch

    if device != "cuda":
        from bench_engine import memory_bandwidth

        return memory_bandwidth()
    x = torch.empty(1 << 28, device="cuda")
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(6):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y.copy_(x)
        stop.record()
        stop.synchronize()
        best = min(best, start.elapsed_time(stop) / 1e3)
    return 2 * x.numel() * 4 / best


def _hf_decode_ms(path, device, dtype, new_tokens) -> float:
    """transformers generate(), batch 1, 32-token prompt: median time per decode step."""
    import torch
    from transformers import AutoModelForCausalLM

    from bench_engine import _StepClock

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    ids = torch.arange(100, 132, device=device)[None]
    with torch.no_grad():
        model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        clock = _StepClock(time.perf_counter())
        model.generate(input_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=0, streamer=clock)
    gaps = [b - a for a, b in zip(clock.times[1:], clock.times[2:])]
    return statistics.median(gaps) * 1e3


CHECKS = [  # name, method, argument
    ("env", "env", None),
    ("kernels", "kernels", None),
    ("parity-fp32-llama", "parity_fp32", "llama"),
    ("parity-fp32-gpt2", "parity_fp32", "gpt2"),
    ("parity-bf16-llama", "parity_bf16", "llama"),
    ("parity-bf16-gpt2", "parity_bf16", "gpt2"),
    ("tp2-gloo-1gpu", "tp2_gloo", None),
    ("nccl-1rank", "nccl_one_rank", None),
    ("tp2-nccl", "tp2_nccl", None),
    ("engine", "engine", None),
    ("bench-decode-b1", "bench_decode_b1", None),
    ("bench-mixed", "bench_mixed", None),
]


def run_check(checks: Checks, name: str, method: str, arg) -> Result:
    t0 = time.perf_counter()
    try:
        fn = getattr(checks, method)
        status, summary, figs = fn(arg) if arg is not None else fn()
    except Skip as s:
        status, summary, figs = "SKIP", str(s), {}
    except CheckFailed as e:
        status, summary, figs = "FAIL", str(e), {}
    except Exception as e:  # noqa: BLE001 - a crashing check is a failed check; the others still run
        tb = traceback.format_exc()
        print(tb, file=sys.stderr)
        status, summary, figs = "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300], {}
    finally:
        if checks.cuda:
            checks.torch.cuda.empty_cache()
    return Result(name, status, time.perf_counter() - t0, summary, figs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when visible")
    ap.add_argument("--only", default="", help="comma-separated check names (or prefixes) to run")
    ap.add_argument("--quick", action="store_true", help="toy sizes (for a CPU smoke run)")
    ap.add_argument("--kernels", default="auto", help="auto | torch | native | triton (see tpkernels/__init__.py)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--watchdog-s", type=float, default=540, help="dump every thread's stack and exit after this")
    args = ap.parse_args(argv)
    if args.device == "cpu" or (args.device is None and not _cuda_visible()):
        if args.device is None:
            print("no CUDA device visible: use --device cpu to run the checks on CPU", file=sys.stderr)
            return 2
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels on CPU tensors
    args.device = args.device or "cuda"
    faulthandler.dump_traceback_later(args.watchdog_s, exit=True, file=sys.__stderr__)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()

    torch.backends.cuda.matmul.allow_tf32 = False  # float32 parity: no TF32 anywhere
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    if args.device == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    wanted = [w for w in args.only.split(",") if w]
    selected = [c for c in CHECKS if not wanted or any(c[0].startswith(w) for w in wanted)]
    results = []
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="tpserve-gpu-check-") as tmp:
            checks = Checks(args, Path(tmp))
            for name, method, arg in selected:
                r = run_check(checks, name, method, arg)
                results.append(r)
                print(f"[{r.status}] {r.name:18s} {r.seconds:6.1f}s  {r.summary}", flush=True)
    finally:
        faulthandler.cancel_dump_traceback_later()
    total = time.perf_counter() - t0
    print_table(results, total)
    if args.json:
        Path(args.json).write_text(json.dumps({"total_s": total, "results": [r.__dict__ for r in results]},
                                              indent=1, default=str))
    return 1 if any(r.status == "FAIL" for r in results) else 0


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def print_table(results: list[Result], total: float) -> None:
    print(f"\n{'check':18s} {'result':6s} {'time':>7s}  figures")
    for r in results:
        print(f"{r.name:18s} {r.status:6s} {r.seconds:6.1f}s  {r.summary}")
    failed = [r.name for r in results if r.status == "FAIL"]
    print(f"\n{len(results)} checks in {total:.0f} s: {len(failed)} failed" + (f" ({', '.join(failed)})" if failed else ""))


if __name__ == "__main__":
    sys.exit(main())
