"""The sampler against straightforward references: transformers' logits processors for the
repetition penalty and top-k / top-p / min-p, per-element loops for presence / frequency,
softmax(logits / T) for the empirical distribution; plus seeded determinism across batch
compositions, min_tokens, logprobs and SamplingParams.validate.

Run ``python -m pytest -q tests/test_sampling.py``.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from worker.sampling import (
    NONFINITE,
    NO_TOKEN,
    Sampler,
    SamplingParams,
    SamplingParamsError,
    SequenceSampling,
    apply_penalties,
    sampling_distribution,
)
from worker.sampling import _inverse_cdf  # the draw itself, for its edge cases
from tpkernels import native

EOS = 2


def state(vocab: int, prompt=(5, 6, 7), output=(), **params) -> SequenceSampling:
    s = SequenceSampling(SamplingParams(**params), list(prompt), (EOS,), vocab)
    for token_id in output:
        s.append(token_id)
    return s


def random_logits(rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


# -- greedy and penalties ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_defaults_are_argmax_and_leave_logits_alone(dtype):
    logits = random_logits(7, 500, seed=0).to(dtype)
    before = logits.clone()
    result = Sampler(seed=0)(logits, [state(500, temperature=0.0) for _ in range(7)])
    assert result.token_ids == logits.float().argmax(-1).tolist()
    assert result.logprobs == [None] * 7
    assert torch.equal(logits, before)


def reference_penalties(logits: torch.Tensor, s: SequenceSampling, prompt: list[int]) -> torch.Tensor:
    """HF's repetition penalty over prompt+output, then presence/frequency per element."""
    p = s.params
    row = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(
        torch.tensor([prompt + s.output_token_ids]), logits[None].clone())[0]
    for token_id in range(logits.shape[0]):
        count = s.output_token_ids.count(token_id)
        row[token_id] -= p.presence_penalty * (count > 0) + p.frequency_penalty * count
    return row


def test_penalties_match_reference_implementations():
    vocab, rng = 300, random.Random(1)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randrange(1, 40))] for _ in range(6)]
    params = [
        dict(repetition_penalty=1.3),
        dict(repetition_penalty=0.7, presence_penalty=0.5),
        dict(frequency_penalty=-0.4),
        dict(presence_penalty=-1.5, frequency_penalty=0.8, repetition_penalty=1.9),
        dict(),
        dict(repetition_penalty=1.1, frequency_penalty=2.0),
    ]
    states = [SequenceSampling(SamplingParams(temperature=0.0, **kw), prompt, (EOS,), vocab)
              for kw, prompt in zip(params, prompts)]
    for s in states:  # outputs with repeats, some overlapping the prompt
        for _ in range(rng.randrange(0, 30)):
            s.append(rng.choice([rng.randrange(vocab), rng.randrange(8)]))
    logits = random_logits(len(states), vocab, seed=2)
    scores = apply_penalties(logits, states)
    for i, (s, prompt) in enumerate(zip(states, prompts)):
        torch.testing.assert_close(scores[i], reference_penalties(logits[i], s, prompt), rtol=0, atol=1e-5)
    # Greedy rows take the argmax after penalties.
    assert Sampler(seed=0)(logits, states).token_ids == scores.argmax(-1).tolist()


def test_repetition_penalty_matches_transformers_exactly():
    vocab = 1000
    prompt = list(range(0, 600, 3))
    s = state(vocab, prompt, output=[1, 1, 4, 999], repetition_penalty=1.25)
    logits = random_logits(1, vocab, seed=3)
    expected = RepetitionPenaltyLogitsProcessor(1.25)(torch.tensor([prompt + [1, 1, 4, 999]]), logits.clone())
    assert torch.equal(apply_penalties(logits, [s]), expected)


# -- temperature, top-k, top-p, min-p ---------------------------------------------------------------

def hf_allowed(logits_row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Tokens transformers' warpers leave sampleable, on the temperature-scaled logits."""
    warpers = [TemperatureLogitsWarper(p.temperature)]
    if p.top_k:
        warpers.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        warpers.append(TopPLogitsWarper(p.top_p))
    if p.min_p > 0.0:
        warpers.append(MinPLogitsWarper(p.min_p))
    scores = logits_row[None].clone()
    for warp in warpers:
        scores = warp(None, scores)
    return torch.isfinite(scores[0])


FILTERS = [
    dict(temperature=1.0, top_k=1),
    dict(temperature=0.7, top_k=20),
    dict(temperature=1.3, top_p=0.9),
    dict(temperature=0.5, top_p=0.5),
    dict(temperature=2.0, top_p=0.95),  # wide nucleus: more than the first 256 candidates
    dict(temperature=1.0, min_p=0.1),
    dict(temperature=0.8, top_k=50, top_p=0.8, min_p=0.05),
    dict(temperature=1.5, top_k=3000, top_p=0.97, min_p=0.001),
    dict(temperature=1.0),
]


@pytest.mark.parametrize("seed", range(4))
def test_filters_allow_exactly_the_reference_set(seed):
    vocab = 4096
    states = [state(vocab, **kw) for kw in FILTERS]
    logits = random_logits(len(states), vocab, seed=seed, scale=2.0 + seed)
    probs = sampling_distribution(logits, states)
    for i, s in enumerate(states):
        assert torch.equal(probs[i] > 0, hf_allowed(logits[i], s.params)), FILTERS[i]
    # Any one filtered row alone gives the same distribution as inside the batch.
    assert torch.equal(sampling_distribution(logits[4:5], states[4:5]), probs[4:5])


def test_wide_nucleus_needs_more_than_first_candidates():
    # Guards the widening path of top-p: this nucleus must exceed the first round of candidates.
    logits = random_logits(1, 4096, seed=0, scale=2.0)
    p = SamplingParams(temperature=2.0, top_p=0.95)
    assert int(hf_allowed(logits[0], p).sum()) > 256


def test_filter_boundaries_on_exact_probabilities():
    # Four equal logits: probabilities are exactly 1/4, so the boundaries are exact.
    uniform = torch.zeros(1, 4)
    # top_p 0.5: the second token has 1/4 above it (< 0.5, kept), the third 1/2 (not < 0.5).
    for top_p, kept in [(0.5, 2), (0.51, 3), (0.25, 1), (0.01, 1), (1.0, 4)]:
        p = SamplingParams(top_p=top_p)
        probs = sampling_distribution(uniform, [state(4, top_p=top_p)])
        assert int((probs > 0).sum()) == kept == int(hf_allowed(uniform[0], p).sum()), top_p
    # min_p 1.0 keeps exactly the tokens tied for the largest probability.
    logits = torch.tensor([[2.0, 2.0, 1.0, 0.0]])
    probs = sampling_distribution(logits, [state(4, min_p=1.0)])
    assert (probs[0] > 0).tolist() == [True, True, False, False]
    assert torch.equal(probs[0] > 0, hf_allowed(logits[0], SamplingParams(min_p=1.0)))


@pytest.mark.parametrize("temperature", [0.3, 1.0, 1.7])
def test_temperature_scales_logits(temperature):
    logits = random_logits(3, 200, seed=5)
    probs = sampling_distribution(logits, [state(200, temperature=temperature)] * 3)
    torch.testing.assert_close(probs, torch.softmax(logits / temperature, -1))
    # With filters, the kept tokens keep their relative weights.
    probs = sampling_distribution(logits, [state(200, temperature=temperature, top_p=0.8, min_p=0.01)])
    kept = probs[0] > 0
    reference = torch.softmax(logits[0] / temperature, -1)[kept]
    torch.testing.assert_close(probs[0][kept] / probs[0].sum(), reference / reference.sum())


def empirical(sampler: Sampler, logits_row: torch.Tensor, batches) -> torch.Tensor:
    """Frequencies of each token drawn for every state of every batch (one step each)."""
    counts = torch.zeros(logits_row.shape[0])
    for states in batches:
        result = sampler(logits_row.expand(len(states), -1), states)
        counts += torch.bincount(torch.tensor(result.token_ids), minlength=logits_row.shape[0])
    return counts / counts.sum()


LOGITS6 = torch.tensor([1.0, 2.0, 0.5, -1.0, 1.5, 0.0])


@pytest.mark.parametrize("params,expected", [
    (dict(temperature=0.7), torch.softmax(LOGITS6 / 0.7, -1)),
    (dict(temperature=1.0), torch.softmax(LOGITS6, -1)),
    # top-k 3 keeps tokens 1, 4, 0 and renormalises.
    (dict(temperature=1.2, top_k=3),
     torch.softmax(LOGITS6 / 1.2 + torch.tensor([0, 0, -math.inf, -math.inf, 0, -math.inf]), -1)),
])
def test_empirical_frequencies_match_the_distribution(params, expected):
    draws, rows = 40_000, 1000
    states = [state(6, **params) for _ in range(rows)]  # unseeded: one shared generator
    freq = empirical(Sampler(seed=7), LOGITS6, [states] * (draws // rows))
    assert (freq - expected).abs().max() < 0.01
    # Chi-square over the cells with mass; cells without mass must stay empty.
    nonzero = expected > 0
    assert torch.all(freq[~nonzero] == 0)
    chi2 = float(((freq[nonzero] - expected[nonzero]) ** 2 / expected[nonzero]).sum() * draws)
    assert chi2 < 20.5  # p = 0.001 for up to 5 degrees of freedom


def test_seeded_rows_follow_the_distribution_across_seeds():
    # The first draw of many different seeds is distributed like the unseeded draw.
    expected = torch.softmax(LOGITS6 / 0.9, -1)
    batches = [[state(6, temperature=0.9, seed=start + j) for j in range(500)]
               for start in range(0, 10_000, 500)]
    freq = empirical(Sampler(seed=1), LOGITS6, batches)
    assert (freq - expected).abs().max() < 0.02


@pytest.mark.parametrize("vocab", [512, 1000])  # 1000: padded to whole blocks of 256
def test_draw_edges(vocab):
    u = torch.tensor([0.0, 0.5, 1 - 2**-53], dtype=torch.float64)
    only_last = torch.zeros(3, vocab)
    only_last[:, -1] = 1.0
    assert _inverse_cdf(only_last, u).tolist() == [vocab - 1] * 3
    # A tiny mass far down the row keeps its own interval: u close to 1 lands on it.
    tiny_tail = torch.zeros(3, vocab)
    tiny_tail[:, 3] = 1.0
    tiny_tail[:, vocab - 2] = 1e-12
    assert _inverse_cdf(tiny_tail, u).tolist() == [3, 3, vocab - 2]
    # Zero-mass tokens are never drawn, at either end.
    middle = torch.zeros(3, vocab)
    middle[:, 300:302] = torch.tensor([0.25, 0.75])
    assert _inverse_cdf(middle, u).tolist() == [300, 301, 301]


# -- seeded determinism -----------------------------------------------------------------------------

VOCAB = 49152
SEEDED = dict(temperature=0.9, top_p=0.95, top_k=0, min_p=0.02, repetition_penalty=1.1,
              frequency_penalty=0.3, seed=1234)
NEIGHBOURS = [
    dict(temperature=0.0),
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=40, seed=99),
    dict(temperature=1.3, top_p=0.5, presence_penalty=1.0),
    dict(temperature=1.0, min_p=0.1, seed=1234),  # same seed, its own stream
]


def step_logits(step: int) -> torch.Tensor:
    """The model's logits for the seeded sequence at `step`: a fixed function of the step."""
    return random_logits(1, VOCAB, seed=1000 + step, scale=4.0)[0]


def generate(params: dict, neighbours: list[dict], steps: int, sampler_seed: int) -> list[int]:
    """Tokens of a sequence with `params` over `steps`, sharing each step with `neighbours` in a
    position that changes every step; the neighbours' logits are random each step."""
    rng = random.Random(sampler_seed)
    ours = state(VOCAB, **params)
    others = [state(VOCAB, **kw) for kw in neighbours]
    sampler = Sampler(seed=sampler_seed)
    for step in range(steps):
        row = rng.randrange(len(others) + 1)
        batch = others[:row] + [ours] + others[row:]
        logits = random_logits(len(batch), VOCAB, seed=rng.randrange(10**6), scale=4.0)
        logits[row] = step_logits(step)
        token_ids = sampler(logits, batch).token_ids
        for s, token_id in zip(batch, token_ids):
            s.append(token_id)
    return ours.output_token_ids


def test_seed_gives_the_same_tokens_alone_and_in_any_batch():
    alone = generate(SEEDED, [], steps=6, sampler_seed=0)
    assert generate(SEEDED, NEIGHBOURS, steps=6, sampler_seed=1) == alone
    assert generate(SEEDED, NEIGHBOURS[::-1] * 2, steps=6, sampler_seed=2) == alone
    assert generate(SEEDED, NEIGHBOURS[2:4], steps=6, sampler_seed=3) == alone
    assert generate({**SEEDED, "seed": 4321}, [], steps=6, sampler_seed=0) != alone


def test_two_requests_with_one_seed_draw_alike_in_one_batch():
    logits = random_logits(1, 1000, seed=8).expand(4, -1).bfloat16()
    states = [state(1000, temperature=1.0, seed=5), state(1000, temperature=1.0),
              state(1000, temperature=1.0, seed=5), state(1000, temperature=1.0, seed=6)]
    sampler = Sampler(seed=0)
    for _ in range(5):
        token_ids = sampler(logits, states).token_ids
        assert token_ids[0] == token_ids[2]
        for s, token_id in zip(states, token_ids):
            s.append(token_id)
    assert states[0].output_token_ids != states[3].output_token_ids


# -- min_tokens, EOS, stop ids ----------------------------------------------------------------------

def eos_favoured(rows: int, vocab: int = 50) -> torch.Tensor:
    logits = torch.zeros(rows, vocab)
    logits[:, EOS] = 30.0
    logits[:, 9] = 29.0  # a stop_token_id, next best
    return logits


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_blocks_eos_and_stop_ids_until_reached(temperature):
    s = state(50, temperature=temperature, min_tokens=3, stop_token_ids=(9,), max_tokens=10)
    sampler = Sampler(seed=0)
    for _ in range(3):
        token_id = sampler(eos_favoured(1), [s]).token_ids[0]
        assert token_id not in (EOS, 9)
        s.append(token_id)
    assert sampler(eos_favoured(1), [s]).token_ids[0] in (EOS, 9)


def test_ignore_eos_leaves_eos_unblocked():
    s = state(50, temperature=0.0, min_tokens=2, stop_token_ids=(9,), ignore_eos=True)
    s.append(Sampler()(eos_favoured(1), [s]).token_ids[0])
    assert s.output_token_ids == [EOS]
    logits = eos_favoured(1)
    logits[0, EOS] = -30.0
    assert Sampler()(logits, [s]).token_ids[0] != 9  # stop ids stay blocked by min_tokens


# -- logprobs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_come_from_raw_logits(dtype):
    vocab = 400
    states = [
        state(vocab, temperature=0.0, logprobs=5, repetition_penalty=1.5, output=[1, 2, 3]),
        state(vocab, temperature=0.6, top_k=10, logprobs=1, presence_penalty=2.0, output=[7]),
        state(vocab, temperature=1.0),
        state(vocab, temperature=1.0, top_p=0.3, logprobs=20),
    ]
    logits = random_logits(len(states), vocab, seed=9).to(dtype)
    result = Sampler(seed=0)(logits, states)
    expected = torch.log_softmax(logits.float(), -1)
    assert result.logprobs[2] is None
    for i in (0, 1, 3):
        lp = result.logprobs[i]
        n = states[i].params.logprobs
        assert lp.token_id == result.token_ids[i]
        assert lp.logprob == pytest.approx(float(expected[i, lp.token_id]), abs=1e-5)
        assert len(lp.top) == n and len({t for t, _ in lp.top}) == n
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        # The n best values (ids may differ among ties, which bfloat16 logits have).
        torch.testing.assert_close(torch.tensor(values), expected[i].topk(n).values)
        for token_id, value in lp.top:
            assert value == pytest.approx(float(expected[i, token_id]), abs=1e-5)


# -- validate ---------------------------------------------------------------------------------------

BAD = [
    (dict(temperature=math.nan), "temperature", "[0, 2]"),
    (dict(temperature=-0.1), "temperature", "[0, 2]"),
    (dict(temperature=2.5), "temperature", "[0, 2]"),
    (dict(temperature=math.inf), "temperature", "[0, 2]"),
    (dict(top_p=0.0), "top_p", "(0, 1]"),
    (dict(top_p=1.5), "top_p", "(0, 1]"),
    (dict(top_p=math.nan), "top_p", "(0, 1]"),
    (dict(top_k=-1), "top_k", ">= 0"),
    (dict(top_k=2.5), "top_k", ">= 0"),
    (dict(min_p=-0.1), "min_p", "[0, 1]"),
    (dict(min_p=1.1), "min_p", "[0, 1]"),
    (dict(repetition_penalty=0.0), "repetition_penalty", "[0.01, 2]"),
    (dict(repetition_penalty=1e-38), "repetition_penalty", "[0.01, 2]"),  # would overflow float32
    (dict(repetition_penalty=math.inf), "repetition_penalty", "[0.01, 2]"),
    (dict(presence_penalty=-math.inf), "presence_penalty", "[-2, 2]"),
    (dict(presence_penalty=2.1), "presence_penalty", "[-2, 2]"),
    (dict(frequency_penalty=math.nan), "frequency_penalty", "[-2, 2]"),
    (dict(max_tokens=0), "max_tokens", "[1, 4096]"),
    (dict(max_tokens=5000), "max_tokens", "[1, 4096]"),
    (dict(min_tokens=20, max_tokens=10), "min_tokens", "[0, 10]"),
    (dict(min_tokens=-1), "min_tokens", "[0, 16]"),
    (dict(logprobs=21), "logprobs", "[0, 20]"),
    (dict(logprobs=-1), "logprobs", "[0, 20]"),
    (dict(stop_token_ids=(3, 1000)), "stop_token_ids", "[0, 999]"),
    (dict(stop_token_ids=(-1,)), "stop_token_ids", "[0, 999]"),
    (dict(seed=-1), "seed", str(2**64 - 1)),
    (dict(seed=2**64), "seed", str(2**64 - 1)),
    (dict(stop=("ok", "")), "stop", "non-empty"),
    (dict(ignore_eos=1), "ignore_eos", "bool"),
]


@pytest.mark.parametrize("kwargs,field,limit", BAD, ids=[f"{f}-{i}" for i, (_, f, _) in enumerate(BAD)])
def test_validate_rejects_bad_params(kwargs, field, limit):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**kwargs).validate(vocab_size=1000, max_tokens_limit=4096)
    assert info.value.field == field
    assert field in str(info.value) and limit in str(info.value)
    assert isinstance(info.value, ValueError)


def test_validate_message_shows_the_value():
    with pytest.raises(SamplingParamsError, match=r"temperature must be a finite number in \[0, 2\], got nan"):
        SamplingParams(temperature=math.nan).validate()


def test_validate_accepts_edges():
    SamplingParams().validate()
    f32 = lambda x: float(np.float32(x))  # noqa: E731 - what a float field of the proto carries
    SamplingParams(repetition_penalty=f32(0.01), top_p=f32(1e-6)).validate()
    SamplingParams(temperature=0.0, top_p=1.0, min_p=1.0, top_k=0, repetition_penalty=2.0,
                   presence_penalty=-2.0, frequency_penalty=2.0, seed=2**64 - 1, logprobs=20,
                   max_tokens=4096, min_tokens=4096, stop=("\n",), stop_token_ids=(999,),
                   ).validate(vocab_size=1000, max_tokens_limit=4096)


# -- failure isolation ------------------------------------------------------------------------------
def test_rows_with_unusable_scores_fail_alone():
    """NaN, +inf, or nothing finite left: that row gets NO_TOKEN and an error, never an index
    out of range; the other rows are sampled exactly as without them."""
    vocab = 600
    logits = random_logits(5, vocab, seed=11)
    logits[1, 5] = math.nan
    logits[2, :] = -math.inf
    logits[3, 7] = math.inf
    states = [state(vocab, temperature=0.0), state(vocab, temperature=0.8, seed=1), state(vocab, temperature=0.0),
              state(vocab, temperature=1.0, top_p=0.9), state(vocab, temperature=0.7, seed=2)]
    got = Sampler(seed=0)(logits, states)
    assert got.errors[0] is None and got.errors[4] is None
    assert got.errors[1:4] == [NONFINITE] * 3
    assert got.token_ids[1:4] == [NO_TOKEN] * 3
    clean = Sampler(seed=0)(logits[[0, 4]], [state(vocab, temperature=0.0), state(vocab, temperature=0.7, seed=2)])
    assert [got.token_ids[0], got.token_ids[4]] == clean.token_ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_plain_greedy_batch_takes_one_native_pass_with_the_general_paths_result(dtype, monkeypatch):
    """All rows greedy, no penalties, no logprobs: one native pass over the logits as they are
    gives what the general path gives, unusable rows included; a penalty or logprobs on any row
    sends the batch the general way."""
    import worker.sampling as sampling

    if not native.available():
        pytest.skip("no native kernels here")
    vocab = 700
    logits = random_logits(6, vocab, seed=12).to(dtype)
    logits[1, 5] = math.nan
    logits[2, :] = -math.inf
    logits[4, 9] = math.inf
    passes = []
    greedy_rows = native.greedy_rows
    monkeypatch.setattr(native, "greedy_rows", lambda x: passes.append(x.shape) or greedy_rows(x))
    fast = Sampler(seed=0)(logits, [state(vocab, temperature=0.0) for _ in range(6)])
    assert passes == [(6, vocab)]
    with monkeypatch.context() as m:
        m.setattr(sampling, "_plain_greedy", lambda *a: False)
        general = Sampler(seed=0)(logits, [state(vocab, temperature=0.0) for _ in range(6)])
    assert fast == general
    assert fast.errors == [None, NONFINITE, NONFINITE, None, NONFINITE, None]
    assert fast.token_ids[0] == int(logits[0].float().argmax()) and fast.token_ids[1] == NO_TOKEN
    for other in (dict(temperature=0.0, logprobs=2), dict(temperature=0.0, repetition_penalty=1.5),
                  dict(temperature=0.0, min_tokens=3), dict(temperature=0.5, seed=1)):
        Sampler(seed=0)(logits, [state(vocab, temperature=0.0)] * 5 + [state(vocab, **other)])
    assert len(passes) == 1


def test_overflowing_penalty_or_temperature_fails_only_its_request():
    """What validation keeps out (repetition_penalty 1e-38, a temperature that overflows the
    scores), should it get in by another way, ends that row and no other."""
    vocab = 300
    logits = random_logits(3, vocab, seed=3)
    logits[2] *= 1e36  # scores / 1e-5 overflow float32
    states = [state(vocab, temperature=1.0, repetition_penalty=1e-38), state(vocab, temperature=0.0),
              state(vocab, temperature=1e-5 * 1.5)]
    got = Sampler(seed=0)(logits, states)
    assert got.errors == [NONFINITE, None, NONFINITE]
    assert got.token_ids[1] == int(logits[1].argmax())


def test_row_by_row_finds_the_row_that_raises():
    vocab = 300
    logits = random_logits(3, vocab, seed=4)
    broken = state(vocab, temperature=0.0, min_tokens=2)
    broken.min_tokens_blocked = torch.tensor([10**6])  # an index past the vocabulary
    states = [state(vocab, temperature=0.0), broken, state(vocab, temperature=0.9, seed=5)]
    with pytest.raises(IndexError):
        Sampler(seed=0)(logits, states)
    got = Sampler(seed=0).row_by_row(logits, states)
    assert got.errors[0] is None and got.errors[2] is None
    assert got.errors[1].startswith("sampling failed: IndexError")
    assert got.token_ids[1] == NO_TOKEN and got.token_ids[0] == int(logits[0].argmax())
