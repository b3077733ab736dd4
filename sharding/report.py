"""A person-readable account of a sharding plan: what each rank's dot products cover.

`format_plan(plan, dtype)` lists every checkpoint tensor with its shape, how it is split, and each
rank's shard shape and bytes -- identical blocks shown once -- then the collectives per block with
the bytes they move per token, and each rank's total. It is what ``tpserve plan`` prints.
"""

from __future__ import annotations

import re
from collections import defaultdict

from sharding.plan import DTYPE_BYTES, ShardingPlan, Split

_BLOCK = re.compile(r"(?<=\.)(layers|h)\.(\d+)\.")
SPLIT_WORDS = {
    Split.REPLICATED: "replicated",
    Split.COLUMN: "column (out rows)",
    Split.ROW: "row (in cols)",
    Split.VOCAB: "vocab rows",
}


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _dims(shape) -> str:
    return " × ".join(str(s) for s in shape)


def _shards(plan: ShardingPlan) -> dict[str, list]:
    """checkpoint tensor -> per rank (local shape in the checkpoint's layout, split kind)."""
    out: dict[str, list] = defaultdict(lambda: [None] * plan.tp)
    for rank in plan.ranks:
        for w in rank.weights:
            if w.tied_to is not None:
                continue
            rows: dict[str, int] = defaultdict(int)
            for p in w.parts:
                rows[p.tensor] += p.stop - p.start
            for tensor, n in rows.items():
                full = list(plan.tensor_shapes[tensor])
                dim = next(p.dim for p in w.parts if p.tensor == tensor)
                full[dim] = n
                out[tensor][rank.rank] = (tuple(full), w.split)
    return out


def _rows(plan: ShardingPlan, dtype: str) -> list[tuple[str, list[str]]]:
    size = DTYPE_BYTES[dtype]
    rows = []
    for tensor, per_rank in _shards(plan).items():
        split = next(s for _, s in per_rank if s is not None)
        cells = []
        for shard in per_rank:
            shape = shard[0] if shard else (0,)
            n = 1
            for s in shape:
                n *= s
            cells.append(f"{_dims(shape)}  {_size(n * size)}")
        rows.append((tensor, [_dims(plan.tensor_shapes[tensor]), SPLIT_WORDS[split], *cells]))
    return rows


def _group_blocks(rows):
    """Rows outside blocks stay; block rows are templated ({i}) and identical blocks merged."""
    head, tail, blocks = [], [], defaultdict(list)
    seen_block = False
    for name, cells in rows:
        m = _BLOCK.search(name)
        if m:
            seen_block = True
            blocks[int(m.group(2))].append((_BLOCK.sub(r"\1.{i}.", name), cells))
        else:
            (tail if seen_block else head).append((name, cells))
    groups: list[tuple[list[int], list]] = []
    for i in sorted(blocks):
        if groups and groups[-1][1] == blocks[i]:
            groups[-1][0].append(i)
        else:
            groups.append(([i], blocks[i]))
    return head, groups, tail


def _table(rows, tp: int) -> list[str]:
    header = ["tensor", "shape", "split"] + [f"rank {r}" for r in range(tp)]
    table = [header] + [[name] + cells for name, cells in rows]
    widths = [max(len(r[c]) for r in table) for c in range(len(header))]
    return ["  " + "   ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in table]


def format_plan(plan: ShardingPlan, dtype: str = "float32") -> str:
    cfg, tp = plan.config, plan.tp
    size = DTYPE_BYTES[dtype]
    h = plan.heads
    lines = [
        f"{cfg.model_type}: {cfg.num_layers} blocks, hidden {cfg.hidden_size}, {cfg.num_heads} query / "
        f"{cfg.num_kv_heads} KV heads of {cfg.head_dim}, MLP {cfg.intermediate_size}, vocab {cfg.vocab_size}, {dtype}",
        f"tensor parallel over {tp} rank(s): query heads "
        + " + ".join(str(h.num_q(r)) for r in range(tp))
        + ", KV heads " + " + ".join(str(h.num_kv(r)) for r in range(tp))
        + (" (KV heads replicated)" if tp > cfg.num_kv_heads else "")
        + ", MLP columns " + " + ".join(str(r.intermediate_size) for r in plan.ranks)
        + f", vocab rows {plan.padded_vocab // tp} each"
        + (f" (padded {cfg.vocab_size} → {plan.padded_vocab})" if plan.padded_vocab != cfg.vocab_size else ""),
        "",
    ]
    head, groups, tail = _group_blocks(_rows(plan, dtype))
    lines += ["embedding"] + _table(head, tp) + [""]
    for ids, rows in groups:
        span = f"block {ids[0]}" if len(ids) == 1 else f"blocks {ids[0]}–{ids[-1]} ({len(ids)} identical, shown once)"
        lines += [span] + _table(rows, tp) + [""]
    lines += ["final norm and LM head" + (" (tied to the embedding)" if cfg.tie_embeddings else "")]
    lines += _table(tail, tp) + [""]
    lines += _collectives(plan, size)
    lines += [""] + [
        f"rank {r.rank}: {_size(r.bytes(dtype))} of parameters (its slices plus the replicated parts)"
        for r in plan.ranks
    ]
    return "\n".join(lines)


def _collectives(plan: ShardingPlan, size: int) -> list[str]:
    cfg, tp = plan.config, plan.tp
    if tp == 1:
        return ["collectives: none (one rank)"]
    msg = cfg.hidden_size * size
    ring = 2 * (tp - 1) / tp  # a ring all-reduce sends this fraction of the message per rank
    logits = plan.padded_vocab // tp * size
    return [
        "collectives per token",
        f"  embedding: all-reduce of {cfg.hidden_size} × {size} B = {msg} B (masked lookup; each id lives on one rank)",
        f"  each block: 2 all-reduces of {msg} B -- after the attention output projection (row-parallel) "
        f"and after the MLP down projection (row-parallel); ~{ring * msg:.0f} B sent per rank each",
        f"  all blocks: {2 * cfg.num_layers} all-reduces, {2 * cfg.num_layers * msg} B reduced per token",
        f"  LM head: gather of {plan.padded_vocab // tp} logits × {size} B = {_size(logits)} from each rank to rank 0, "
        "per sampled token",
        "  step plan: one broadcast from rank 0 per step (token ids, positions, KV slots)",
    ]
