"""One rank of one replica, run as a Ray actor.

Lifecycle, each step a typed method the controller calls in order:

    node_info()          where the actor landed (node, IP, device, its start-up environment)
    open_store()         rank 0 only: the rendezvous store on a free port
    init_group(...)      join the replica's process group
    load()               read this rank's slices of the checkpoint (`progress()` reports how far)
    start()              peers: follow rank 0's step plans; rank 0: warm up, then run the engine
    shutdown()

After `start`, Ray is out of the per-step loop: rank 0's engine thread drives the peers through
the process group. All of a rank's torch work (loading, warm-up, the step loop) runs on one
thread of its own, `_ComputeThread`, whatever thread Ray runs a method on. Ray calls to rank 0
carry only requests in (`submit`, `abort`) and outputs out (`poll`, which returns everything
produced since the last poll, batched per step).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import traceback
from concurrent.futures import Future, wait
from dataclasses import dataclass

import torch

from sharding.arch import ModelConfig
from sharding.group import TPGroup, interface_with_address, open_store
from sharding.pinning import claim_cores
from sharding.plan import RankPlan
from sharding.shm import ShmCommunicator
from worker import host_memory
from worker.engine import Engine, FinishReason, Request, RequestOutput
from worker.runner import ModelRunner
from worker.step import StepInput

log = logging.getLogger("tpserve.worker")

HEARTBEAT_S = 1.0  # an idle rank 0 pings its peers this often; far below any collective timeout
# A step running longer than this many collective timeouts makes rank 0 unhealthy. At TP > 1 a
# stuck rank is found by its peers' collectives timing out; at TP = 1 there is no peer, so the
# health check looks at the step itself. Generous: a whole step (a 512-token prefill of a large
# model on CPU) may legitimately outlast a single collective's timeout.
STUCK_STEP_TIMEOUTS = 4


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a rank needs, computed once by the controller."""

    replica_id: int
    rank: int
    world_size: int
    model_ref: str  # alias or checkpoint directory; resolved on the worker's own node
    plan: RankPlan
    dtype: str
    device: str  # "cpu" | "cuda"
    threads: int
    pin: bool  # pin to cores of its own when the replica talks through shared memory
    block_size: int
    num_blocks: int
    max_batch_size: int
    max_tokens_per_step: int
    max_model_len: int
    collective_timeout_s: float
    cuda_graphs_up_to: int = 0  # decode steps of up to this many sequences replay CUDA graphs
    prefix_caching: bool = True
    kv_cache_populate: str = "background"  # when a host KV cache's pages are faulted in (KVCache.populate)


def _normal_priority() -> None:
    """Ray starts worker processes at nice 15 (its `worker_niceness`): right for background
    tasks, wrong for a rank that is the whole point of the machine, which then loses its cores to
    anything else runnable. Every thread of this process goes back to nice 0 (threads made later
    inherit it); without the right to (CAP_SYS_NICE) it says so once and runs on as it is."""
    try:
        for task in os.listdir("/proc/self/task"):  # niceness is per thread on Linux
            if os.getpriority(os.PRIO_PROCESS, int(task)) > 0:
                os.setpriority(os.PRIO_PROCESS, int(task), 0)
    except PermissionError:
        log.warning("tpserve: this rank runs at nice %d and may not lower it; set RAY_worker_niceness=0 "
                    "where the Ray cluster is started", os.getpriority(os.PRIO_PROCESS, 0))
    except (OSError, ProcessLookupError):
        pass  # a thread ended while we looked


class _ComputeThread:
    """The one thread that runs this rank's torch work: loading, warm-up, then the step loop.

    OpenMP gives every thread that runs parallel code a team of worker threads of its own. Ray
    runs an actor's methods on a pool of threads, so loading on one, warming up on another and
    stepping on a third left three teams in the process; libgomp then counts more OpenMP threads
    than cores and stops spinning between parallel regions, and every region starts with futex
    wake-ups (measured: the forward 15 % slower inside the actor than in one process, a quarter
    of the CPU time in the kernel)."""

    def __init__(self, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn) -> Future:
        future: Future = Future()
        self._jobs.put((fn, future))
        return future

    def call(self, fn):
        return self.submit(fn).result()

    def stop(self) -> None:
        self._jobs.put((None, None))

    def _run(self) -> None:
        while True:
            fn, future = self._jobs.get()
            if fn is None:
                return
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on it
                    future.set_exception(exc)


@dataclass
class PollResult:
    outputs: list[RequestOutput]
    failure: str | None  # set once the replica can no longer run steps


class RankWorker:
    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        _normal_priority()
        torch.set_num_threads(spec.threads)
        self.device = torch.device("cuda", 0) if spec.device == "cuda" else torch.device("cpu")
        self.group: TPGroup | None = None
        self.runner: ModelRunner | None = None
        self.engine: Engine | None = None
        self._store = None
        self._progress = (0, 0)
        self._outbox: list[RequestOutput] = []
        self._outbox_ready = threading.Condition()
        self._failure: str | None = None
        self._step_started: float | None = None  # monotonic time the running engine step began
        self._stopping = threading.Event()
        self._compute = _ComputeThread(f"tpserve-rank{spec.rank}")
        self._compute.call(lambda: torch.set_num_threads(spec.threads))
        self._loop: Future | None = None  # the step loop (rank 0) or the follow loop (peers)

    # -- lifecycle ----------------------------------------------------------------------------
    def node_info(self) -> dict:
        import ray

        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "ip": ray.util.get_node_ip_address(),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "device": str(self.device),
            "cpus": sorted(os.sched_getaffinity(0)),
            "shm_free_bytes": ShmCommunicator.free_bytes(),
            "started_with_rank_environment": host_memory.started_with_rank_environment(),
            "mem_available_bytes": host_memory.available_bytes(),
        }

    def open_store(self, host: str) -> int:
        """Rank 0: the rendezvous store, listening on `host` only, on a port the OS picks."""
        self._store = open_store(host, 0, self.spec.world_size, True, self.spec.collective_timeout_s)
        return self._store.port

    def init_group(self, host: str, port: int, backend: str) -> None:
        import ipaddress

        s = self.spec
        # Read by torch when the gloo group is created, in this rank's own process.
        if ipaddress.ip_address(host).is_loopback:
            # The controller puts the store on loopback exactly when every rank is on this node;
            # then gloo listens on loopback too, not on the address the host name resolves to.
            os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        elif "GLOO_SOCKET_IFNAME" not in os.environ:  # an operator's own choice stands
            import ray

            ifname = interface_with_address(ray.util.get_node_ip_address())
            if ifname is not None:  # across hosts: the interface of the address Ray knows us by
                os.environ["GLOO_SOCKET_IFNAME"] = ifname
        store = self._store or open_store(host, port, s.world_size, False, s.collective_timeout_s)
        self.group = TPGroup.connect(store, s.rank, s.world_size, self.device, backend=backend,
                                     timeout_s=s.collective_timeout_s, tag=f"replica{s.replica_id}")
        if backend == "shm" and s.pin:
            self._pin()

    def _pin(self) -> None:
        """Ranks exchanging through shared memory spin while they wait; two of them on one core
        take turns instead (tens of microseconds per collective). Rank r of replica i gets its
        own `threads` cores, tried from the replica's first onwards, wrapping round the host's,
        and claimed machine-wide (`sharding.pinning`), so that no other rank of any server on
        this host spins on them. With too few free cores the rank is not pinned."""
        s = self.spec
        cores = sorted(os.sched_getaffinity(0))
        first = (s.replica_id * s.world_size + s.rank) * s.threads % len(cores)
        mine = claim_cores(s.threads, cores[first:] + cores[:first])
        if mine is None:
            log.warning("replica %d rank %d: fewer than %d free cores to pin to; not pinned",
                        s.replica_id, s.rank, s.threads)
            return
        for task in os.listdir("/proc/self/task"):  # every thread: affinity is per thread on Linux
            os.sched_setaffinity(int(task), set(mine))

    def load(self) -> dict:
        return self._compute.call(self._load)

    def _load(self) -> dict:
        from cluster.model_store import load_tokenizer, resolve_model

        s = self.spec
        path = resolve_model(s.model_ref)
        cfg = ModelConfig.from_dir(path)
        self.runner, report = ModelRunner.load(
            path, cfg, s.plan, self.group, dtype=s.dtype, num_blocks=s.num_blocks,
            block_size=s.block_size, max_positions=s.max_model_len, cuda_graphs_up_to=s.cuda_graphs_up_to,
            populate_cache=s.kv_cache_populate,
            progress=lambda done, total: setattr(self, "_progress", (done, total)),
        )
        if s.rank == 0:
            self.engine = Engine(
                self.runner, tokenizer=load_tokenizer(path), eos_token_ids=cfg.eos_token_ids,
                vocab_size=cfg.vocab_size, max_batch_size=s.max_batch_size,
                max_tokens_per_step=s.max_tokens_per_step, max_model_len=s.max_model_len,
                num_blocks=s.num_blocks, prefix_caching=s.prefix_caching,
            )
        return {"parameter_bytes": report.parameter_bytes, "seconds": report.seconds}

    def progress(self) -> tuple[int, int]:
        return self._progress

    def start(self) -> None:
        """Peers: follow rank 0. Rank 0: warm up through the peers, then loop. Both on the
        compute thread; this returns once rank 0 is warm."""
        if self.spec.rank == 0:
            self._compute.call(self._warm_up)
            self._loop = self._compute.submit(self._engine_loop)
        else:
            self._loop = self._compute.submit(self._follow_loop)

    def shutdown(self) -> None:
        self._stopping.set()
        if self.engine is not None:
            self.engine.wake()
        if self._loop is not None:
            wait([self._loop], timeout=10)
        self._compute.stop()
        if self.runner is not None:
            self.runner.cache.close()
        if self.group is not None:
            self.group.close()

    # -- rank 0: requests in, outputs out ----------------------------------------------------
    def submit(self, requests: list[Request]) -> None:
        for r in requests:
            r.arrival = time.monotonic()  # this node's clock: queue times are measured here
            if self._failure is not None:
                self._publish([RequestOutput(r.request_id, [], finish_reason=FinishReason.ERROR,
                                             error=self._failure)])
            else:
                self.engine.add_request(r)

    def abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.engine.abort(rid)

    def poll(self, timeout_s: float = 1.0) -> PollResult:
        """Everything produced since the last poll; waits up to `timeout_s` for something."""
        with self._outbox_ready:
            if not self._outbox and self._failure is None:
                self._outbox_ready.wait(timeout_s)
            outputs, self._outbox = self._outbox, []
        return PollResult(outputs, self._failure)

    def stats(self) -> dict:
        stats = self.engine.stats() if self.engine is not None else {}
        return {**stats, "failure": self._failure}

    def health(self) -> dict:
        alive = self._loop is not None and not self._loop.done()
        failure = self._failure or self._stuck_step()
        return {"ok": alive and failure is None, "failure": failure}

    def _stuck_step(self) -> str | None:
        started, limit = self._step_started, STUCK_STEP_TIMEOUTS * self.spec.collective_timeout_s
        if started is None or time.monotonic() - started <= limit:
            return None
        s = self.spec
        return (f"replica {s.replica_id} rank {s.rank}: an engine step has run for "
                f"{time.monotonic() - started:.0f} s (the limit is {STUCK_STEP_TIMEOUTS} x "
                f"engine.collective_timeout_s = {limit:g} s)")

    # -- threads ------------------------------------------------------------------------------
    def _warm_up(self) -> None:
        """One prefill and one decode, so the first real request does not pay kernel set-up, and
        the CUDA graphs of every decode batch size, when they are on."""
        table = list(range(min(2, self.spec.num_blocks)))
        n = min(8, self.spec.block_size * len(table) - 1)
        self.runner.run(StepInput.build([(list(range(1, n + 1)), 0, table)], self.spec.block_size))
        self.runner.run(StepInput.build([([1], n, table)], self.spec.block_size))
        self.runner.capture_graphs()

    def _engine_loop(self) -> None:
        last_sent = time.monotonic()
        try:
            while not self._stopping.is_set():
                self.engine.wait_for_work(0.1)
                if self.engine.has_work:
                    self._step_started = time.monotonic()
                    outputs = self.engine.step()
                    self._step_started = None
                    last_sent = time.monotonic()
                    if outputs:
                        self._publish(outputs)
                elif time.monotonic() - last_sent > HEARTBEAT_S:
                    self.runner.heartbeat()
                    last_sent = time.monotonic()
            self.runner.stop_peers()
        except Exception as exc:  # a dead peer or a timed-out collective ends the replica
            self._fail(exc)

    def _follow_loop(self) -> None:
        try:
            self.runner.follow()
        except Exception as exc:
            self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        s = self.spec
        self._failure = f"replica {s.replica_id} rank {s.rank} failed: {type(exc).__name__}: {exc}"
        traceback.print_exc()
        outputs = self.engine.abort_all(self._failure) if self.engine is not None else []
        self._publish(outputs)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        with self._outbox_ready:
            self._outbox.extend(outputs)
            self._outbox_ready.notify_all()

