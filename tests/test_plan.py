"""The sharding plan's invariants, its errors, and the `tpserve plan` report."""

from __future__ import annotations

import itertools

import pytest

from cluster.cli import main
from sharding.arch import ModelConfig
from sharding.plan import PlanError, ShardingPlan, Split, balanced_split, partition_heads, vocab_ranges

HEAD_SHAPES = [(q, kv) for q, kv in itertools.product(range(1, 33), range(1, 17)) if q % kv == 0]


@pytest.mark.parametrize("heads, kv", HEAD_SHAPES)
def test_partition_heads_invariants(heads, kv):
    group = heads // kv
    for tp in range(1, heads + 1):
        p = partition_heads(heads, kv, tp)
        assert [r for a, b in p.q for r in range(a, b)] == list(range(heads)), "each q head exactly once"
        for (qa, qb), (ka, kb) in zip(p.q, p.kv):
            assert qb > qa and kb > ka, "every rank has a head"
            # a rank's query heads read only KV heads it holds
            assert all(ka <= h // group < kb for h in range(qa, qb))
        if tp <= kv:  # whole groups: KV heads split as evenly as integers allow
            sizes = [b - a for a, b in p.kv]
            assert max(sizes) - min(sizes) <= 1
        else:  # one (replicated) KV head per rank
            assert all(b - a == 1 for a, b in p.kv)
            assert {a for a, _ in p.kv} == set(range(kv))


def test_partition_heads_errors_show_numbers():
    with pytest.raises(PlanError, match=r"tensor_parallel_size=10 exceeds the model's 9 query heads"):
        partition_heads(9, 3, 10)
    with pytest.raises(PlanError, match=r"10 query heads are not a multiple of 4 KV heads"):
        partition_heads(10, 4, 2)


def test_balanced_split_and_vocab_padding():
    assert balanced_split(10, 3) == [(0, 4), (4, 7), (7, 10)]
    padded, ranges = vocab_ranges(101, 4)
    assert padded == 104 and ranges[-1] == (78, 104)


def smol(**over):
    c = dict(model_type="llama", vocab_size=49152, hidden_size=576, num_hidden_layers=30,
             num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536, tie_word_embeddings=True)
    return ModelConfig.from_hf({**c, **over})


@pytest.mark.parametrize("tp", [1, 2, 3, 4, 5, 9])
def test_plan_covers_every_weight_once(tp):
    """Column/row/vocab shards of each tensor tile it exactly; replicated parts are whole."""
    plan = ShardingPlan.build(smol(vocab_size=49153), tp)
    covered = {}
    for rank in plan.ranks:
        for w in rank.weights:
            if w.tied_to:
                continue
            for p in w.parts:
                full = plan.tensor_shapes[p.tensor][p.dim]
                if w.split is Split.REPLICATED:
                    assert (p.start, p.stop) == (0, full)
                else:
                    covered.setdefault((p.tensor, p.dim), []).append((p.start, p.stop))
    replicated_kv = tp > 3
    for (tensor, dim), spans in covered.items():
        if replicated_kv and ("k_proj" in tensor or "v_proj" in tensor):
            spans = set(spans)  # ranks sharing a KV head hold the same rows
        spans = sorted(spans)
        full = plan.tensor_shapes[tensor][dim]
        assert spans[0][0] == 0 and spans[-1][1] == full, tensor
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), f"{tensor}: gap or overlap"


def test_uneven_plan_bytes():
    plan = ShardingPlan.build(smol(), 2)
    r0, r1 = plan.ranks
    assert (r0.num_heads, r0.num_kv_heads, r1.num_heads, r1.num_kv_heads) == (6, 2, 3, 1)
    # rank 0 holds 2/3 of the attention weights, rank 1 a third; everything else halves
    attn = 30 * 4 * (576 * 64 * (9 + 3 + 3 + 9))
    rest = 4 * (30 * 3 * 576 * 1536 + 49152 * 576)
    norms = 4 * (61 * 576)
    assert r0.bytes("float32") == attn * 2 // 3 + rest // 2 + norms
    assert r1.bytes("float32") == attn // 3 + rest // 2 + norms


def test_plan_command_prints_shards_and_collectives(capsys, smollm2_dir):
    assert main(["plan", smollm2_dir, "--tp", "2"]) == 0
    out = capsys.readouterr().out
    assert "query heads 6 + 3, KV heads 2 + 1" in out
    assert "blocks 0–29 (30 identical, shown once)" in out
    assert "model.layers.{i}.self_attn.q_proj.weight" in out and "384 × 576  864.0 KiB" in out
    assert "2 all-reduces of 2304 B" in out
    plan = ShardingPlan.build(ModelConfig.from_dir(smollm2_dir), 2)
    for r in plan.ranks:
        assert f"rank {r.rank}: {r.bytes('float32') / 2**20:.1f} MiB" in out


def test_plan_command_refuses_impossible_tp_in_one_line(capsys, smollm2_dir):
    assert main(["plan", smollm2_dir, "--tp", "12"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "exceeds the model's 9 query heads" in err
