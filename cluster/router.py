"""The router: admits requests, spreads them over the replicas and streams their outputs back.

    router = Router(controller, AdmissionPolicy.from_config(controller.cfg), Metrics())
    router.start(asyncio.get_running_loop())         # on the event loop that serves gRPC
    handle = router.submit(job, timeout_s=30)        # GenerateJob -> RequestHandle, or raises
    outputs = await handle.next()                    # RequestOutput deltas, batched per step
    router.release(handle)                           # the call is over: abort it if still running
    await router.close(grace_s=5)                    # drain, then CANCELLED for the rest

Admission (`AdmissionPolicy`): a request counts from `submit` until its gRPC handler `release`s
it, i.e. until its last message is written, not merely until the engine finished it: a client
that opens streams and never reads them holds its slots, so it cannot make the server buffer an
unbounded number of finished outputs. A new request is refused at once with `Overloaded`
(RESOURCE_EXHAUSTED) when the admitted requests reach

    max_batch_size × healthy replicas          (what the engines can run at once)
  + server.max_queued_requests                  (what may wait for a batch slot)

capped by server.max_concurrent_requests when that is set. Nothing queues without bound.

Routing: each request goes to the healthy replica with the fewest requests in flight; ties go to
the one with the least outstanding work (prompt tokens not yet prefilled plus tokens still
allowed), then to the lowest replica id.

Threads and the event loop. Per replica, one sender thread makes the submit/abort Ray calls in
order (so an abort can never overtake its submit) and one poller thread makes the replica's only
`poll` calls. One monitor thread calls `controller.check()` and refreshes each replica's `stats()`
every `MONITOR_INTERVAL_S`. Threads only make Ray calls and hand results to the event loop with
`call_soon_threadsafe`; all router state (requests in flight, routability) is read and written on
the loop thread only, so it needs no locks.

Failure: a replica is taken out of routing when its poll reports a failure, a Ray call to it
fails, or the monitor finds it unhealthy (a dead actor is seen within about a second). A report
names the `_ReplicaLink` (one per replica incarnation) or the controller's replica object it is
about, and is ignored when that is no longer the current one: a late report about a replica's
old incarnation never takes out the rebuilt one. `on_health(False)` is called, and with
`rebuild` the monitor starts a thread that asks the controller for a fresh replica (placement,
actors, process group, weights), retrying with backoff; once it is up it takes requests again and
`on_health(True)` follows if every replica is routable.

Failover: the failed replica's requests do not fail. Each moves to the healthy replica with the
least load, or, when none is left, waits for a rebuild (at most `wait_s`, server.failover_wait_s,
and never past its own timeout). It is resubmitted under a new engine id with the tokens it already streamed
(`Request.output_token_ids`): the engine prefills prompt + those tokens and continues from there,
with penalties, stop strings, min/max_tokens, usage and the seeded stream's position where they
were, so the client's stream only pauses and a greedy or seeded output equals an undisturbed run.
A request that has failed over `max_retries` times ends with `ReplicaUnavailable` at the next
failure, as does one that cannot wait (no rebuilding, or the wait ran out).

Every request in flight therefore ends in one of six ways: its final output, an engine error, its
replicas' failures past its retries, its timeout, an abort by its client, or `close()`;
`RequestHandle.next()` waits for nothing else.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import ray

from cluster.validation import GenerateJob
from worker.engine import FinishReason, Request, RequestOutput

log = logging.getLogger("tpserve.router")

POLL_S = 0.5  # a poll returns after this long even when nothing was produced
RAY_CALL_TIMEOUT_S = 15.0  # a submit/abort/poll call that takes longer marks its replica failed
MONITOR_INTERVAL_S = 1.0  # health check and stats refresh period
STATS_TIMEOUT_S = 5.0
REBUILD_RETRY_S = (5.0, 15.0, 60.0)  # waits after failed rebuild attempts; the last one repeats


class Overloaded(Exception):
    """Admission refused: too many requests in flight."""


class ReplicaUnavailable(Exception):
    """No healthy replica, or the request's replica failed while serving it."""


class RequestTimeout(Exception):
    """The request ran past server.request_timeout_s."""


class EngineError(Exception):
    """The engine ended the request with an error of its own."""


@dataclass(frozen=True)
class AdmissionPolicy:
    max_batch_size: int
    max_queued_requests: int
    max_concurrent_requests: int | None = None

    @classmethod
    def from_config(cls, cfg) -> "AdmissionPolicy":
        return cls(cfg.engine.max_batch_size, cfg.server.max_queued_requests,
                   cfg.server.max_concurrent_requests)

    def limit(self, healthy_replicas: int) -> int:
        """Most requests in flight at once (see the module docstring)."""
        limit = self.max_batch_size * healthy_replicas + self.max_queued_requests
        if self.max_concurrent_requests is not None:
            limit = min(limit, self.max_concurrent_requests)
        return limit

    def explain(self, healthy_replicas: int) -> str:
        text = (f"max_batch_size {self.max_batch_size} × {healthy_replicas} healthy replicas + "
                f"max_queued_requests {self.max_queued_requests}")
        if self.max_concurrent_requests is not None:
            text += f", capped by max_concurrent_requests {self.max_concurrent_requests}"
        return text


class RequestHandle:
    """One admitted request. Outputs and the error that ends it arrive on the event loop."""

    def __init__(self, job: GenerateJob, engine_id: str, replica_id: int):
        self.job = job
        self.request_id = job.request_id  # the client's (or assigned) id
        self.engine_id = engine_id  # unique within the server; the engine's request id (per attempt)
        self.replica_id = replica_id  # the replica serving it, or the last one while it waits
        self.waiting: asyncio.TimerHandle | None = None  # failed over, waiting for a rebuild: its time limit
        self.failures = 0  # replica failures it has been through
        self.output_token_ids: list[int] = []  # every token handed to the client so far
        self.num_prompt_tokens = len(job.prompt_token_ids)
        self.max_tokens = job.params.max_tokens
        self.admitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.generated = 0
        self.done = False  # no longer in flight: finished, failed, aborted or expired
        self.released = False  # its call is over: it no longer counts for admission
        self.timer: asyncio.TimerHandle | None = None
        self._items: deque = deque()  # RequestOutput, then possibly one Exception
        self._ready = asyncio.Event()

    @property
    def remaining_work(self) -> int:
        prefill = self.num_prompt_tokens if self.first_token_at is None else 0
        return prefill + max(0, self.max_tokens - self.generated)

    async def next(self) -> list[RequestOutput]:
        """The outputs that arrived since the last call (at least one); raises the exception that
        ended the request once the outputs before it are taken."""
        while not self._items:  # bounded: every request ends (see the module docstring)
            self._ready.clear()
            await self._ready.wait()
        outputs = []
        while self._items and not isinstance(self._items[0], Exception):
            outputs.append(self._items.popleft())
        if not outputs:
            raise self._items.popleft()
        return outputs

    async def all(self) -> list[RequestOutput]:
        """Every output up to the final one (raises what ended the request otherwise)."""
        outputs: list[RequestOutput] = []
        while not (outputs and outputs[-1].finished):
            outputs += await self.next()
        return outputs

    def push(self, item: RequestOutput | Exception) -> None:
        self._items.append(item)
        self._ready.set()


@dataclass
class ReplicaState:
    """A replica as ModelInfo reports it."""

    replica_id: int
    healthy: bool
    failure: str | None
    nodes: list[dict]
    stats: dict = field(default_factory=dict)  # the replica's last stats(); {} when unknown


class _ReplicaLink:
    """The router's side of one replica: requests in flight and the sender and poller threads.

    `inflight`, `routable` and `failure` belong to the event loop; the threads only make Ray calls
    and report through `deliver(link, outputs)` / `fail(link, message)`, which they schedule on
    the loop, naming this link so that the router can ignore reports of a link it replaced.
    """

    def __init__(self, replica, loop: asyncio.AbstractEventLoop, deliver: Callable, fail: Callable):
        self.replica = replica
        self.replica_id: int = replica.replica_id
        self.inflight: dict[str, RequestHandle] = {}  # engine id -> handle
        self.routable = replica.healthy
        self.failure: str | None = replica.failure
        self._loop, self._deliver, self._fail = loop, deliver, fail
        self._ops: queue.SimpleQueue = queue.SimpleQueue()  # ("submit", Request) | ("abort", id) | None
        self._stopping = threading.Event()
        name = f"tpserve-replica{self.replica_id}"
        self._threads = [threading.Thread(target=self._send_loop, name=f"{name}-send", daemon=True),
                         threading.Thread(target=self._poll_loop, name=f"{name}-poll", daemon=True)]

    @property
    def work(self) -> int:
        return sum(h.remaining_work for h in self.inflight.values())

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def send_submit(self, request: Request) -> None:
        self._ops.put(("submit", request))

    def send_abort(self, engine_id: str) -> None:
        self._ops.put(("abort", engine_id))

    def stop(self) -> None:
        """Threads end after the operations already queued (the sender) or the current poll."""
        self._stopping.set()
        self._ops.put(None)

    def join(self, timeout: float) -> None:
        for t in self._threads:
            if t.is_alive() and t is not threading.current_thread():
                t.join(timeout)

    # -- threads ------------------------------------------------------------------------------
    def _send_loop(self) -> None:
        while True:
            ops = [self._ops.get()]
            while not self._ops.empty():
                ops.append(self._ops.get_nowait())
            for kind, batch in _runs([op for op in ops if op is not None]):
                call = self.replica.head.submit if kind == "submit" else self.replica.head.abort
                try:
                    ray.get(call.remote(batch), timeout=RAY_CALL_TIMEOUT_S)
                except Exception as exc:  # RayActorError, GetTimeoutError: the replica is gone
                    self._report(self._fail, self, f"{kind} failed: {type(exc).__name__}: {exc}")
                    return
            if None in ops:
                return

    def _poll_loop(self) -> None:
        head = self.replica.head
        while not self._stopping.is_set():
            try:
                result = ray.get(head.poll.remote(POLL_S), timeout=POLL_S + RAY_CALL_TIMEOUT_S)
            except Exception as exc:
                self._report(self._fail, self, f"poll failed: {type(exc).__name__}: {exc}")
                return
            outputs = result.outputs
            if result.failure:  # its ERROR outputs say the same; the failure ends them as UNAVAILABLE
                outputs = [o for o in outputs if o.finish_reason is not FinishReason.ERROR]
            if outputs:
                self._report(self._deliver, self, outputs)
            if result.failure:
                self._report(self._fail, self, result.failure)
                return

    def _report(self, fn: Callable, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the loop is closed: the server is gone and nobody waits for this


def _runs(ops: list[tuple[str, object]]):
    """Consecutive operations of one kind, batched into one call each, order kept."""
    for kind, group in itertools.groupby(ops, key=lambda op: op[0]):
        yield kind, [item for _, item in group]


class Router:
    def __init__(self, controller, policy: AdmissionPolicy, metrics,
                 on_health: Callable[[bool], None] | None = None, rebuild: bool = False,
                 max_retries: int = 2, wait_s: float = 120.0):
        self.controller = controller
        self.policy = policy
        self.metrics = metrics
        self.rebuild = rebuild
        self.max_retries = max_retries
        self.wait_s = wait_s  # longest a request waits for a replica to come back
        self._waiting: dict[str, RequestHandle] = {}  # failed over, waiting for a replica (by engine id)
        self._rebuilding: set[int] = set()  # replica ids with a rebuild thread (monitor side)
        self._on_health = on_health or (lambda serving: None)
        self._links: list[_ReplicaLink] = []
        self._admitted = 0  # requests submitted and not yet released (see the module docstring)
        self._ids = itertools.count()
        self._stats: dict[int, dict] = {}  # replaced whole by the monitor thread
        self._closed = False
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle (event loop thread) --------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._links = [_ReplicaLink(r, loop, self._deliver, self._fail_replica)
                       for r in self.controller.replicas]
        for link in self._links:
            link.start()
            self.metrics.replica_health(link.replica_id, link.routable)
        self._monitor = threading.Thread(target=self._monitor_loop, name="tpserve-monitor", daemon=True)
        self._monitor.start()

    async def close(self, grace_s: float = 0.0) -> None:
        """Refuses new requests, gives those in flight up to `grace_s` to finish, ends the rest
        with reason CANCELLED (a final message their clients still receive), then stops the
        threads."""
        self._closed = True
        deadline = time.monotonic() + grace_s
        while self._in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for handle in self._all_in_flight():
            handle.push(RequestOutput(handle.engine_id, [], finish_reason=FinishReason.CANCELLED,
                                      num_prompt_tokens=handle.num_prompt_tokens,
                                      num_output_tokens=handle.generated))
            self.abort(handle)
        self._stopping.set()
        for link in self._links:
            link.stop()
        await asyncio.to_thread(self._join)

    def _in_flight(self) -> int:
        return sum(len(link.inflight) for link in self._links) + len(self._waiting)

    def _all_in_flight(self) -> list[RequestHandle]:
        return [h for link in self._links for h in link.inflight.values()] + list(self._waiting.values())

    def _join(self) -> None:
        for link in self._links:
            link.join(POLL_S + 2)
        if self._monitor is not None:
            self._monitor.join(MONITOR_INTERVAL_S + 12)

    # -- requests (event loop thread) ---------------------------------------------------------
    def submit(self, job: GenerateJob, timeout_s: float | None = None) -> RequestHandle:
        """Admit and route `job`; raises Overloaded or ReplicaUnavailable."""
        if self._closed:
            raise ReplicaUnavailable("the server is shutting down")
        live = self._live()
        if not live and not (self.rebuild and self._links):
            raise ReplicaUnavailable(f"no healthy replica: {self._failures()}")
        limit = self.policy.limit(len(live))
        if self._admitted >= limit:
            raise Overloaded(f"server at capacity: {self._admitted} requests admitted (running, queued "
                             f"or still being written to their clients), limit {limit} = "
                             f"{self.policy.explain(len(live))}; retry later")
        handle = RequestHandle(job, f"{job.request_id}#{next(self._ids)}", -1)
        self._admitted += 1
        if timeout_s is not None:
            handle.timer = self._loop.call_later(timeout_s, self._expire, handle, timeout_s)
        if live:
            self._send(handle, self._least_loaded(live))
        else:  # every replica is down and being rebuilt: wait for one, like a failed-over request
            self._wait(handle, f"no healthy replica: {self._failures()}")
        return handle

    def _live(self) -> list[_ReplicaLink]:
        return [link for link in self._links if link.routable]

    @staticmethod
    def _least_loaded(live: list[_ReplicaLink]) -> _ReplicaLink:
        return min(live, key=lambda l: (len(l.inflight), l.work, l.replica_id))

    def _send(self, handle: RequestHandle, link: _ReplicaLink) -> None:
        """Start (or resume) `handle` on `link`, under a new engine id: a late output of an earlier
        attempt can never be taken for this one's."""
        self._stop_waiting(handle)
        handle.engine_id = f"{handle.request_id}#{next(self._ids)}"
        handle.replica_id = link.replica_id
        link.inflight[handle.engine_id] = handle
        job = handle.job
        link.send_submit(Request(handle.engine_id, list(job.prompt_token_ids), job.params,
                                 output_token_ids=list(handle.output_token_ids)))

    def release(self, handle: RequestHandle) -> None:
        """The call is over (its last message written, or the client gone): the request stops
        counting for admission, and is aborted in its engine if it is still running there (its KV
        blocks are freed at the engine's next step). Idempotent."""
        if not handle.released:
            handle.released = True
            self._admitted -= 1
        self.abort(handle)

    def abort(self, handle: RequestHandle) -> None:
        """Stop the request in its engine. A no-op once the request has ended."""
        if handle.done:
            return
        self._retire(handle, FinishReason.CANCELLED.value)

    # -- state --------------------------------------------------------------------------------
    @property
    def serving(self) -> bool:
        """True while every replica takes requests."""
        return not self._closed and bool(self._links) and all(l.routable for l in self._links)

    def replica_states(self) -> list[ReplicaState]:
        stats = self._stats
        return [ReplicaState(l.replica_id, l.routable, l.failure, list(l.replica.nodes),
                             stats.get(l.replica_id, {}) if l.routable else {})
                for l in self._links]

    # -- callbacks on the event loop ----------------------------------------------------------
    def _deliver(self, link: _ReplicaLink, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for out in outputs:
            handle = link.inflight.get(out.request_id)
            if handle is None:
                continue  # aborted, expired or failed already: the client is no longer waiting
            self._record_tokens(handle, out, now)
            if out.finish_reason is FinishReason.ERROR:
                handle.push(EngineError(out.error or "the engine failed the request"))
            else:
                handle.push(out)
            if out.finished:
                self._retire(handle, out.finish_reason.value, engine_done=True)

    def _record_tokens(self, handle: RequestHandle, out: RequestOutput, now: float) -> None:
        if not out.token_ids:
            return
        gap = None if handle.last_token_at is None else now - handle.last_token_at
        if handle.first_token_at is None:
            handle.first_token_at = now
            self.metrics.first_token(handle.replica_id, now - handle.admitted_at,
                                     handle.num_prompt_tokens, out.queued_s)
        handle.last_token_at = now
        handle.generated += len(out.token_ids)
        handle.output_token_ids += out.token_ids
        self.metrics.tokens(handle.replica_id, len(out.token_ids), gap)

    def _retire(self, handle: RequestHandle, reason: str, engine_done: bool = False) -> None:
        """The request is no longer in flight (it stops counting for routing), and is aborted in
        its engine unless the engine ended it (or its replica is out of routing)."""
        handle.done = True
        self._stop_waiting(handle)
        link = self._links[handle.replica_id] if handle.replica_id >= 0 else None
        if link is not None and link.inflight.pop(handle.engine_id, None) is not None:
            if not engine_done and link.routable:
                link.send_abort(handle.engine_id)
        if handle.timer is not None:
            handle.timer.cancel()
        self.metrics.request_finished(handle.replica_id, reason, time.monotonic() - handle.admitted_at)

    def _expire(self, handle: RequestHandle, timeout_s: float) -> None:
        if handle.done:
            return
        handle.push(RequestTimeout(f"request_timeout_s ({timeout_s:g} s) passed before the "
                                   "request finished"))
        self._retire(handle, "timeout")

    def _fail_replica(self, link: _ReplicaLink, message: str) -> None:
        replica_id = link.replica_id
        if self._links[replica_id] is not link or not link.routable:
            return  # about an incarnation already replaced, or already out of routing
        generation = getattr(link.replica, "generation", 0)
        log.error("replica %d (generation %d) taken out of routing: %s", replica_id, generation, message)
        link.routable, link.failure = False, message
        self.controller.report_failure(replica_id, generation, message)  # the controller owns health
        moving = list(link.inflight.values())
        link.inflight.clear()
        link.stop()
        for handle in moving:
            self._fail_over(handle, f"replica {replica_id} failed: {message}")
        self.metrics.replica_failed(replica_id)
        self.metrics.replica_stats(replica_id, {})  # nothing runs there any more
        self._on_health(self.serving)

    def _revive(self, replica) -> None:
        """Loop thread: a rebuilt replica takes requests again."""
        if self._closed:
            return  # the controller's shutdown stops it
        link = _ReplicaLink(replica, self._loop, self._deliver, self._fail_replica)
        self._links[replica.replica_id] = link
        link.start()
        self.metrics.replica_restarted(replica.replica_id)
        for handle in list(self._waiting.values()):
            self._send(handle, self._least_loaded(self._live()))
        self._on_health(self.serving)

    def _fail_over(self, handle: RequestHandle, reason: str) -> None:
        """Loop thread: `handle`'s replica failed. It resumes on the least loaded healthy replica,
        or waits for a rebuild, unless it has used up its retries or nothing will come back."""
        handle.failures += 1
        self.metrics.request_failover(handle.replica_id)
        if handle.failures > self.max_retries:
            return self._give_up(handle, f"{reason}; the request gave up after {handle.failures} "
                                         f"replica failures (server.max_request_retries {self.max_retries})")
        live = self._live()
        if live:
            target = self._least_loaded(live)
            log.info("request %s resumes on replica %d after %d tokens (%s)", handle.request_id,
                     target.replica_id, len(handle.output_token_ids), reason)
            return self._send(handle, target)
        if not self.rebuild or self._closed:
            return self._give_up(handle, f"{reason}; no other replica, and failed replicas are not rebuilt")
        self._wait(handle, reason)

    def _wait(self, handle: RequestHandle, reason: str) -> None:
        """`handle` waits for a replica to come back (`_revive` sends it), at most `wait_s`."""
        self._waiting[handle.engine_id] = handle
        handle.waiting = self._loop.call_later(
            self.wait_s, self._give_up, handle, f"{reason}; no replica came back within {self.wait_s:g} s")

    def _stop_waiting(self, handle: RequestHandle) -> None:
        if handle.waiting is not None:
            handle.waiting.cancel()
            handle.waiting = None
            self._waiting.pop(handle.engine_id, None)

    def _give_up(self, handle: RequestHandle, message: str) -> None:
        handle.push(ReplicaUnavailable(message))
        self._retire(handle, "replica_failed")

    def _failures(self) -> str:
        return "; ".join(f"replica {l.replica_id}: {l.failure}" for l in self._links) or "none started"

    # -- monitor thread -----------------------------------------------------------------------
    def _monitor_loop(self) -> None:
        while True:
            try:
                self._check_health()
                self._start_rebuilds()
                self._refresh_stats()
            except Exception:  # keep monitoring; a replica's own failure is reported above
                log.exception("replica monitor")
            if self._stopping.wait(MONITOR_INTERVAL_S):
                return

    def _check_health(self) -> None:
        for replica in self.controller.check():  # blocking Ray calls, bounded by their timeout
            if not replica.healthy:
                self._report(self._fail_unhealthy, replica)

    def _fail_unhealthy(self, replica) -> None:
        """Loop thread: the monitor found `replica` unhealthy; it counts only while it is the
        replica the current link serves (not an incarnation already rebuilt)."""
        link = self._links[replica.replica_id]
        if link.replica is replica:
            self._fail_replica(link, replica.failure or "the replica is unhealthy")

    def _start_rebuilds(self) -> None:
        """A replica taken out of routing gets one rebuild thread (when rebuilding is on)."""
        if not self.rebuild:
            return
        for replica in self.controller.replicas:
            rid = replica.replica_id
            if replica.healthy or rid in self._rebuilding or self._links[rid].routable:
                continue
            self._rebuilding.add(rid)
            threading.Thread(target=self._rebuild, args=(rid,), name=f"tpserve-rebuild{rid}",
                             daemon=True).start()

    def _rebuild(self, replica_id: int) -> None:
        """Rebuild thread: new placement, actors and process group; retried with backoff."""
        for attempt in itertools.count():
            if self._stopping.is_set():
                break
            try:
                replica = self.controller.restart(replica_id)
            except Exception as exc:
                wait = REBUILD_RETRY_S[min(attempt, len(REBUILD_RETRY_S) - 1)]
                log.error("rebuilding replica %d failed (%s); trying again in %g s", replica_id, exc, wait)
                if self._stopping.wait(wait):
                    break
                continue
            log.info("replica %d rebuilt", replica_id)
            self._report(self._revive, replica)
            break
        self._rebuilding.discard(replica_id)

    def _refresh_stats(self) -> None:
        refs = {r.replica_id: r.head.stats.remote() for r in self.controller.replicas if r.healthy}
        stats = {}
        for replica_id, ref in refs.items():
            try:
                stats[replica_id] = ray.get(ref, timeout=STATS_TIMEOUT_S)
            except Exception:
                continue  # the health check reports a dead replica
            self.metrics.replica_stats(replica_id, stats[replica_id])
        self._stats = stats

    def _report(self, fn: Callable, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the loop is closed
