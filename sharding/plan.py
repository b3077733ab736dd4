"""The sharding plan: which slice of which checkpoint tensor every rank holds.

A linear layer computes y = x Aᵀ (+ b). With p ranks:

* column-parallel: A = [A₁; …; Aₚ] split by output rows. Rank r computes yᵣ = x Aᵣᵀ, a complete
  slice of y; no communication. Q/K/V and the MLP's gate/up (GPT-2: c_attn, c_fc).
* row-parallel: A = [A₁ … Aₚ] split by input columns. Rank r holds the matching slice xᵣ of the
  activations and computes the partial sum x_r A_rᵀ; y = Σᵣ xᵣ Aᵣᵀ needs an all-reduce, and the bias
  is added once, after it. The attention output and the MLP down projection (GPT-2: c_proj).
* vocab-parallel: the embedding and LM head are split by vocabulary rows, the vocabulary padded to a
  multiple of p.
* replicated: norms, learned positions, row-parallel biases.

Attention heads are the unit of Q/K/V splitting; a rank's query heads sit with the KV head they read
(`partition_heads`). Fused checkpoint tensors (GPT-2 ``c_attn``, Phi-3 ``qkv_proj`` and
``gate_up_proj``) are split per part: a rank's wqkv is [its q rows; its k rows; its v rows].

The plan is a pure function of the model config and the TP size; the controller computes it and
each rank's loader reads exactly the `Part`s of its `RankPlan` from disk.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Collection

from sharding.arch import ModelConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class PlanError(ValueError):
    """The model cannot be laid out over the requested number of ranks."""


def balanced_split(n: int, parts: int) -> list[tuple[int, int]]:
    """[start, stop) ranges covering range(n) in `parts` pieces whose sizes differ by at most one."""
    base, extra = divmod(n, parts)
    ranges, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        ranges.append((start, stop))
        start = stop
    return ranges


@dataclass(frozen=True)
class HeadPartition:
    """Per rank, the [start, stop) ranges of query heads and of KV heads it holds."""

    q: tuple[tuple[int, int], ...]
    kv: tuple[tuple[int, int], ...]

    def num_q(self, rank: int) -> int:
        return self.q[rank][1] - self.q[rank][0]

    def num_kv(self, rank: int) -> int:
        return self.kv[rank][1] - self.kv[rank][0]


def partition_heads(num_heads: int, num_kv_heads: int, tp: int) -> HeadPartition:
    """Group-aligned, as balanced as possible.

    tp <= KV heads: KV heads are split in contiguous chunks (sizes differ by at most one) and each
    rank takes all query heads of its KV heads -- e.g. 9 q / 3 kv on 2 ranks: q 6+3, kv 2+1.
    tp > KV heads: every rank holds one KV head (so KV heads are replicated); the ranks sharing a
    KV head split its query heads -- e.g. 9 q / 3 kv on 4 ranks: q 2+1+3+3, kv 0,0,1,2.
    """
    if tp < 1:
        raise PlanError(f"tensor_parallel_size must be >= 1, got {tp}")
    if num_heads % num_kv_heads:
        raise PlanError(
            f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads"
        )
    if tp > num_heads:
        raise PlanError(
            f"tensor_parallel_size={tp} exceeds the model's {num_heads} query heads: "
            f"every rank needs at least one head (use at most {num_heads} ranks)"
        )
    group = num_heads // num_kv_heads
    if tp <= num_kv_heads:
        kv = balanced_split(num_kv_heads, tp)
        q = [(a * group, b * group) for a, b in kv]
        return HeadPartition(tuple(q), tuple(kv))
    q, kv = [], []
    for head, (r0, r1) in enumerate(balanced_split(tp, num_kv_heads)):
        for a, b in balanced_split(group, r1 - r0):
            q.append((head * group + a, head * group + b))
            kv.append((head, head + 1))
    return HeadPartition(tuple(q), tuple(kv))


def vocab_ranges(vocab_size: int, tp: int) -> tuple[int, list[tuple[int, int]]]:
    """The padded vocabulary (a multiple of tp) and each rank's [start, stop) within it."""
    per_rank = -(-vocab_size // tp)
    return per_rank * tp, [(r * per_rank, (r + 1) * per_rank) for r in range(tp)]


class Split(enum.Enum):
    REPLICATED = "replicated"
    COLUMN = "column"
    ROW = "row"
    VOCAB = "vocab"


@dataclass(frozen=True)
class Part:
    """Rows [start, stop) of checkpoint tensor `tensor` along dimension `dim`."""

    tensor: str
    dim: int
    start: int
    stop: int


@dataclass(frozen=True)
class LocalWeight:
    """One parameter of one rank: its parts read from disk, concatenated along their dim,
    transposed when the checkpoint stores (in, out) Conv1D weights, then `pad` zero rows appended
    (vocab padding). `tied_to` names a weight this one shares storage with (tied LM head)."""

    name: str
    split: Split
    parts: tuple[Part, ...]
    shape: tuple[int, ...]
    transpose: bool = False
    pad: int = 0
    tied_to: str | None = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class RankPlan:
    rank: int
    tp: int
    num_heads: int  # local query heads
    num_kv_heads: int  # local KV heads
    intermediate_size: int  # local MLP width
    vocab_start: int  # this rank's rows of the padded vocabulary
    vocab_stop: int
    weights: tuple[LocalWeight, ...]

    def bytes(self, dtype: str) -> int:
        """Parameter bytes this rank loads: its slices plus the replicated parts in full."""
        size = DTYPE_BYTES[dtype]
        return sum(w.numel * size for w in self.weights if w.tied_to is None)


@dataclass(frozen=True)
class ShardingPlan:
    config: ModelConfig
    tp: int
    heads: HeadPartition
    padded_vocab: int
    ranks: tuple[RankPlan, ...]
    tensor_shapes: dict  # checkpoint tensor name -> full shape, in the checkpoint's layout

    @classmethod
    def build(cls, cfg: ModelConfig, tp: int, names: Collection[str] | None = None) -> "ShardingPlan":
        """`names`: the checkpoint's tensor names, to pick its naming variant; None = the usual one."""
        heads = partition_heads(cfg.num_heads, cfg.num_kv_heads, tp)
        if cfg.intermediate_size < tp:
            raise PlanError(
                f"tensor_parallel_size={tp} exceeds the MLP width {cfg.intermediate_size}"
            )
        padded_vocab, vocab = vocab_ranges(cfg.vocab_size, tp)
        layout = _Layout(cfg, tp, heads, vocab, names)
        per_rank = layout.weights()
        ffn = balanced_split(cfg.intermediate_size, tp)
        ranks = tuple(
            RankPlan(
                rank=r,
                tp=tp,
                num_heads=heads.num_q(r),
                num_kv_heads=heads.num_kv(r),
                intermediate_size=ffn[r][1] - ffn[r][0],
                vocab_start=vocab[r][0],
                vocab_stop=vocab[r][1],
                weights=tuple(w[r] for w in per_rank),
            )
            for r in range(tp)
        )
        return cls(cfg, tp, heads, padded_vocab, ranks, layout.shapes)


class _Layout:
    """Builds, weight by weight, the per-rank `LocalWeight`s for one architecture's naming."""

    def __init__(self, cfg, tp, heads, vocab, names):
        self.cfg, self.tp, self.heads, self.vocab = cfg, tp, heads, vocab
        self.names = set(names) if names is not None else None
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.ffn = balanced_split(cfg.intermediate_size, tp)

    # -- generic placements -------------------------------------------------------------------
    def _note(self, tensor: str, shape: tuple[int, ...]) -> str:
        self.shapes[tensor] = shape
        return tensor

    def replicated(self, name, tensor, shape):
        self._note(tensor, shape)
        part = Part(tensor, 0, 0, shape[0])
        return [LocalWeight(name, Split.REPLICATED, (part,), shape) for _ in range(self.tp)]

    def sharded(self, name, split, sources, dim, other, transpose=False):
        """sources: (tensor, offset, per-rank ranges) for each part, concatenated in order along
        `dim`; `other` is the size of the dimension that is not split."""
        out = []
        for r in range(self.tp):
            parts = tuple(Part(t, dim, off + rs[r][0], off + rs[r][1]) for t, off, rs in sources)
            rows = sum(p.stop - p.start for p in parts)
            local = (rows, other) if dim == 0 else (other, rows)
            shape = local[::-1] if transpose else local
            out.append(LocalWeight(name, split, parts, shape, transpose))
        return out

    def vocab_split(self, name, tensor, tied_to=None):
        cfg = self.cfg
        self._note(tensor, (cfg.vocab_size, cfg.hidden_size))
        out = []
        for start, stop in self.vocab:
            real = max(0, min(stop, cfg.vocab_size) - start)
            parts = (Part(tensor, 0, start, start + real),) if real else ()
            out.append(
                LocalWeight(
                    name, Split.VOCAB, parts, (stop - start, cfg.hidden_size),
                    pad=stop - start - real, tied_to=tied_to,
                )
            )
        return out

    def _rows(self, ranges, unit):
        return [(a * unit, b * unit) for a, b in ranges]

    # -- the model ----------------------------------------------------------------------------
    def weights(self) -> list[list[LocalWeight]]:
        cfg = self.cfg
        gpt2 = cfg.family == "gpt2"
        p = self._prefix()
        emb = f"{p}wte.weight" if gpt2 else f"{p}embed_tokens.weight"
        ws = [self.vocab_split("embed.weight", emb)]
        if gpt2:
            ws.append(self.replicated("pos_embed.weight", f"{p}wpe.weight",
                                      (cfg.max_positions, cfg.hidden_size)))
        for i in range(cfg.num_layers):
            ws += self._gpt2_layer(i, p) if gpt2 else self._llama_layer(i, p)
        norm = f"{p}ln_f" if gpt2 else f"{p}norm"
        ws += self._norm("norm", norm, bias=gpt2)
        if cfg.tie_embeddings:
            ws.append(self.vocab_split("lm_head.weight", emb, tied_to="embed.weight"))
        else:
            ws.append(self.vocab_split("lm_head.weight", "lm_head.weight"))
        return ws

    def _prefix(self) -> str:
        root = "transformer." if self.cfg.family == "gpt2" else "model."
        probe = "wte.weight" if self.cfg.family == "gpt2" else "embed_tokens.weight"
        if self.names is not None and root + probe not in self.names and probe in self.names:
            return ""
        return root

    def _has(self, tensor: str) -> bool:
        return self.names is not None and tensor in self.names

    def _norm(self, name, tensor_prefix, bias):
        h = self.cfg.hidden_size
        ws = [self.replicated(f"{name}.weight", f"{tensor_prefix}.weight", (h,))]
        if bias:
            ws.append(self.replicated(f"{name}.bias", f"{tensor_prefix}.bias", (h,)))
        return ws

    def _qkv_sources(self, q, k, v, fused: bool):
        """(tensor, offset, per-rank row ranges) of the q, k and v parts."""
        cfg, d = self.cfg, self.cfg.head_dim
        q_rows = self._rows(self.heads.q, d)
        kv_rows = self._rows(self.heads.kv, d)
        if fused:  # one tensor [q; k; v] along the split dim
            nq, nkv = cfg.num_heads * d, cfg.num_kv_heads * d
            return [(q, 0, q_rows), (q, nq, kv_rows), (q, nq + nkv, kv_rows)]
        return [(q, 0, q_rows), (k, 0, kv_rows), (v, 0, kv_rows)]

    def _llama_layer(self, i, p):
        cfg, h = self.cfg, self.cfg.hidden_size
        a, m = f"{p}layers.{i}.self_attn", f"{p}layers.{i}.mlp"
        qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        fused_qkv = self._has(f"{a}.qkv_proj.weight") or (self.names is None and cfg.model_type == "phi3")
        ws = self._norm(f"layers.{i}.attn_norm", f"{p}layers.{i}.input_layernorm", bias=False)
        for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            if fused_qkv:
                t = self._note(f"{a}.qkv_proj.{kind}", (qkv_out, h) if kind == "weight" else (qkv_out,))
                src = self._qkv_sources(t, t, t, fused=True)
            else:
                shp = (lambda n: (n, h)) if kind == "weight" else (lambda n: (n,))
                q = self._note(f"{a}.q_proj.{kind}", shp(q_out))
                k = self._note(f"{a}.k_proj.{kind}", shp(kv_out))
                v = self._note(f"{a}.v_proj.{kind}", shp(kv_out))
                src = self._qkv_sources(q, k, v, fused=False)
            if kind == "weight":
                ws.append(self.sharded(f"layers.{i}.wqkv.weight", Split.COLUMN, src, 0, h))
            else:
                ws.append(self._bias(f"layers.{i}.wqkv.bias", src))
        o = self._note(f"{a}.o_proj.weight", (h, q_out))
        ws.append(self.sharded(f"layers.{i}.wo.weight", Split.ROW,
                               [(o, 0, self._rows(self.heads.q, cfg.head_dim))], 1, h))
        if cfg.o_bias:
            ws.append(self.replicated(f"layers.{i}.wo.bias", f"{a}.o_proj.bias", (h,)))
        ws += self._norm(f"layers.{i}.mlp_norm", f"{p}layers.{i}.post_attention_layernorm", bias=False)
        inter = cfg.intermediate_size
        if self._has(f"{m}.gate_up_proj.weight") or (self.names is None and cfg.model_type == "phi3"):
            gu = self._note(f"{m}.gate_up_proj.weight", (2 * inter, h))
            src = [(gu, 0, self.ffn), (gu, inter, self.ffn)]
        else:
            g = self._note(f"{m}.gate_proj.weight", (inter, h))
            u = self._note(f"{m}.up_proj.weight", (inter, h))
            src = [(g, 0, self.ffn), (u, 0, self.ffn)]
        ws.append(self.sharded(f"layers.{i}.w_in.weight", Split.COLUMN, src, 0, h))
        if cfg.mlp_bias:
            gb = self._note(f"{m}.gate_proj.bias", (inter,))
            ub = self._note(f"{m}.up_proj.bias", (inter,))
            ws.append(self._bias(f"layers.{i}.w_in.bias", [(gb, 0, self.ffn), (ub, 0, self.ffn)]))
        d = self._note(f"{m}.down_proj.weight", (h, inter))
        ws.append(self.sharded(f"layers.{i}.w_out.weight", Split.ROW, [(d, 0, self.ffn)], 1, h))
        if cfg.mlp_bias:
            ws.append(self.replicated(f"layers.{i}.w_out.bias", f"{m}.down_proj.bias", (h,)))
        return ws

    def _bias(self, name, sources):
        out = []
        for r in range(self.tp):
            parts = tuple(Part(t, 0, off + rs[r][0], off + rs[r][1]) for t, off, rs in sources)
            out.append(LocalWeight(name, Split.COLUMN, parts, (sum(x.stop - x.start for x in parts),)))
        return out

    def _gpt2_layer(self, i, p):
        cfg, h = self.cfg, self.cfg.hidden_size
        b = f"{p}h.{i}"
        inter = cfg.intermediate_size
        ws = self._norm(f"layers.{i}.attn_norm", f"{b}.ln_1", bias=True)
        # Conv1D stores (in, out): column-parallel splits dim 1, row-parallel dim 0.
        c_attn = self._note(f"{b}.attn.c_attn.weight", (h, 3 * h))
        src = self._qkv_sources(c_attn, c_attn, c_attn, fused=True)
        ws.append(self.sharded(f"layers.{i}.wqkv.weight", Split.COLUMN, src, 1, h, transpose=True))
        c_attn_b = self._note(f"{b}.attn.c_attn.bias", (3 * h,))
        ws.append(self._bias(f"layers.{i}.wqkv.bias", self._qkv_sources(c_attn_b, c_attn_b, c_attn_b, True)))
        proj = self._note(f"{b}.attn.c_proj.weight", (h, h))
        ws.append(self.sharded(f"layers.{i}.wo.weight", Split.ROW,
                               [(proj, 0, self._rows(self.heads.q, cfg.head_dim))], 0, h, transpose=True))
        ws.append(self.replicated(f"layers.{i}.wo.bias", f"{b}.attn.c_proj.bias", (h,)))
        ws += self._norm(f"layers.{i}.mlp_norm", f"{b}.ln_2", bias=True)
        fc = self._note(f"{b}.mlp.c_fc.weight", (h, inter))
        ws.append(self.sharded(f"layers.{i}.w_in.weight", Split.COLUMN, [(fc, 0, self.ffn)], 1, h, transpose=True))
        fc_b = self._note(f"{b}.mlp.c_fc.bias", (inter,))
        ws.append(self._bias(f"layers.{i}.w_in.bias", [(fc_b, 0, self.ffn)]))
        out = self._note(f"{b}.mlp.c_proj.weight", (inter, h))
        ws.append(self.sharded(f"layers.{i}.w_out.weight", Split.ROW, [(out, 0, self.ffn)], 0, h, transpose=True))
        ws.append(self.replicated(f"layers.{i}.w_out.bias", f"{b}.mlp.c_proj.bias", (h,)))
        return ws
