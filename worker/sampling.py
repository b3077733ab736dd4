"""Next-token selection on rank 0: penalties, temperature, top-k / top-p / min-p, seeds, logprobs.

Each step the engine passes the model's next-token logits, one row per sequence, to a `Sampler`
together with each sequence's `SequenceSampling` state, and gets one token (and optional logprobs)
per row. The engine then calls `SequenceSampling.append` with the token. Order of operations
(as in vLLM)::

    raw logits ──► logprobs = log_softmax(raw logits)                       rows with logprobs > 0
        └─► repetition penalty (prompt + output ids) ─► presence / frequency (output counts)
            ─► min_tokens: EOS and stop_token_ids = -inf while too few outputs
            ├─► greedy rows (temperature 0): argmax
            └─► sampled rows: / temperature ─► top-k ─► softmax ─► top-p ─► min-p ─► draw

Cost per step with B rows over a vocabulary of V (the comments on each step repeat theirs):
an all-greedy batch without penalties is one argmax, O(B·V). Penalties touch only the distinct
ids each sequence has seen (gather, rescale, scatter back), plus one O(B·V) copy so the caller's
logits stay untouched. Sampled rows add a few O(V) passes each; top-k is a partial selection,
and top-p first looks at the 256 most likely tokens, widening only for rows whose nucleus is
larger, so no full row is sorted unless a row's nucleus spans more than 16384 tokens.

Failure isolation: a row whose scores are not usable (NaN, +inf, or nothing finite left after
penalties and temperature) gets no token but an error naming it, and the other rows are sampled
as usual; `Sampler.row_by_row` samples each row on its own, for the engine to find the one row a
batch-wide exception came from. No request's numbers can fail its neighbours.

Seeded determinism: the draw is an inverse-CDF lookup with one uniform number per sampled row.
A seeded sequence takes that number from its own `torch.Generator` (one draw per step, whatever
else is in the batch) and every other step is row-wise, so its tokens do not depend on the batch.

Run ``python -m pytest -q tests/test_sampling.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from tpkernels import native

GREEDY_BELOW = 1e-5  # temperatures below this are greedy: dividing by them would overflow float32
SEED_MAX = 2**64 - 1  # torch.Generator seeds are uint64
TOP_P_FIRST_K = 256  # candidates top-p looks at before widening (×8 per round, up to V)
CDF_BLOCK = 256  # tokens per block of the two-level inverse-CDF draw
# Ranges that no value can overflow float32 scores with (reported in ModelInfo.limits).
MAX_TEMPERATURE = 2.0
MIN_REPETITION_PENALTY = 0.01  # a logit is scaled by at most 1/0.01
MAX_REPETITION_PENALTY = 2.0
MAX_ABS_PENALTY = 2.0  # presence and frequency penalties lie in [-2, 2]
NO_TOKEN = -1  # the token of a row that failed (SampleResult.errors says why)


class SamplingParamsError(ValueError):
    """A sampling parameter out of range; `field` names it (e.g. "temperature")."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_float(name: str, value: object, lo: float, hi: float, *, lo_open: bool = False) -> None:
    """The bounds are compared as float32, the type of the proto's fields: a client that sends the
    documented bound 0.01 sends float32(0.01) < 0.01, and must not be refused for it."""
    lo32, hi32 = float(np.float32(lo)), float(np.float32(hi))
    above_lo = _is_number(value) and (value > lo32 if lo_open else value >= lo32)
    if not (above_lo and math.isfinite(value) and value <= hi32):
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise SamplingParamsError(name, f"{name} must be a finite number in {interval}, got {value!r}")


def _check_int(field: str, value: object, lo: int, hi: int | None = None, *,
               label: str | None = None, note: str = "") -> None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi):
        return
    limit = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
    raise SamplingParamsError(field, f"{label or field} must be an integer {limit}{note}, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    min_tokens: int = 0  # EOS and stop_token_ids are blocked until this many tokens exist
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF: over prompt+output ids, logit > 0 → /p, logit < 0 → *p
    presence_penalty: float = 0.0  # OpenAI: over output ids, logit -= presence·(count > 0) + frequency·count
    frequency_penalty: float = 0.0
    seed: int | None = None  # the same seed gives the same tokens whatever else is in the batch
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int = 0  # top-n alternatives per generated token; the sampled token's is always reported
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def validate(self, *, vocab_size: int | None = None, max_tokens_limit: int | None = None,
                 max_logprobs: int = 20) -> None:
        """Raise `SamplingParamsError` naming the first field outside its documented range.

        Ranges: max_tokens [1, max_tokens_limit], min_tokens [0, max_tokens], temperature [0, 2],
        top_k >= 0, top_p (0, 1], min_p [0, 1], repetition_penalty [0.01, 2], presence_penalty and
        frequency_penalty [-2, 2], seed [0, 2^64 - 1], stop strings non-empty, stop_token_ids
        [0, vocab_size), logprobs [0, max_logprobs]. Floats must also be finite. No value in these
        ranges can overflow float32 scores: the repetition penalty scales a logit by at most 100,
        the presence and frequency penalties shift it by at most 2 · (max_tokens + 1).
        """
        _check_int("max_tokens", self.max_tokens, 1, max_tokens_limit)
        _check_int("min_tokens", self.min_tokens, 0, self.max_tokens, note=" (at most max_tokens)")
        _check_float("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        _check_int("top_k", self.top_k, 0, note=" (0 disables it)")
        _check_float("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        _check_float("min_p", self.min_p, 0.0, 1.0)
        _check_float("repetition_penalty", self.repetition_penalty, MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY)
        _check_float("presence_penalty", self.presence_penalty, -MAX_ABS_PENALTY, MAX_ABS_PENALTY)
        _check_float("frequency_penalty", self.frequency_penalty, -MAX_ABS_PENALTY, MAX_ABS_PENALTY)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, SEED_MAX)
        for i, stop in enumerate(self.stop):
            if not isinstance(stop, str) or not stop:
                raise SamplingParamsError("stop", f"stop[{i}] must be a non-empty string, got {stop!r}")
        top_id = None if vocab_size is None else vocab_size - 1
        note = "" if vocab_size is None else f" (below vocab_size {vocab_size})"
        for i, token_id in enumerate(self.stop_token_ids):
            _check_int("stop_token_ids", token_id, 0, top_id, label=f"stop_token_ids[{i}]", note=note)
        _check_int("logprobs", self.logprobs, 0, max_logprobs, note=" (max_logprobs)")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingParamsError(name, f"{name} must be a bool, got {getattr(self, name)!r}")


class _TokenCounts:
    """The distinct ids of a token stream and how often each occurred, as index-ready tensors.

    Invariant: `_ids[:_n]` are distinct and `_counts[j]` is the number of occurrences of
    `_ids[j]`. Buffers grow by doubling, so `add` is amortised O(1).
    """

    def __init__(self, token_ids: Sequence[int] = ()):
        ids, counts = np.unique(np.asarray(token_ids, dtype=np.int64), return_counts=True)
        self._n = len(ids)
        self._ids = np.empty(max(16, 2 * self._n), dtype=np.int64)
        self._counts = np.empty_like(self._ids, dtype=np.float32)
        self._ids[: self._n], self._counts[: self._n] = ids, counts
        self._slot = {token_id: j for j, token_id in enumerate(ids.tolist())}

    def __len__(self) -> int:
        return self._n

    def add(self, token_id: int) -> None:
        slot = self._slot.get(token_id)
        if slot is not None:
            self._counts[slot] += 1
            return
        if self._n == len(self._ids):
            self._ids = np.resize(self._ids, 2 * self._n)
            self._counts = np.resize(self._counts, 2 * self._n)
        self._ids[self._n], self._counts[self._n] = token_id, 1
        self._slot[token_id] = self._n
        self._n += 1

    @property
    def ids(self) -> torch.Tensor:  # (n,) int64, shares memory: valid until the next `add`
        return torch.from_numpy(self._ids[: self._n])

    @property
    def counts(self) -> torch.Tensor:  # (n,) float32, aligned with `ids`
        return torch.from_numpy(self._counts[: self._n])


class SequenceSampling:
    """One sequence's sampling state, kept by the engine for the sequence's whole life.

    Keep the same object across preemption: re-prefilling rebuilds the KV cache, while the output
    counts and the generator position stay as they are, so a seeded sequence continues its stream.
    Invariant: the generator has made exactly one draw per token sampled (not argmaxed) for it.
    """

    def __init__(self, params: SamplingParams, prompt_token_ids: Sequence[int],
                 eos_token_ids: tuple[int, ...], vocab_size: int):
        self.params = params
        self.eos_token_ids = tuple(eos_token_ids)
        self.vocab_size = vocab_size  # the width of the logits rows the sampler gets for it
        self.output_token_ids: list[int] = []
        self.generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)
        # Penalty state exists only when the penalty is on (None = off).
        self.seen = _TokenCounts(prompt_token_ids) if params.repetition_penalty != 1.0 else None
        penalised = params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
        self.output_counts = _TokenCounts() if penalised else None
        eos = () if params.ignore_eos else self.eos_token_ids
        self.min_tokens_blocked = torch.tensor(sorted({*eos, *params.stop_token_ids}), dtype=torch.int64)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def blocks_stop_tokens(self) -> bool:
        """True while min_tokens forbids EOS and stop_token_ids."""
        return self.num_output_tokens < self.params.min_tokens and len(self.min_tokens_blocked) > 0

    def skip_draw(self) -> None:
        """Move the seeded stream past one token's draw, as sampling it did: a resumed request
        (`worker.engine.Request.output_token_ids`) then draws at each position what the first run
        drew there, so its output is the one an undisturbed run gives."""
        if self.generator is not None and not self.params.greedy:
            torch.rand(1, generator=self.generator, dtype=torch.float64)

    def append(self, token_id: int) -> None:
        """Record a generated token."""
        self.output_token_ids.append(token_id)
        if self.seen is not None:
            self.seen.add(token_id)
        if self.output_counts is not None:
            self.output_counts.add(token_id)


@dataclass
class TokenLogprobs:
    token_id: int  # the generated token
    logprob: float  # its log-probability under the raw logits
    top: list[tuple[int, float]]  # the `logprobs` most likely (token_id, logprob), best first


@dataclass
class SampleResult:
    token_ids: list[int]  # one per row; NO_TOKEN where the row failed
    logprobs: list[TokenLogprobs | None]  # one per row; None where the row asked for none
    errors: list[str | None]  # one per row: why the row got no token, or None


NONFINITE = ("sampling stopped: the scores were not finite (NaN or infinity) after the logits, "
             "penalties and temperature; this request's numbers cannot be sampled")


class Sampler:
    """Picks one token per row of a logits batch; see the module docstring for the order of steps."""

    def __init__(self, seed: int | None = None):
        # Shared by every unseeded row; seeded rows use their sequence's own generator.
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, states: Sequence[SequenceSampling]) -> SampleResult:
        """`logits` (B, V) float32 or bfloat16, row i belonging to `states[i]`; it is not modified."""
        _check_batch(logits, states)
        logits = logits.cpu()  # sampling runs on CPU, where the per-sequence generators live
        if _plain_greedy(logits, states):
            return _greedy(logits)
        scores = apply_penalties(logits, states)  # (B, V) float32
        tokens = torch.full((len(states),), NO_TOKEN, dtype=torch.int64)  # (B,)
        # max is NaN when a NaN is in the row, inf with +inf, -inf when nothing finite is left
        usable = torch.isfinite(scores.amax(dim=-1)).tolist()  # O(B·V)
        greedy = [i for i, s in enumerate(states) if s.params.greedy and usable[i]]
        sampled = [i for i, s in enumerate(states) if not s.params.greedy and usable[i]]
        if greedy:
            tokens[greedy] = _argmax(_rows(scores, greedy))  # O(V) per row
        if sampled:  # a few O(V) passes per row (see sampling_distribution), then O(V) for the draw
            probs = sampling_distribution(_rows(scores, sampled), [states[i] for i in sampled])
            mass = probs.sum(dim=-1)  # not finite, or 0: dividing by the temperature overflowed
            ok = (torch.isfinite(mass) & (mass > 0)).tolist()
            keep = [j for j, good in enumerate(ok) if good]
            for j, i in enumerate(sampled):
                usable[i] = ok[j]
            if keep:  # the draw indexes by the CDF: only rows whose mass is a positive number
                rows = [sampled[j] for j in keep]
                tokens[rows] = _inverse_cdf(_rows(probs, keep), _uniforms([states[i] for i in rows], self.generator))
        errors = [None if ok else NONFINITE for ok in usable]
        return SampleResult(tokens.tolist(), _logprobs(logits, tokens, states, usable), errors)

    def row_by_row(self, logits: torch.Tensor, states: Sequence[SequenceSampling]) -> SampleResult:
        """Each row sampled on its own: a row whose sampling raises gets the exception as its error,
        the others their tokens. Slower; the engine uses it only after a batch raised."""
        out = SampleResult([], [], [])
        for i, state in enumerate(states):
            try:
                one = self(logits[i:i + 1], [state])
            except Exception as exc:  # noqa: BLE001 - the row's own failure, reported as its error
                one = SampleResult([NO_TOKEN], [None], [f"sampling failed: {type(exc).__name__}: {exc}"])
            out.token_ids += one.token_ids
            out.logprobs += one.logprobs
            out.errors += one.errors
        return out


def _check_batch(logits: torch.Tensor, states: Sequence[SequenceSampling]) -> None:
    if logits.dim() != 2 or logits.shape[0] != len(states):
        raise ValueError(f"logits must be (num_sequences={len(states)}, vocab), got {tuple(logits.shape)}")
    widths = {s.vocab_size for s in states}
    if widths - {logits.shape[1]}:
        raise ValueError(
            f"logits have {logits.shape[1]} columns but the sequences' vocab_size is {sorted(widths)}")


def _plain_greedy(logits: torch.Tensor, states: Sequence[SequenceSampling]) -> bool:
    """Every row greedy, without penalties or logprobs, on logits the native kernel reads."""
    return (native.loaded() and logits.dtype in (torch.float32, torch.bfloat16) and logits.stride(-1) == 1
            and all(s.params.greedy and s.params.logprobs == 0 for s in states)
            and not any(_penalised(states)))


def _greedy(logits: torch.Tensor) -> SampleResult:
    """`Sampler.__call__`'s result for plain greedy rows, from one native pass over the logits as
    they are (no float32 copy, no separate amax): after a forward pass has streamed the weights
    through the caches, each torch operator here cost 40-90 us at batch 1 (~0.6 ms a step in all)."""
    picked = native.greedy_rows(logits).tolist()  # -1: the row's maximum is not finite
    errors = [None if t >= 0 else NONFINITE for t in picked]
    return SampleResult([t if t >= 0 else NO_TOKEN for t in picked], [None] * len(picked), errors)


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1) for rows whose maximum is finite: the native kernel's one pass where it is
    loaded (torch's CPU argmax is ~10x slower than its amax), else torch's."""
    if native.loaded() and x.dtype in (torch.float32, torch.bfloat16) and x.stride(-1) == 1:
        return native.argmax_rows(x)
    return x.argmax(-1)


def _rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x[rows]: x itself when rows is every row, else a copy."""
    return x if len(rows) == x.shape[0] else x[rows]


def _in_place_on_rows(x: torch.Tensor, rows: list[int], fn: Callable[[torch.Tensor], None]) -> None:
    """Apply the in-place `fn` to x[rows], copying out and back only when rows is a strict subset."""
    if len(rows) == x.shape[0]:
        fn(x)
        return
    sub = x[rows]
    fn(sub)
    x[rows] = sub


def _flat_index(rows: list[int], ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, id) pairs for `x[row_idx, col_idx]`: row rows[j] paired with each id in ids[j]."""
    lengths = torch.tensor([len(t) for t in ids])
    return torch.repeat_interleave(torch.tensor(rows), lengths), torch.cat(ids), lengths


def apply_penalties(logits: torch.Tensor, states: Sequence[SequenceSampling]) -> torch.Tensor:
    """(B, V) float32 scores after penalties and min_tokens blocking; `logits` is never modified."""
    scores = logits.float()  # a copy for bfloat16, `logits` itself for float32
    repeated, counted, blocked = _penalised(states)
    if not (repeated or counted or blocked):
        return scores
    if scores is logits:
        scores = scores.clone()  # O(B·V) copy, once per step with any penalty
    # Each step below is O(number of distinct ids involved): gather, update, scatter back.
    # Every row's ids are distinct, so no index is written twice.
    if repeated:
        row_idx, ids, lengths = _flat_index(repeated, [states[i].seen.ids for i in repeated])
        penalty = _per_row([states[i].params.repetition_penalty for i in repeated], lengths)
        score = scores[row_idx, ids]
        scores[row_idx, ids] = torch.where(score < 0, score * penalty, score / penalty)
    if counted:
        row_idx, ids, lengths = _flat_index(counted, [states[i].output_counts.ids for i in counted])
        counts = torch.cat([states[i].output_counts.counts for i in counted])
        presence = _per_row([states[i].params.presence_penalty for i in counted], lengths)
        frequency = _per_row([states[i].params.frequency_penalty for i in counted], lengths)
        scores[row_idx, ids] -= frequency * counts + presence  # every stored id has count > 0
    if blocked:
        row_idx, ids, _ = _flat_index(blocked, [states[i].min_tokens_blocked for i in blocked])
        scores[row_idx, ids] = -math.inf
    return scores


def _penalised(states: Sequence[SequenceSampling]) -> tuple[list[int], list[int], list[int]]:
    """The rows with a repetition penalty to apply, with presence/frequency counts, and with stop
    tokens blocked (min_tokens)."""
    repeated = [i for i, s in enumerate(states) if s.seen is not None and len(s.seen)]
    counted = [i for i, s in enumerate(states) if s.output_counts is not None and len(s.output_counts)]
    blocked = [i for i, s in enumerate(states) if s.blocks_stop_tokens]
    return repeated, counted, blocked


def _per_row(values: list[float], lengths: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(torch.tensor(values, dtype=torch.float32), lengths)


def sampling_distribution(scores: torch.Tensor, states: Sequence[SequenceSampling]) -> torch.Tensor:
    """(S, V) unnormalised probabilities each row draws from: zero outside its top-k / top-p /
    min-p set, proportional to softmax(scores / temperature) inside it.

    `scores` are penalised scores of sampled rows (temperature > 0).
    """
    temperature = torch.tensor([s.params.temperature for s in states], dtype=torch.float32)
    x = scores / temperature[:, None]  # (S, V) new tensor, O(S·V)
    top_k = [s.params.top_k for s in states]
    top_p = [s.params.top_p for s in states]
    min_p = [s.params.min_p for s in states]
    k_rows = [i for i, k in enumerate(top_k) if 0 < k < x.shape[1]]
    p_rows = [i for i, p in enumerate(top_p) if p < 1.0]
    m_rows = [i for i, m in enumerate(min_p) if m > 0.0]
    if k_rows:  # O(V log k) per row: a partial selection, never a sort
        _in_place_on_rows(x, k_rows, lambda sub: _top_k_(sub, [top_k[i] for i in k_rows]))
    probs = torch.softmax(x, dim=-1)  # (S, V), O(S·V)
    # The two filters below zero entries without renormalising: top-p works on the softmax after
    # top-k, as in HF, and min-p's threshold is relative to the row's largest probability.
    if p_rows:  # O(V) per row when the nucleus fits 256 candidates, widening ×8 otherwise
        _in_place_on_rows(probs, p_rows, lambda sub: _top_p_(sub, [top_p[i] for i in p_rows]))
    if m_rows:  # O(V) per row
        _in_place_on_rows(probs, m_rows, lambda sub: _min_p_(sub, [min_p[i] for i in m_rows]))
    return probs


def _top_k_(x: torch.Tensor, top_k: list[int]) -> None:
    """Mask to -inf every score below the row's k-th largest (ties with it stay, as in HF)."""
    k = torch.tensor(top_k)
    kth = x.topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])  # (R, 1)
    x.masked_fill_(x < kth, -math.inf)


def _top_p_(probs: torch.Tensor, top_p: list[float]) -> None:
    """Zero all but the most likely tokens whose probability reaches p (at least one is kept).

    `probs` (R, V) are normalised. A token stays iff the probability of the tokens ranked above
    it is < p. Rows are first solved from their TOP_P_FIRST_K most likely tokens; a row whose
    candidates sum to less than p is retried with 8× as many, up to the whole vocabulary (which
    always settles it).
    """
    rows_total, vocab = probs.shape
    p = torch.tensor(top_p, dtype=torch.float32)
    keep = torch.zeros_like(probs, dtype=torch.bool)  # (R, V)
    pending = torch.arange(rows_total)
    k = min(TOP_P_FIRST_K, vocab)
    while len(pending):
        values, ids = _rows(probs, pending.tolist()).topk(k, dim=-1)  # (n, k), best first
        cumulative = values.cumsum(dim=-1)
        above = torch.nn.functional.pad(cumulative[:, :-1], (1, 0))  # mass ranked above each
        # Settled rows' candidates reach p, so every token past them has >= p above it and goes.
        settled = cumulative[:, -1] >= p[pending]
        if k == vocab:
            settled[:] = True
        rows = pending[settled]
        keep[rows] = keep[rows].scatter_(1, ids[settled], above[settled] < p[rows, None])
        pending = pending[~settled]
        k = min(8 * k, vocab)
    probs.masked_fill_(~keep, 0.0)


def _min_p_(probs: torch.Tensor, min_p: list[float]) -> None:
    """Zero the probabilities below min_p times the row's largest one."""
    threshold = torch.tensor(min_p, dtype=torch.float32)[:, None] * probs.amax(dim=-1, keepdim=True)
    probs.masked_fill_(probs < threshold, 0.0)


def _uniforms(states: Sequence[SequenceSampling], generator: torch.Generator) -> torch.Tensor:
    """One U[0, 1) float64 per row; a seeded row's comes from its own generator, one per step."""
    u = torch.empty(len(states), dtype=torch.float64)
    unseeded = [i for i, s in enumerate(states) if s.generator is None]
    if unseeded:
        u[unseeded] = torch.rand(len(unseeded), generator=generator, dtype=torch.float64)
    for i, s in enumerate(states):
        if s.generator is not None:
            u[i] = torch.rand(1, generator=s.generator, dtype=torch.float64)[0]
    return u


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the token whose cumulative-probability interval holds u·total.

    Two levels: first a block of CDF_BLOCK tokens from the cumulative block sums, then the token
    inside that block. Both cumulative sums are float64 over few values (V/256 block sums, 256
    tokens), so even tokens far down a 49152-long row keep their own mass, while the only
    O(S·V) work is one float32 block-sum pass. `probs` (S, V) need not be normalised.
    """
    rows, vocab = probs.shape
    if vocab % CDF_BLOCK:  # an O(S·V) copy, only for vocabularies that are not a multiple of 256
        probs = torch.nn.functional.pad(probs, (0, -vocab % CDF_BLOCK))
    blocks = probs.reshape(rows, -1, CDF_BLOCK)  # (S, V/256, 256)
    block_cdf = blocks.sum(dim=-1).double().cumsum(dim=-1)  # (S, V/256)
    target = u[:, None] * block_cdf[:, -1:]  # (S, 1)
    block = _first_above(block_cdf, target)  # (S, 1)
    before = block_cdf.gather(1, (block - 1).clamp(min=0)).masked_fill(block == 0, 0.0)  # (S, 1)
    inside = blocks.gather(1, block[:, :, None].expand(-1, -1, CDF_BLOCK)).squeeze(1)  # (S, 256)
    token = _first_above(inside.double().cumsum(dim=-1), target - before)  # (S, 1)
    return (block * CDF_BLOCK + token).squeeze(1)


def _first_above(cdf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(S, 1) first index whose cdf exceeds target, capped at the last index with mass.

    The cap matters when rounding puts the target at or past the row's total; the first index
    reaching the total is the last one where the cdf rises, so its mass is > 0.
    """
    hit = torch.searchsorted(cdf, target, right=True)
    last = torch.searchsorted(cdf, cdf[:, -1:].contiguous())
    return torch.minimum(hit, last)


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, states: Sequence[SequenceSampling],
              usable: list[bool]) -> list[TokenLogprobs | None]:
    """log_softmax of the raw logits for rows that asked (and got a token): the chosen token's
    and the top n."""
    out: list[TokenLogprobs | None] = [None] * len(states)
    rows = [i for i, s in enumerate(states) if s.params.logprobs > 0 and usable[i]]
    if not rows:
        return out
    logprobs = torch.log_softmax(_rows(logits, rows).float(), dim=-1)  # (R, V), O(R·V)
    n = max(states[i].params.logprobs for i in rows)
    top_values, top_ids = logprobs.topk(n, dim=-1)  # (R, n), best first
    chosen = logprobs.gather(1, tokens[rows][:, None]).squeeze(1)  # (R,)
    rows_out = zip(rows, tokens[rows].tolist(), chosen.tolist(), top_ids.tolist(), top_values.tolist())
    for i, token_id, value, ids, values in rows_out:
        n_i = states[i].params.logprobs
        out[i] = TokenLogprobs(token_id, value, list(zip(ids[:n_i], values[:n_i])))
    return out
