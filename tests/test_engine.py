"""The engine on the real default model, in process at TP = 1: continuous batching, preemption,
abort, chunked prefill, stop conditions. (TP = 2 through Ray: tests/test_cluster.py.)"""

from __future__ import annotations

import pytest

from engine_util import greedy, make_engine, run
from worker.engine import FinishReason, Request
from worker.sampling import SamplingParams

TEXTS = [
    "The capital of France is",
    "Once upon a time",
    "def add(a, b):",
    "List three colors:",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Water boils at",
    "In 1492,",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "Translate to French: good morning",
    "import numpy as np\n",
    "A haiku about the sea:",
    "The largest planet in our solar system is",
    "Q: What is 2 + 2?\nA:",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor " * 4,
    "Hello",
    "Photosynthesis is the process by which",
]


@pytest.fixture(scope="module")
def engine(smollm2_dir):
    return make_engine(smollm2_dir)


@pytest.fixture(scope="module")
def prompts(engine):
    return [engine.tokenizer.encode(t).ids for t in TEXTS]


@pytest.fixture(scope="module")
def alone(engine, prompts):
    """Each prompt's 16 greedy tokens, run on its own."""
    out = []
    for i, p in enumerate(prompts):
        done = run(engine, [Request(f"alone-{i}", p, greedy(16, ignore_eos=True))])
        out.append(done[f"alone-{i}"].token_ids)
    return out


def test_concurrent_greedy_equals_alone(engine, prompts, alone):
    reqs = [Request(f"batch-{i}", p, greedy(16, ignore_eos=True)) for i, p in enumerate(prompts)]
    batch_sizes = []
    done = run(engine, reqs, on_step=lambda e: batch_sizes.append(len(e.scheduler.running)))
    assert max(batch_sizes) == len(prompts), "all 16 ran together"
    for i in range(len(prompts)):
        assert done[f"batch-{i}"].token_ids == alone[i], f"prompt {i} differs under load"
        assert len(alone[i]) == 16


def test_seeded_sampling_is_independent_of_load(engine, prompts):
    params = [SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=1000 + i,
                             ignore_eos=True) for i in range(4)]
    solo = {}
    for i in range(4):
        solo[i] = run(engine, [Request(f"s{i}", prompts[i], params[i])])[f"s{i}"].token_ids
    noise = [Request(f"n{j}", prompts[j], SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True))
             for j in range(4, 16)]
    mixed = [Request(f"m{i}", prompts[i], params[i]) for i in range(4)]
    done = run(engine, noise[:6] + mixed[::-1] + noise[6:])  # other rows, other order
    for i in range(4):
        assert done[f"m{i}"].token_ids == solo[i]
    assert len({tuple(v) for v in solo.values()}) == 4


def test_small_kv_pool_preempts_and_still_finishes_correctly(smollm2_dir, engine, prompts):
    reqs = lambda tag: [Request(f"{tag}{i}", prompts[i % 16] + [i], greedy(24, ignore_eos=True))
                        for i in range(32)]
    reference = run(engine, reqs("big"))
    small = make_engine(smollm2_dir, num_blocks=14, block_size=16, max_model_len=224)
    low_water = []
    done = run(small, reqs("small"), on_step=lambda e: low_water.append(e.blocks.num_free))
    assert small.scheduler.num_preemptions > 0, "the pool was meant to be too small"
    assert min(low_water) == 0
    for i in range(32):
        assert done[f"small{i}"].finish_reason is FinishReason.LENGTH
        assert done[f"small{i}"].token_ids == reference[f"big{i}"].token_ids, f"request {i}"
    assert small.blocks.num_used == 0


def test_abort_frees_blocks_at_the_next_step(engine, prompts):
    engine.add_request(Request("long", prompts[13], greedy(500, ignore_eos=True)))
    outs = [o for _ in range(4) for o in engine.step()]
    used = engine.blocks.num_used
    assert used >= -(-len(prompts[13]) // 16) and not any(o.finished for o in outs)
    engine.abort("long")
    final = engine.step()
    assert [(o.request_id, o.finish_reason) for o in final] == [("long", FinishReason.CANCELLED)]
    assert engine.blocks.num_used == 0 and not engine.has_work


def test_chunked_prefill_equals_one_shot(smollm2_dir, engine):
    long_prompt = engine.tokenizer.encode("The history of the Roman Empire spans many centuries. " * 60).ids
    assert len(long_prompt) > 600
    one_shot = make_engine(smollm2_dir, max_tokens_per_step=2048)
    chunked = make_engine(smollm2_dir, max_tokens_per_step=64)
    steps = []
    a = run(one_shot, [Request("x", long_prompt, greedy(8, ignore_eos=True))])["x"].token_ids
    b = run(chunked, [Request("x", long_prompt, greedy(8, ignore_eos=True))],
            on_step=lambda e: steps.append(1))["x"].token_ids
    assert a == b
    assert len(steps) >= len(long_prompt) // 64 + 7  # the prompt took many steps


def test_stop_conditions(engine, prompts):
    chat = prompts[7]
    done = run(engine, [
        Request("eos", chat, greedy(64)),
        Request("stop-str", chat, greedy(64, stop=("Paris",))),
        Request("len", prompts[1], greedy(5, ignore_eos=True)),
        Request("stop-id", chat, greedy(64, stop_token_ids=(engine.tokenizer.token_to_id("ĠParis"),))),
    ])
    assert done["eos"].finish_reason is FinishReason.EOS and "Paris" in done["eos"].text
    assert "<|im_end|>" not in done["eos"].text
    s = done["stop-str"]
    assert (s.finish_reason, s.stop) == (FinishReason.STOP, "Paris") and "Paris" not in s.text
    assert done["eos"].text.startswith(s.text)
    assert done["len"].finish_reason is FinishReason.LENGTH and len(done["len"].token_ids) == 5
    paris = engine.tokenizer.token_to_id("ĠParis")
    assert (done["stop-id"].finish_reason, done["stop-id"].stop) == (FinishReason.STOP, paris)
    assert done["stop-id"].token_ids[-1] == paris and "Paris" not in done["stop-id"].text


def test_logprobs_of_greedy_tokens(engine, prompts):
    done = run(engine, [Request("lp", prompts[0], greedy(6, ignore_eos=True, logprobs=3))])["lp"]
    assert len(done.logprobs) == 6
    for token, lp in zip(done.token_ids, done.logprobs):
        assert lp.token_id == token and len(lp.top) == 3
        assert lp.top[0][0] == token and lp.logprob == pytest.approx(lp.top[0][1])
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)


def test_bad_requests_end_with_an_error_not_a_crash(engine, prompts):
    done = run(engine, [
        Request("empty", [], greedy(4)),
        Request("vocab", [10**9], greedy(4)),
        Request("ok", prompts[0], greedy(3, ignore_eos=True)),
    ])
    assert done["empty"].finish_reason is FinishReason.ERROR and "empty" in done["empty"].error
    assert done["vocab"].finish_reason is FinishReason.ERROR
    assert done["ok"].finish_reason is FinishReason.LENGTH


def test_a_request_whose_numbers_cannot_be_sampled_fails_alone(engine, prompts, alone):
    """The issue's reproducer, inside the engine (the front end now refuses it): temperature 1 with
    repetition_penalty 1e-38 overflows its scores. That request ends with an error naming the
    cause; its batch-mates finish with exactly their tokens; the engine keeps serving."""
    bad = SamplingParams(max_tokens=8, temperature=1.0, repetition_penalty=1e-38)
    done = run(engine, [Request("ok0", prompts[0], greedy(16, ignore_eos=True)),
                        Request("bad", prompts[1], bad),
                        Request("ok2", prompts[2], greedy(16, ignore_eos=True))])
    assert done["bad"].finish_reason is FinishReason.ERROR
    assert "request bad" in done["bad"].error and "not finite" in done["bad"].error
    assert done["ok0"].token_ids == alone[0] and done["ok2"].token_ids == alone[2]
    assert engine.blocks.num_used == 0
    again = run(engine, [Request("after", prompts[3], greedy(16, ignore_eos=True))])
    assert again["after"].token_ids == alone[3]


def test_a_failing_detokenizer_or_broken_state_fails_only_its_request(engine, prompts, alone, monkeypatch):
    from worker import detokenize

    real_add = detokenize.IncrementalDetokenizer.add

    def add(self, token_id):
        if self._stops == ("planted",):  # the one request below that asks for this stop string
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "planted")
        return real_add(self, token_id)

    monkeypatch.setattr(detokenize.IncrementalDetokenizer, "add", add)
    broken = SamplingParams(max_tokens=4, stop_token_ids=("not an id",))  # its state cannot be built
    done = run(engine, [Request("ok", prompts[0], greedy(16, ignore_eos=True)),
                        Request("detok", prompts[1], greedy(16, ignore_eos=True, stop=("planted",))),
                        Request("state", prompts[2], broken)])
    assert done["detok"].finish_reason is FinishReason.ERROR and "UnicodeDecodeError" in done["detok"].error
    assert done["state"].finish_reason is FinishReason.ERROR and "could not start" in done["state"].error
    assert done["ok"].token_ids == alone[0] and done["ok"].finish_reason is FinishReason.LENGTH
    assert engine.blocks.num_used == 0


RESUMABLE = {
    "greedy": dict(max_tokens=24, temperature=0.0, repetition_penalty=1.2, presence_penalty=0.5,
                   min_tokens=20, logprobs=2, ignore_eos=True),
    "seeded": dict(max_tokens=24, temperature=0.9, top_p=0.95, seed=7, frequency_penalty=0.3, ignore_eos=True),
}


def _outputs(engine, request):
    """The request's outputs, one per step, run alone."""
    engine.add_request(request)
    outs = []
    while engine.has_work:
        outs += [o for o in engine.step() if o.request_id == request.request_id]
    return outs


@pytest.mark.parametrize("kind", RESUMABLE)
def test_a_resumed_request_continues_exactly_where_it_was(engine, prompts, kind):
    """What failover sends a second replica (the prompt and the tokens already streamed) gives the
    rest of the undisturbed output: tokens, text (none of the streamed text again), logprobs,
    usage and the finish; for a seeded request too, whose stream picks up at the same position."""
    # a stop string from near the end of the undisturbed text, so that the resumed run must match
    # it across the tokens it was given and those it generates
    text = "".join(o.text for o in _outputs(engine, Request(f"probe-{kind}", prompts[10],
                                                             SamplingParams(**RESUMABLE[kind]))))
    params = SamplingParams(**RESUMABLE[kind], stop=[text[-10:-3]])
    full = _outputs(engine, Request(f"full-{kind}", prompts[10], params))
    tokens = [t for o in full for t in o.token_ids]
    assert full[-1].finish_reason is FinishReason.STOP and len(tokens) >= 8
    for k in (1, 5, len(tokens) - 1):
        rest = _outputs(engine, Request(f"resume-{kind}-{k}", prompts[10], params, output_token_ids=tokens[:k]))
        assert tokens[:k] + [t for o in rest for t in o.token_ids] == tokens, k
        streamed = "".join(o.text for o in full[:k])
        assert streamed + "".join(o.text for o in rest) == "".join(o.text for o in full), k
        assert (rest[-1].finish_reason, rest[-1].stop, rest[-1].num_output_tokens, rest[-1].num_prompt_tokens) == \
               (full[-1].finish_reason, full[-1].stop, full[-1].num_output_tokens, full[-1].num_prompt_tokens)
        if params.logprobs:
            got = [lp for o in rest for lp in (o.logprobs or [])]
            want = [lp for o in full[k:] for lp in (o.logprobs or [])]
            assert [lp.token_id for lp in got] == [lp.token_id for lp in want]
            assert max(abs(a.logprob - b.logprob) for a, b in zip(got, want)) < 1e-3


def test_a_resumed_request_past_its_limits_is_refused_alone(engine, prompts):
    out = _outputs(engine, Request("over", prompts[0], greedy(4), output_token_ids=[1, 2, 3, 4]))
    assert out[-1].finish_reason is FinishReason.ERROR and "max_tokens is 4" in out[-1].error
