"""The engine loop of one replica, run by its rank 0: schedule → forward → sample → emit.

`Engine.step()` reads as what happens each iteration:

1. take in new requests and aborts (they arrive from other threads through an inbox);
2. schedule: pick sequences and token counts under the step's token budget (`Scheduler`);
3. forward: broadcast the step plan to the peers and run this rank's share (`ModelRunner`);
4. sample the next token of every sequence whose scheduled tokens reached its end;
5. append, detokenize, check stop conditions, free finished sequences' blocks;
6. return one `RequestOutput` delta per request that produced something.

Failure isolation: whatever belongs to one request (taking it in, sampling its row, detokenizing
or matching its stop strings) can only end that request, with FinishReason.ERROR and a message
saying what failed; the batch goes on. Only a failing forward step, which all requests share,
escapes `step()` (and fails the replica). Requests arrive checked by the front end (every field,
every range: `cluster.validation`); the engine re-checks only what would break the batch rather
than the request: an empty or too long prompt, token ids outside the vocabulary, a duplicate id.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from worker.detokenize import IncrementalDetokenizer
from worker.kv_cache import BlockManager
from worker.runner import ModelRunner
from worker.sampling import Sampler, SamplingParams, SequenceSampling
from worker.scheduler import Scheduler, Sequence
from worker.step import StepInput


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    EOS = "eos"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)
    # A resumed request (its first replica failed): the tokens it already generated and streamed.
    # They are prefilled after the prompt and count as output: penalties, min/max_tokens, the
    # seeded stream's position, stop strings and usage continue where they were, and their text,
    # already sent, is not sent again.
    output_token_ids: list[int] = field(default_factory=list)


@dataclass
class RequestOutput:
    """What one request produced in one step (a delta), or how it ended."""

    request_id: str
    token_ids: list[int]
    text: str = ""
    logprobs: list | None = None
    finish_reason: FinishReason | None = None
    stop: str | int | None = None  # the stop string or stop token id that ended it
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    queued_s: float | None = None  # on a request's first output: arrival to first scheduled
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _SeqState:
    params: SamplingParams
    sampling: SequenceSampling
    detok: IncrementalDetokenizer | None
    max_tokens: int  # params.max_tokens capped by the room left in max_model_len
    reported_queue: bool = False


@dataclass
class StepTimings:
    """Wall time per phase, summed over steps; `forward` includes the plan broadcast."""

    steps: int = 0
    schedule: float = 0.0
    broadcast: float = 0.0
    forward: float = 0.0
    sample: float = 0.0
    postprocess: float = 0.0
    tokens: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class Engine:
    def __init__(self, runner: ModelRunner, *, tokenizer, eos_token_ids: tuple[int, ...],
                 vocab_size: int, max_batch_size: int, max_tokens_per_step: int,
                 max_model_len: int, num_blocks: int, prefix_caching: bool = True):
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(eos_token_ids)
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.blocks = BlockManager(num_blocks, runner.block_size, prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_batch_size, max_tokens_per_step)
        self.sampler = Sampler()
        self.timings = StepTimings()
        self._seqs: dict[str, Sequence] = {}
        self._next_seq_id = 0
        self._inbox: deque = deque()  # ("add", Request) | ("abort", request_id), from any thread
        self._wakeup = threading.Event()

    # -- called from any thread ---------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self._inbox.append(("add", request))
        self._wakeup.set()

    def abort(self, request_id: str) -> None:
        self._inbox.append(("abort", request_id))
        self._wakeup.set()

    def wake(self) -> None:
        """Ends a `wait_for_work` early (new work, or shutdown)."""
        self._wakeup.set()

    def wait_for_work(self, timeout: float) -> None:
        if not self.has_work:
            self._wakeup.wait(timeout)
        self._wakeup.clear()

    @property
    def has_work(self) -> bool:
        return bool(self._inbox) or self.scheduler.has_work

    # -- the engine thread --------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs = self._take_inbox()
        t0 = time.perf_counter()
        scheduled = self.scheduler.schedule()
        if not scheduled.items:
            return outputs + self._fail_unschedulable()
        step = self._step_input(scheduled.items)
        t1 = time.perf_counter()
        logits = self.runner.run(step)
        t2 = time.perf_counter()
        sampling = [seq for seq, n in scheduled.items if seq.num_computed + n == seq.num_tokens]
        for seq, n in scheduled.items:
            seq.num_computed += n
            self.blocks.commit(seq.seq_id, seq.token_ids, seq.num_computed)  # full blocks join the cache
            if seq.first_scheduled is None:
                seq.first_scheduled = time.monotonic()
        result = self._sample(logits, sampling) if sampling else None
        t3 = time.perf_counter()
        if result is not None:
            for seq, token, lp, error in zip(sampling, result.token_ids, result.logprobs, result.errors):
                outputs.append(self._finish(seq, FinishReason.ERROR, error=f"request {seq.request_id}: {error}")
                               if error is not None else self._append_or_fail(seq, token, lp))
        self._record(t0, t1, t2, t3, time.perf_counter(), step.num_tokens)
        return outputs

    def abort_all(self, reason: str) -> list[RequestOutput]:
        """Ends every request with an error (the replica can no longer run steps)."""
        outputs = [self._finish(seq, FinishReason.ERROR, error=reason) for seq in list(self._seqs.values())]
        for kind, item in self._drain():
            if kind == "add":
                outputs.append(RequestOutput(item.request_id, [], finish_reason=FinishReason.ERROR,
                                             error=reason))
        return outputs

    def stats(self) -> dict:
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_blocks_used": self.blocks.num_used,
            "kv_blocks_total": self.blocks.num_blocks,
            "preemptions": self.scheduler.num_preemptions,
            "prefix_cache_hit_tokens": self.scheduler.prefix_hit_tokens,
            "prefix_cache_query_tokens": self.scheduler.prefix_query_tokens,
            "prefix_cache_blocks": self.blocks.num_cached,
            "timings": self.timings.as_dict(),
        }

    # -- steps of `step` ----------------------------------------------------------------------
    def _drain(self):
        while self._inbox:
            yield self._inbox.popleft()

    def _take_inbox(self) -> list[RequestOutput]:
        outputs = []
        for kind, item in self._drain():
            out = self._admit(item) if kind == "add" else self._abort(item)
            if out is not None:
                outputs.append(out)
        return outputs

    def _admit(self, req: Request) -> RequestOutput | None:
        error = self._unservable(req)
        if error is None:
            try:
                self._add_sequence(req)
            except Exception as exc:  # noqa: BLE001 - this request's own state failed to build
                error = f"could not start the request: {type(exc).__name__}: {exc}"
        if error is None:
            return None
        return RequestOutput(req.request_id, [], finish_reason=FinishReason.ERROR,
                             num_prompt_tokens=len(req.prompt_token_ids), error=f"request {req.request_id}: {error}")

    def _add_sequence(self, req: Request) -> None:
        prompt = list(req.prompt_token_ids)
        done = list(req.output_token_ids)
        seq = Sequence(self._next_seq_id, req.request_id, prompt + done, len(prompt), req.arrival)
        self._next_seq_id += 1
        detok = (IncrementalDetokenizer(self.tokenizer, prompt, req.params)
                 if self.tokenizer is not None else None)
        max_tokens = min(req.params.max_tokens, self.max_model_len - len(prompt))
        sampling = SequenceSampling(req.params, prompt, self.eos_token_ids, self.vocab_size)
        for token in done:  # the state the first run had after these tokens; their text was sent
            sampling.append(token)
            sampling.skip_draw()
            if detok is not None:
                detok.add(token)
        seq.state = _SeqState(req.params, sampling, detok, max_tokens, reported_queue=bool(done))
        self._seqs[req.request_id] = seq
        self.scheduler.add(seq)

    def _unservable(self, req: Request) -> str | None:
        """What would break the batch rather than this request (the front end checked every
        field and range; this guards the engine's own invariants). Sizes before per-id work."""
        if req.request_id in self._seqs:
            return f"duplicate request id {req.request_id!r}"
        ids = req.prompt_token_ids
        n = len(ids) + len(req.output_token_ids)
        if not ids:
            return "prompt is empty"
        if n >= self.max_model_len:
            return f"prompt has {n} tokens; max_model_len is {self.max_model_len}"
        if len(req.output_token_ids) >= req.params.max_tokens:
            return f"resumed with {len(req.output_token_ids)} tokens; max_tokens is {req.params.max_tokens}"
        if any(min(t) < 0 or max(t) >= self.vocab_size for t in (ids, req.output_token_ids) if t):
            return f"prompt token ids must be in [0, {self.vocab_size})"
        if -(-(n + 1) // self.blocks.block_size) > self.blocks.num_blocks:
            return f"prompt of {n} tokens does not fit in the KV cache"
        return None

    def _abort(self, request_id: str) -> RequestOutput | None:
        seq = self._seqs.get(request_id)
        if seq is None:
            return None  # already finished: its final output was sent
        return self._finish(seq, FinishReason.CANCELLED)

    def _fail_unschedulable(self) -> list[RequestOutput]:
        """Nothing could be scheduled: with nothing running, the head of the queue cannot fit
        even in an empty cache."""
        if self.scheduler.running or not self.scheduler.waiting:
            return []
        seq = self.scheduler.waiting[0]
        return [self._finish(seq, FinishReason.ERROR,
                             error=f"sequence of {seq.num_tokens} tokens does not fit in the KV cache")]

    def _step_input(self, items: list[tuple[Sequence, int]]) -> StepInput:
        seqs, wants_logits = [], []
        for seq, n in items:
            new = seq.token_ids[seq.num_computed: seq.num_computed + n]
            seqs.append((new, seq.num_computed, self.blocks.tables[seq.seq_id]))
            wants_logits.append(seq.num_computed + n == seq.num_tokens)
        return StepInput.build(seqs, self.blocks.block_size, logits=wants_logits)

    def _sample(self, logits, seqs: list[Sequence]):
        """One token per sequence; a row that cannot be sampled carries an error instead. When the
        batch raises, each row is sampled alone, so only the row that raises fails."""
        states = [seq.state.sampling for seq in seqs]
        try:
            return self.sampler(logits, states)
        except Exception:  # noqa: BLE001 - found and reported per row below
            return self.sampler.row_by_row(logits, states)

    def _append_or_fail(self, seq: Sequence, token: int, logprobs) -> RequestOutput:
        try:
            return self._append(seq, token, logprobs)
        except Exception as exc:  # noqa: BLE001 - detokenizing or stop matching failed for this request
            if seq.request_id not in self._seqs:  # it failed after its sequence was released
                return RequestOutput(seq.request_id, [], finish_reason=FinishReason.ERROR,
                                     error=f"request {seq.request_id}: {type(exc).__name__}: {exc}")
            return self._finish(seq, FinishReason.ERROR,
                                error=f"request {seq.request_id}: processing its output failed: "
                                      f"{type(exc).__name__}: {exc}")

    def _append(self, seq: Sequence, token: int, logprobs) -> RequestOutput:
        st: _SeqState = seq.state
        seq.token_ids.append(token)
        st.sampling.append(token)
        reason, stop, text = self._stop_reason(seq, token)
        if reason is None and seq.num_output_tokens >= st.max_tokens:
            reason = FinishReason.LENGTH
        if reason is not None and not isinstance(stop, str) and st.detok is not None:
            text += st.detok.flush()  # a stop string already cut the text where it matched
        out = RequestOutput(seq.request_id, [token], text, [logprobs] if logprobs else None,
                            num_prompt_tokens=seq.num_prompt_tokens,
                            num_output_tokens=seq.num_output_tokens)
        if not st.reported_queue:
            out.queued_s = (seq.first_scheduled or seq.arrival) - seq.arrival
            st.reported_queue = True
        if reason is not None:
            self._release(seq)
            out.finish_reason, out.stop = reason, stop
        return out

    def _stop_reason(self, seq: Sequence, token: int) -> tuple[FinishReason | None, str | int | None, str]:
        """(finish reason, matched stop, new text). EOS and stop ids are not detokenized."""
        params = seq.state.params
        if token in self.eos_token_ids and not params.ignore_eos:
            return FinishReason.EOS, None, ""
        if token in params.stop_token_ids:
            return FinishReason.STOP, token, ""
        detok = seq.state.detok
        if detok is None:
            return None, None, ""
        text = detok.add(token)
        if detok.matched_stop is not None:
            return FinishReason.STOP, detok.matched_stop, text
        return None, None, text

    def _finish(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> RequestOutput:
        text = ""
        if reason is not FinishReason.ERROR and seq.state.detok is not None:
            text = seq.state.detok.flush()
        self._release(seq)
        return RequestOutput(seq.request_id, [], text, finish_reason=reason,
                             num_prompt_tokens=seq.num_prompt_tokens,
                             num_output_tokens=seq.num_output_tokens, error=error)

    def _release(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)  # frees its KV blocks now
        del self._seqs[seq.request_id]

    def _record(self, t0, t1, t2, t3, t4, tokens) -> None:
        t = self.timings
        t.steps += 1
        t.schedule += t1 - t0
        t.broadcast += self.runner.last_broadcast_s
        t.forward += t2 - t1
        t.sample += t3 - t2
        t.postprocess += t4 - t3
        t.tokens += tokens
