"""The transformer, as one rank computes it: Llama family and GPT-2 over tensor-parallel layers.

Every rank runs this same forward over its own slice of every weight (see `sharding.plan`):

    x = embed(ids)                    vocab-parallel: masked lookup, all-reduce
    per block:
        x = x + wo(attn(wqkv(norm(x))))   column-parallel wqkv (this rank's heads), row-parallel wo: all-reduce
        x = x + w_out(act(w_in(norm(x)))) column-parallel w_in (gate|up), row-parallel w_out: all-reduce
    logits = lm_head(norm(x[wanted]))  vocab-parallel: rank 0 gathers the slices

Norms and residual adds run redundantly on every rank. The model is built from the weights the
loader read for this rank; nothing is ever materialised in full and re-sliced.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sharding.arch import ModelConfig, RopeConfig
from sharding.group import TPGroup
from sharding.layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from sharding.plan import RankPlan
from tpkernels import Kernels, NativeOps, native
from worker.attention import AttentionMetadata, paged_attention
from worker.kv_cache import KVCache, LayerCache
from worker.step import StepInput


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Rotary inverse frequencies (head_dim/2,), with linear or Llama-3 scaling."""
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.kind == "linear":
        return inv / rope.factor
    if rope.kind == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        low_wavelen = rope.original_max_positions / rope.low_freq_factor
        high_wavelen = rope.original_max_positions / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (rope.original_max_positions / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv


class Rope:
    """cos/sin tables (positions, head_dim/2), built once up to the longest allowed position."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int, dtype, device):
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), rope_inv_freq(rope, head_dim))
        self.cos = freqs.cos().to(dtype=dtype, device=device)
        self.sin = freqs.sin().to(dtype=dtype, device=device)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)  # (tokens, 1, d/2)


@dataclass
class Batch:
    """A step's inputs on this rank's device, with what every layer shares."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    logits_indices: torch.Tensor
    attn: AttentionMetadata
    rope: tuple[torch.Tensor, torch.Tensor] | None
    ops: object  # this step's set of fused operations (`tpkernels`)


class Norm:
    def __init__(self, cfg: ModelConfig, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias, self.eps = weight, bias, cfg.norm_eps
        self.shape = tuple(weight.shape)
        self.rms = cfg.family == "llama"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms:
            return F.rms_norm(x, self.shape, self.weight, self.eps)
        return F.layer_norm(x, self.shape, self.weight, self.bias, self.eps)

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor | None, ops) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, norm(x + delta)); no delta: (x, norm(x)). RMS norms fuse the add."""
        if delta is None:
            return x, self(x)
        if self.rms:
            return ops.add_rms_norm(x, delta, self.weight, self.eps)
        x = x + delta
        return x, self(x)


class Attention:
    def __init__(self, cfg: ModelConfig, plan: RankPlan, w: dict, i: int, group: TPGroup, kernels: Kernels):
        p = f"layers.{i}"
        self.hq, self.hkv, self.d = plan.num_heads, plan.num_kv_heads, cfg.head_dim
        self.sizes = [self.hq * self.d, self.hkv * self.d, self.hkv * self.d]
        self.wqkv = ColumnParallelLinear(w[f"{p}.wqkv.weight"], w.get(f"{p}.wqkv.bias"), kernels)
        self.wo = RowParallelLinear(w[f"{p}.wo.weight"], w.get(f"{p}.wo.bias"), group, kernels)
        self.window = cfg.sliding_windows[i]
        self.scale = cfg.head_dim ** -0.5

    def __call__(self, x: torch.Tensor, batch: Batch, cache: LayerCache) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.wqkv(x).split(self.sizes, dim=-1)  # this rank's heads only
        q = q.reshape(n, self.hq, self.d)
        k = k.reshape(n, self.hkv, self.d)
        v = v.reshape(n, self.hkv, self.d)
        q, k = batch.ops.rope_and_cache(q, k, v, batch.rope, batch.attn.slot_mapping, cache)
        o = paged_attention(q, k, v, cache, batch.attn, self.window, self.scale)  # (n, hq * d)
        return self.wo(o)  # all-reduce inside: the heads' partial outputs summed over ranks


class MLP:
    def __init__(self, cfg: ModelConfig, w: dict, i: int, group: TPGroup, kernels: Kernels):
        p = f"layers.{i}"
        self.gated = cfg.family == "llama"
        self.w_in = ColumnParallelLinear(w[f"{p}.w_in.weight"], w.get(f"{p}.w_in.bias"), kernels)
        self.w_out = RowParallelLinear(w[f"{p}.w_out.weight"], w.get(f"{p}.w_out.bias"), group, kernels)
        self.gelu = "tanh" if cfg.act == "gelu_tanh" else "none"

    def __call__(self, x: torch.Tensor, ops) -> torch.Tensor:
        h = self.w_in(x)
        if self.gated:
            h = ops.silu_mul(h)  # silu(gate) · up over this rank's [gate; up] rows
        else:
            h = F.gelu(h, approximate=self.gelu)
        return self.w_out(h)  # all-reduce inside


class Block:
    def __init__(self, cfg: ModelConfig, plan: RankPlan, w: dict, i: int, group: TPGroup, kernels: Kernels):
        p = f"layers.{i}"
        self.attn_norm = Norm(cfg, w[f"{p}.attn_norm.weight"], w.get(f"{p}.attn_norm.bias"))
        self.attn = Attention(cfg, plan, w, i, group, kernels)
        self.mlp_norm = Norm(cfg, w[f"{p}.mlp_norm.weight"], w.get(f"{p}.mlp_norm.bias"))
        self.mlp = MLP(cfg, w, i, group, kernels)

    def __call__(self, x: torch.Tensor, delta: torch.Tensor | None, batch: Batch,
                 cache: LayerCache) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream comes in and goes out as x + delta (no delta before the first block),
        so that every residual add is done together with the norm that follows it."""
        x, h = self.attn_norm.add_norm(x, delta, batch.ops)
        x, h = self.mlp_norm.add_norm(x, self.attn(h, batch, cache), batch.ops)
        return x, self.mlp(h, batch.ops)


class DecodeStack:
    """Every block of a decode step in one native call (`tpkernels/csrc/decode_stack.cpp`): the same
    kernels as the Python blocks, in the same order on the same shapes, so the same results bit for
    bit, without the ~10 Python-level operator calls per block. On a batch-1 bfloat16 step of the
    default model those calls cost ~2 ms of 6.6, during which the kernels' other threads wait.

    Built for one model and one KV cache where the model qualifies (`possible`): Llama-family blocks,
    the native kernels, every product on packed weights (`native.packed_gemm`), and one rank or
    ranks joined by the shared-memory communicator: the stack then all-reduces each block's
    row-parallel products itself, in the communicator's own steps (`ShmCommunicator.native`). A
    step qualifies (`serves`) when each of its tokens, at most 128, is a row of the paged attention
    kernel (decodes, and prefill chunks the kernel takes a row per token) and its op set is wholly
    native. ``TPSERVE_DECODE_STACK=0`` turns it off: every step then runs the Python blocks."""

    def __init__(self, model: "Transformer", cache: KVCache):
        cfg, plan = model.cfg, model.plan
        tensors, addresses, windows = [], [], []
        for block, lc in zip(model.layers, cache.layers):
            a, m = block.attn, block.mlp
            tensors += [block.attn_norm.weight, block.mlp_norm.weight, lc.k, lc.v,
                        a.wqkv.linear.bias, a.wo.bias, m.w_in.linear.bias, m.w_out.bias]
            addresses += [a.wqkv.linear.address, a.wo.linear.address, m.w_in.linear.address, m.w_out.linear.address]
            windows.append(a.window or 0)
        first = model.layers[0]
        sizes = [cfg.hidden_size, plan.num_heads, plan.num_kv_heads, cfg.head_dim, first.mlp.w_in.linear.outputs]
        self.cache = cache
        self.comm = model.group.shm if model.group.world_size > 1 else None
        self.steps = 0  # the steps it ran (tests and benchmarks read it)
        self.rows = min(mat.small_rows for mat in model._matmuls())  # the steps the packed kernel takes
        self._stack = native.decode_stack_create(tensors, addresses, windows, sizes, cfg.norm_eps, first.attn.scale)

    @staticmethod
    def possible(model: "Transformer") -> bool:
        if os.environ.get("TPSERVE_DECODE_STACK", "1") == "0":
            return False
        return (model.kernels.name == "native" and (model.group.world_size == 1 or model.group.shm is not None)
                and model.cfg.family == "llama"
                and model.rope is not None and model.pos_embed is None
                and all(mat.small == "packed" for mat in model._matmuls()))

    def serves(self, batch: Batch) -> bool:
        paged, n = batch.attn.paged_decodes, batch.input_ids.shape[0]
        return (paged is not None and paged.tokens is None and paged.num_rows == n and n <= self.rows
                and not batch.attn.decode_groups and not batch.attn.prefills
                and isinstance(batch.ops, NativeOps) and batch.ops.all_native)

    def __call__(self, x: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        paged = batch.attn.paged_decodes
        cos, sin = batch.rope
        args = (self._stack, x, cos, sin, batch.attn.slot_mapping, paged.block_tables, paged.context_lens)
        self.steps += 1
        if self.comm is None:
            x, delta, _ = native.decode_stack_run(*args)
            return x, delta

        def run(channel, who, timeout_s, step):
            x, delta, step = native.decode_stack_run(*args, channel, who, timeout_s, step)
            return (x, delta), step

        return self.comm.native(run)


class Transformer:
    def __init__(self, cfg: ModelConfig, plan: RankPlan, weights: dict, group: TPGroup,
                 max_positions: int | None = None, kernels: str = "auto"):
        self.cfg, self.plan, self.group = cfg, plan, group
        w = weights
        self.device = w["embed.weight"].device
        self.dtype = w["embed.weight"].dtype
        self.max_positions = max_positions or cfg.max_positions
        self.kernels = Kernels.select(self.device, self.dtype, kernels)
        self.embed = VocabParallelEmbedding(w["embed.weight"], plan.vocab_start, group)
        self.pos_embed = w.get("pos_embed.weight")
        self.layers = [Block(cfg, plan, w, i, group, self.kernels) for i in range(cfg.num_layers)]
        self.norm = Norm(cfg, w["norm.weight"], w.get("norm.bias"))
        head = w["embed.weight"] if cfg.tie_embeddings else w["lm_head.weight"]
        self.lm_head = ParallelLMHead(head, cfg.vocab_size, group, self.kernels)
        self.rope = None
        if cfg.rope is not None:
            self.rope = Rope(cfg.rope, cfg.head_dim, self.max_positions, self.dtype, self.device)
        self.windows = set(cfg.sliding_windows)
        self.stack_possible = DecodeStack.possible(self)
        self._stack: DecodeStack | None = None

    def _matmuls(self):
        for b in self.layers:
            yield from (b.attn.wqkv.linear, b.attn.wo.linear, b.mlp.w_in.linear, b.mlp.w_out.linear)

    def decode_stack(self, cache: KVCache) -> DecodeStack | None:
        """The native stack of this model's blocks over `cache`, where the model qualifies."""
        if not self.stack_possible:
            return None
        if self._stack is None or self._stack.cache is not cache:
            self._stack = DecodeStack(self, cache)
        return self._stack

    def new_cache(self, num_blocks: int, block_size: int) -> KVCache:
        return KVCache(self.cfg.num_layers, self.plan.num_kv_heads, self.cfg.head_dim,
                       num_blocks, block_size, self.dtype, self.device)

    def batch(self, step: StepInput, cache: KVCache) -> Batch:
        positions = step.positions.to(self.device)
        return Batch(
            input_ids=step.input_ids.to(self.device),
            positions=positions,
            logits_indices=step.logits_indices.to(self.device),
            attn=AttentionMetadata.build(step, cache.block_size, self.windows, self.plan.num_kv_heads,
                                         cache.blocks_per_head, self.device, self.kernels.decode_attention,
                                         self.kernels.paged_prefill(self.cfg.head_dim)),
            rope=self.rope.tables(positions) if self.rope is not None else None,
            ops=self.kernels.ops(positions.shape[0]),
        )

    def decode_batch(self, step: StepInput) -> Batch:
        """A decode-only step whose tensors are already on this rank's device, built without reading
        anything back to the host (`worker.cuda_graphs` captures it). Needs a decode kernel."""
        if self.kernels.decode_attention is None:
            raise ValueError(f"decode steps without host reads need a paged decode kernel "
                             f"(kernels '{self.kernels.name}' have none)")
        return Batch(
            input_ids=step.input_ids,
            positions=step.positions,
            logits_indices=step.logits_indices,
            attn=AttentionMetadata.for_decodes(step.slot_mapping, step.block_tables, step.context_lens,
                                               self.kernels.decode_attention),
            rope=self.rope.tables(step.positions) if self.rope is not None else None,
            ops=self.kernels.ops(step.num_tokens),
        )

    @torch.inference_mode()
    def __call__(self, batch: Batch, cache: KVCache) -> torch.Tensor | None:
        """Next-token logits (len(logits_indices), vocab) on rank 0; None on the other ranks."""
        x = self.embed(batch.input_ids)  # (tokens, hidden), all-reduced
        if self.pos_embed is not None:
            x = x + F.embedding(batch.positions, self.pos_embed)
        stack = self.decode_stack(cache)
        if stack is not None and stack.serves(batch):
            x, delta = stack(x, batch)
        else:
            delta = None
            for layer, layer_cache in zip(self.layers, cache.layers):
                x, delta = layer(x, delta, batch, layer_cache)
        idx = batch.logits_indices
        if idx.shape[0] != x.shape[0]:  # only the wanted rows (ascending, so as many as rows is all of them)
            x, delta = x[idx], delta[idx]
        _, x = self.norm.add_norm(x, delta, batch.ops)
        return self.lm_head(x)  # gathered on rank 0
