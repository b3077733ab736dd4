"""The CUDA-graph machinery that runs on any device: bucket sizes, padding a decode step, the static
buffers a graph replays from, and the runner's choice of graph or eager step.

On CPU, `DecodeGraphs(capture=False)` runs each "replay" eagerly on the static buffers, so what is
tested here is everything but the capture itself: a padded step's logits, cut back to its real
rows, equal the unpadded step's, and padded rows write nothing but the cache's pad block.
(The capture itself runs in `make gpu-check`.)"""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest
import torch
import transformers as tf

from sharding.arch import ModelConfig
from sharding.group import TPGroup
from sharding.plan import ShardingPlan
from worker.cuda_graphs import DecodeGraphs, bucket_for, bucket_sizes, pad_decodes
from worker.engine import Engine, Request
from worker.kv_cache import BlockManager
from worker.runner import ModelRunner
from worker.sampling import SamplingParams
from worker.step import StepInput

BS = 4  # tokens per block: sequences span several blocks


def test_bucket_sizes():
    assert bucket_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert bucket_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert bucket_sizes(3) == [1, 2, 3]
    assert bucket_sizes(1) == [1]
    sizes = bucket_sizes(64)
    assert [bucket_for(n, sizes) for n in (1, 3, 5, 8, 9, 17, 63, 64, 65)] == [1, 4, 8, 8, 16, 24, 64, 64, None]


def _decode_step(tables: list[list[int]], lens: list[int]) -> StepInput:
    return StepInput.build([([7 + i], n - 1, t) for i, (t, n) in enumerate(zip(tables, lens))], BS)


def test_pad_decodes_layout():
    step = _decode_step([[5, 9], [3], [8, 2, 6]], [6, 2, 11])
    padded = pad_decodes(step, 4, 5, pad_block=40, block_size=BS)
    assert padded.num_seqs == padded.num_decodes == padded.num_tokens == 4
    assert padded.input_ids.tolist() == [7, 8, 9, 0]
    assert padded.positions.tolist() == [5, 1, 10, 0]
    assert padded.slot_mapping.tolist() == [9 * BS + 1, 3 * BS + 1, 6 * BS + 2, 40 * BS]
    assert padded.context_lens.tolist() == [6, 2, 11, 1]
    # the step's own padding (0, never read) stays; the new columns and rows name the pad block
    assert padded.block_tables.tolist() == [[5, 9, 0, 40, 40], [3, 0, 0, 40, 40], [8, 2, 6, 40, 40],
                                            [40, 40, 40, 40, 40]]
    assert padded.logits_indices.tolist() == [0, 1, 2, 3]
    # the wire layout round-trips: peers receive padded steps like any other
    again = StepInput.from_wire(padded.header(), padded.payload())
    assert torch.equal(again.block_tables, padded.block_tables) and again.num_decodes == 4


def test_pad_decodes_refuses_what_it_cannot_pad():
    prefill = StepInput.build([([1, 2, 3], 0, [0])], BS)
    with pytest.raises(ValueError, match="decode-only"):
        pad_decodes(prefill, 4, 4, 9, BS)
    step = _decode_step([[1, 2, 3]], [10])
    with pytest.raises(ValueError, match="does not fit"):
        pad_decodes(step, 4, 2, 9, BS)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A random Llama with uneven heads (9 q / 3 kv), float32."""
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=72, head_dim=8, intermediate_size=100, num_hidden_layers=2,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=101,
                         max_position_embeddings=128, initializer_range=0.2, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("llama-graphs")
    tf.LlamaForCausalLM(cfg).eval().save_pretrained(path)
    return str(path)


def _runner(path, kernels="auto", num_blocks=160) -> ModelRunner:
    cfg = ModelConfig.from_dir(path)
    plan = ShardingPlan.build(cfg, 1)
    runner, _ = ModelRunner.load(path, cfg, plan.ranks[0], TPGroup.single(), dtype="float32",
                                 num_blocks=num_blocks, block_size=BS, max_positions=128, kernels=kernels)
    return runner


def _prefilled(runner: ModelRunner, n: int, seed: int):
    """n sequences of random lengths prefilled into scattered blocks; their next decode step."""
    rng = random.Random(seed)
    bm = BlockManager(runner.cache.num_blocks, BS)
    order = list(bm._free)
    rng.shuffle(order)
    bm._free = OrderedDict.fromkeys(order)  # scattered blocks, in no order
    prompts = [[rng.randrange(1, 100) for _ in range(rng.randint(1, 30))] for _ in range(n)]
    runner.run(StepInput.build([(p, 0, bm.allocate(i, len(p))) for i, p in enumerate(prompts)], BS))
    return StepInput.build([([rng.randrange(1, 100)], len(p), bm.allocate(i, len(p) + 1))
                            for i, p in enumerate(prompts)], BS)


def _cache_state(runner):
    return [(layer.k.clone(), layer.v.clone()) for layer in runner.cache.layers]


@pytest.mark.parametrize("kernels,n", [("auto", 1), ("auto", 3), ("auto", 5), ("auto", 8), ("auto", 13),
                                       ("auto", 17), ("triton", 3), ("triton", 9)])
def test_padded_step_equals_unpadded(llama_dir, kernels, n):
    """("triton": the CUDA kernels, under Triton's interpreter on CPU: what a graph captures.)"""
    eager, graphed = _runner(llama_dir, kernels), _runner(llama_dir, kernels)
    graphs = DecodeGraphs(graphed.model, graphed.cache, 24, capture=False)
    step = _prefilled(eager, n, seed=n)
    assert torch.equal(_prefilled(graphed, n, seed=n).payload(), step.payload())
    assert graphs.fits(step)
    want = eager.run(step)
    got = graphs.run(step)
    assert graphs.buckets.keys() == {bucket_for(n, graphs.sizes)}
    assert got.shape == want.shape
    # Not bit for bit: the matrix kernels tile rows, and 3 rows or 4 take different tiles.
    torch.testing.assert_close(got, want, atol=2e-6, rtol=0)
    pad = graphed.cache.pad_block
    for (ek, ev), (gk, gv) in zip(_cache_state(eager), _cache_state(graphed)):
        # every block but the pad block holds exactly what the unpadded step wrote
        assert torch.equal(ek[:, :pad], gk[:, :pad]) and torch.equal(ev[:, :pad], gv[:, :pad])


def test_buffers_are_reused_across_steps(llama_dir):
    """A second step of the same bucket goes through the same static buffer."""
    eager, graphed = _runner(llama_dir), _runner(llama_dir)
    graphs = DecodeGraphs(graphed.model, graphed.cache, 8, capture=False)
    for seed in (1, 2):
        step = _prefilled(eager, 3, seed=seed)
        _prefilled(graphed, 3, seed=seed)
        buffer = graphs.buckets[4].buffer if 4 in graphs.buckets else None
        torch.testing.assert_close(graphs.run(step), eager.run(step), atol=2e-6, rtol=0)
        assert buffer is None or graphs.buckets[4].buffer is buffer


def test_capture_graphs_brings_every_bucket_in_through_the_pad_block(llama_dir):
    runner = _runner(llama_dir)
    runner.graphs = DecodeGraphs(runner.model, runner.cache, 20, capture=False)
    step = _prefilled(runner, 3, seed=4)
    before = _cache_state(runner)
    runner.capture_graphs()
    assert sorted(runner.graphs.buckets) == [1, 2, 4, 8, 16, 20]
    pad = runner.cache.pad_block
    for (bk, bv), (ak, av) in zip(before, _cache_state(runner)):
        assert torch.equal(bk[:, :pad], ak[:, :pad]) and torch.equal(bv[:, :pad], av[:, :pad])
    assert not torch.equal(before[0][0][:, pad], runner.cache.layers[0].k[:, pad])  # it did run
    eager = _runner(llama_dir)
    assert torch.equal(_prefilled(eager, 3, seed=4).payload(), step.payload())
    torch.testing.assert_close(runner.run(step), eager.run(step), atol=2e-6, rtol=0)


def test_what_does_not_fit_runs_eagerly(llama_dir):
    runner = _runner(llama_dir)
    graphs = DecodeGraphs(runner.model, runner.cache, 4, capture=False)
    assert not graphs.fits(StepInput.build([([1, 2], 0, [0])], BS))  # a prefill
    assert not graphs.fits(_prefilled(runner, 5, seed=0))  # more sequences than the largest bucket
    mixed = StepInput.build([([3], 4, [1, 2]), ([4, 5], 0, [3])], BS)
    assert not graphs.fits(mixed)


def test_graphs_need_capturable_collectives_and_a_decode_kernel(llama_dir):
    runner = _runner(llama_dir)
    with pytest.raises(ValueError, match="paged decode-attention kernel"):
        torch_runner = _runner(llama_dir, kernels="torch")
        DecodeGraphs(torch_runner.model, torch_runner.cache, 8, capture=False)
    runner.model.group = TPGroup(rank=0, world_size=2, device=torch.device("cpu"), backend="gloo")
    with pytest.raises(ValueError, match="NCCL"):
        DecodeGraphs(runner.model, runner.cache, 8, capture=True)


def test_engine_with_graphs_gives_the_eager_tokens(llama_dir):
    """The engine's decode steps through DecodeGraphs (and eager prefills) produce the tokens of
    the plain runner, for a batch whose size changes as requests finish."""
    def engine(with_graphs):
        runner = _runner(llama_dir, num_blocks=128)
        if with_graphs:
            runner.graphs = DecodeGraphs(runner.model, runner.cache, 16, capture=False)
        return Engine(runner, tokenizer=None, eos_token_ids=(), vocab_size=101, max_batch_size=16,
                      max_tokens_per_step=64, max_model_len=128, num_blocks=128)

    rng = random.Random(5)
    reqs = [([rng.randrange(1, 100) for _ in range(rng.randint(2, 20))], rng.randint(3, 12)) for _ in range(11)]
    outputs = []
    for with_graphs in (False, True):
        e = engine(with_graphs)
        for i, (p, n) in enumerate(reqs):
            e.add_request(Request(str(i), p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)))
        tokens = {str(i): [] for i in range(len(reqs))}
        while e.has_work:
            for out in e.step():
                tokens[out.request_id] += out.token_ids
        outputs.append(tokens)
        if with_graphs:
            assert len(e.runner.graphs.buckets) >= 2, "several bucket sizes were used"
    assert outputs[0] == outputs[1]
