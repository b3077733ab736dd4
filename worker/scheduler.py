"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step has a token budget (``max_tokens_per_step``). Running sequences go first, oldest
first: a decoding sequence takes one token, a sequence still in its prompt takes the next chunk of
it (long prompts are prefilled in chunks). Waiting sequences then join in arrival order while
budget, batch slots and KV blocks last. When a running sequence needs a block and none is free,
the youngest running sequence is preempted: its blocks are freed and it goes back to the front of
the queue, to be recomputed from its prompt and the tokens it already produced. Nothing it
generated is lost, and its sampling state (including a seeded generator's position) is kept.

Prefix caching: a sequence joining the batch first takes the cached blocks its tokens start with
(`BlockManager.share_prefix`); only the rest is prefilled. A preempted sequence usually finds its
own blocks still cached when it comes back, so "recompute" is often a lookup.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from worker.kv_cache import BlockManager


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    token_ids: list[int]  # the prompt, then every generated token
    num_prompt_tokens: int
    arrival: float
    num_computed: int = 0  # leading tokens whose K/V are in the cache
    status: Status = Status.WAITING
    preemptions: int = 0
    first_scheduled: float | None = None
    state: object = None  # the engine's per-request state (sampling, detokenizer)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def remaining(self) -> int:
        """Tokens not yet in the cache; 1 for a sequence in its decode phase."""
        return len(self.token_ids) - self.num_computed


@dataclass
class ScheduledStep:
    items: list[tuple[Sequence, int]]  # (sequence, tokens this step); decodes first
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch_size: int, max_tokens_per_step: int):
        self.blocks = blocks
        self.max_batch_size = max_batch_size
        self.max_tokens_per_step = max_tokens_per_step
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_hit_tokens = 0  # tokens of admitted sequences found in the prefix cache
        self.prefix_query_tokens = 0  # tokens of admitted sequences, looked up

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """A finished or aborted sequence leaves the scheduler; its blocks are freed now."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self.blocks.free(seq.seq_id)
        seq.status = Status.FINISHED

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep(items=[])
        budget = self._schedule_running(step, self.max_tokens_per_step)
        if not step.preempted:  # admitting new work right after evicting some would thrash
            self._schedule_waiting(step, budget)
        step.items.sort(key=lambda item: item[1] != 1)  # stable: decodes first, then prefill chunks
        return step

    def _schedule_running(self, step: ScheduledStep, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.remaining, budget)
            if not self._make_room(seq, seq.num_computed + n, step):
                break  # `seq` itself was the youngest and has been preempted
            self.blocks.allocate(seq.seq_id, seq.num_computed + n)
            step.items.append((seq, n))
            budget -= n
            i += 1
        return budget

    def _make_room(self, seq: Sequence, num_tokens: int, step: ScheduledStep) -> bool:
        """Preempts the youngest running sequences until `seq` can hold `num_tokens` tokens.
        False when `seq` had to be preempted itself."""
        while not self.blocks.can_allocate(seq.seq_id, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            step.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.seq_id)
        seq.num_computed = 0
        seq.preemptions += 1
        self.num_preemptions += 1
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)  # resumes before anything newer

    def _schedule_waiting(self, step: ScheduledStep, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            cached = self.blocks.share_prefix(seq.seq_id, seq.token_ids)  # a waiting sequence has no blocks
            seq.num_computed = cached
            n = min(seq.remaining, budget)
            if not self.blocks.can_allocate(seq.seq_id, seq.num_computed + n):
                self.blocks.free(seq.seq_id)  # it waits on: hold no shared blocks meanwhile
                seq.num_computed = 0
                break
            self.prefix_hit_tokens += cached
            self.prefix_query_tokens += seq.num_tokens
            self.waiting.popleft()
            self.blocks.allocate(seq.seq_id, seq.num_computed + n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            step.items.append((seq, n))
            budget -= n
