"""Prefix caching: the block manager's sharing, reference counts and eviction on their own, then
the engine on the default model, where caching must change nothing but the work done: greedy and
seeded outputs are identical with it on and off, with shared prefixes, preemption and abort, and
a cached prefix is not prefilled again."""

from __future__ import annotations

import pytest

from engine_util import greedy, make_engine, run
from worker.engine import FinishReason, Request
from worker.kv_cache import BlockManager
from worker.sampling import SamplingParams

BS = 4


def fill(bm: BlockManager, seq_id: int, tokens: list[int]) -> list[int]:
    """What the engine does for a prompt: share what is cached, allocate the rest, compute it."""
    cached = bm.share_prefix(seq_id, tokens)
    table = bm.allocate(seq_id, len(tokens))
    bm.commit(seq_id, tokens, len(tokens))
    return cached, list(table)


def test_a_shared_prefix_is_shared_and_only_the_rest_allocated():
    bm = BlockManager(16, BS)
    a = list(range(1, 12))  # 11 tokens: 2 full blocks + 3
    cached, table_a = fill(bm, 0, a)
    assert cached == 0 and len(table_a) == 3 and bm.num_cached == 2
    b = a[:8] + [50, 51, 52, 53, 54]  # same first 2 blocks
    cached, table_b = fill(bm, 1, b)
    assert cached == 8 and table_b[:2] == table_a[:2] and table_b[2] not in table_a
    assert bm.num_used == 3 + 2  # the two shared blocks are counted once
    c = [9] + a[1:]  # differs in its first token: nothing shared
    assert bm.share_prefix(2, c) == 0


def test_the_last_token_is_always_computed_in_a_block_of_its_own():
    """A prompt that is all cached still computes its last token (for its logits), and never in a
    shared block: the last full block is recomputed instead."""
    bm = BlockManager(16, BS)
    p = list(range(1, 9))  # exactly 2 blocks
    fill(bm, 0, p)
    assert bm.share_prefix(1, p) == 4  # one block shared, the second recomputed
    assert bm.share_prefix(2, p + [99]) == 8  # one more token: both blocks shared


def test_shared_blocks_are_freed_exactly_when_their_last_user_ends():
    bm = BlockManager(8, BS)
    p = list(range(1, 10))
    fill(bm, 0, p)
    fill(bm, 1, p[:8] + [70])
    shared = bm.tables[0][:2]
    assert bm.num_used == 3 + 1
    bm.free(0)
    assert bm.num_used == 3 and all(b not in bm._free for b in shared)  # seq 1 still holds them
    bm.free(1)
    assert bm.num_used == 0 and all(b in bm._free for b in shared)
    assert bm.num_cached == 2  # free, and still cached: the next user takes them back
    assert fill(bm, 2, p)[0] == 8


def test_eviction_is_least_recently_freed_first_and_forgets_the_content():
    bm = BlockManager(4, BS)
    old, new = [1, 2, 3, 4, 5], [6, 7, 8, 9, 10]
    fill(bm, 0, old)
    fill(bm, 1, new)
    bm.free(0)
    bm.free(1)
    # 4 blocks: free order is the never-used ones' first, then old's, then new's
    fill(bm, 2, [20, 21, 22, 23, 24, 25, 26, 27, 28])  # 3 blocks: the two unused and old's full one
    assert bm.share_prefix(3, old) == 0  # evicted
    assert bm.share_prefix(4, new) == 4  # survived


def test_a_prefix_whose_parent_was_evicted_is_not_found():
    """Keys chain through content ids: a block whose predecessor lost its content is unreachable,
    never matched by mistake."""
    bm = BlockManager(6, BS)
    p = list(range(1, 14))  # 3 full blocks + 1
    fill(bm, 0, p)
    first = bm.tables[0][0]
    bm.free(0)
    while first in bm._free:  # hand blocks out until the first one's content is gone
        bm.allocate(9, (bm.num_blocks - bm.num_free + 1) * BS)
    assert bm.share_prefix(1, p) == 0


def test_a_block_is_found_only_after_the_same_blocks():
    """K/V depend on everything before them: equal tokens after a different first block are a
    different block."""
    bm = BlockManager(16, BS)
    x, z, y = [1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]
    fill(bm, 0, x + y + [0])
    fill(bm, 1, z + y + [0])
    assert bm.tables[0][1] != bm.tables[1][1]
    assert bm.share_prefix(2, z + y + [3]) == 8
    assert bm.tables[2] == bm.tables[1][:2]  # z's own second block, not x's


def test_duplicates_computed_side_by_side_stay_private():
    bm = BlockManager(8, BS)
    p = list(range(1, 10))
    for seq in (0, 1):  # both admitted before either computed anything
        assert bm.share_prefix(seq, p) == 0
        bm.allocate(seq, len(p))
    for seq in (0, 1):
        bm.commit(seq, p, len(p))
    assert bm.num_cached == 2  # one holder per content
    bm.free(0)
    assert fill(bm, 2, p)[0] == 8


def test_off_means_off():
    bm = BlockManager(8, BS, prefix_caching=False)
    p = list(range(1, 10))
    fill(bm, 0, p)
    assert bm.num_cached == 0 and bm.share_prefix(1, p) == 0


# -- the engine -------------------------------------------------------------------------------------

SYSTEM = ("<|im_start|>system\nYou are a careful assistant. Answer in one short sentence, and "
          "never make anything up. If you do not know, say so.<|im_end|>\n")
QUESTIONS = ["What is the capital of France?", "Name a prime number.", "What colour is the sky?",
             "Who wrote Hamlet?", "What is 2 + 2?", "Name a planet.", "What is water made of?",
             "Name a fruit."]


@pytest.fixture(scope="module")
def prompts(smollm2_dir):
    engine = make_engine(smollm2_dir)
    return [engine.tokenizer.encode(f"{SYSTEM}<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n").ids
            for q in QUESTIONS]


def _requests(prompts, tag):
    reqs = [Request(f"{tag}g{i}", p, greedy(12, ignore_eos=True)) for i, p in enumerate(prompts)]
    reqs += [Request(f"{tag}s{i}", p, SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=7 + i,
                                                     ignore_eos=True)) for i, p in enumerate(prompts[:4])]
    return reqs


def _tokens(done, tag):
    return {k[len(tag):]: v.token_ids for k, v in done.items()}


@pytest.mark.parametrize("num_blocks", [512, 14])
def test_outputs_are_identical_with_caching_on_and_off(smollm2_dir, prompts, num_blocks):
    """Batches sharing a 40-token system prompt, greedy and seeded; with 14 blocks of 16 the pool
    is too small, so sequences are preempted (and find their own blocks cached on return)."""
    results = {}
    for caching in (False, True):
        engine = make_engine(smollm2_dir, num_blocks=num_blocks, max_model_len=224, prefix_caching=caching)
        results[caching] = _tokens(run(engine, _requests(prompts, "x")), "x")
        if num_blocks == 14:
            assert engine.scheduler.num_preemptions > 0
        assert engine.blocks.num_used == 0
        if caching:
            assert engine.scheduler.prefix_hit_tokens > 0
    assert results[True] == results[False]


def test_a_cached_prefix_is_not_prefilled_again(smollm2_dir, prompts):
    engine = make_engine(smollm2_dir)
    run(engine, [Request("first", prompts[0], greedy(4, ignore_eos=True))])
    counts, last = [], [engine.timings.tokens]

    def count(e):  # tokens each step computed
        counts.append(e.timings.tokens - last[0])
        last[0] = e.timings.tokens

    done = run(engine, [Request("second", prompts[1], greedy(4, ignore_eos=True))], on_step=count)
    common = next(i for i, (a, b) in enumerate(zip(prompts[0], prompts[1])) if a != b) // 16 * 16
    assert common >= 32 and engine.scheduler.prefix_hit_tokens == common
    assert counts == [len(prompts[1]) - common, 1, 1, 1]  # the prefill skipped the cached blocks
    assert done["second"].finish_reason is FinishReason.LENGTH


def test_abort_releases_shared_blocks(smollm2_dir, prompts):
    engine = make_engine(smollm2_dir)
    engine.add_request(Request("a", prompts[0], greedy(200, ignore_eos=True)))
    engine.step()  # a's prompt is computed and cached
    engine.add_request(Request("b", prompts[1], greedy(200, ignore_eos=True)))
    for _ in range(2):
        engine.step()
    assert engine.scheduler.prefix_hit_tokens > 0  # b shares a's system prompt
    engine.abort("a")
    engine.step()
    assert engine.blocks.num_used > 0  # b still runs on the shared blocks
    engine.abort("b")
    engine.step()
    assert engine.blocks.num_used == 0 and not engine.has_work


def test_outputs_do_not_depend_on_the_block_size(smollm2_dir, prompts):
    """128-token blocks (the CPU default of a served replica) against 16: the same tokens, greedy and
    seeded, on prompts whose common start fills a 128-token block, so the cache is hit in both."""
    long = [prompts[0] * 3 + p for p in prompts]
    results = {}
    for bs in (16, 128):
        engine = make_engine(smollm2_dir, num_blocks=8192 // bs, block_size=bs, max_model_len=448)
        results[bs] = _tokens(run(engine, _requests(long, "b")), "b")
        assert engine.scheduler.prefix_hit_tokens >= 128 and engine.blocks.num_used == 0
    assert results[16] == results[128]
