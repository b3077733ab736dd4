"""What keeps one bad client or one stuck part from hurting the rest, tested with small fakes:

* the router counts a request against admission until its handler releases it (its last message
  written), not merely until its engine finished it, so unread streams cannot pile up outputs;
* a failure report about a replica's old incarnation never takes out the rebuilt one;
* a rank 0 whose engine step runs far past the collective timeout reports itself unhealthy
  (at TP = 1 there is no peer whose collective would time out);
* shared memory fails safe: orphaned segments of dead processes are swept, /dev/shm without room
  means gloo, and spinning ranks claim their cores machine-wide.
"""

from __future__ import annotations

import asyncio
import os
import queue
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from cluster import router as router_module
from cluster.controller import Controller
from cluster.metrics import Metrics
from cluster.router import AdmissionPolicy, Overloaded, ReplicaUnavailable, Router
from cluster.validation import GenerateJob
from sharding import pinning
from sharding.group import SHM_CAPACITY_BYTES, resolve_backend
from sharding.shm import ShmCommunicator, proc_start_time
from worker.actor import RankWorker, WorkerSpec
from worker.engine import FinishReason, RequestOutput
from worker.sampling import SamplingParams

# -- the router, over fake replicas -----------------------------------------------------------------


class _Remote:
    """Stands in for a Ray actor method: `.remote(...)` runs it and returns its value."""

    def __init__(self, fn):
        self.remote = fn


class FakeHead:
    """Rank 0 of a replica whose engine finishes every request at once with one token."""

    def __init__(self):
        self._submitted: queue.SimpleQueue = queue.SimpleQueue()
        self.submit = _Remote(lambda batch: [self._submitted.put(r) for r in batch])
        self.abort = _Remote(lambda ids: None)
        self.poll = _Remote(self._poll)
        self.stats = _Remote(lambda: {})
        self.health = _Remote(lambda: {"ok": True, "failure": None})

    def _poll(self, timeout_s):
        outputs = []
        try:
            r = self._submitted.get(timeout=timeout_s)
            outputs.append(RequestOutput(r.request_id, [7], finish_reason=FinishReason.LENGTH,
                                         num_prompt_tokens=len(r.prompt_token_ids), num_output_tokens=1))
        except queue.Empty:
            pass
        return SimpleNamespace(outputs=outputs, failure=None)


_generations = iter(range(1000))


class FakeController:
    """Owns its replicas' health like `cluster.controller.Controller`: reports name a generation."""

    def __init__(self, replicas: int = 1):
        self.replicas = [self.fresh(i) for i in range(replicas)]

    @staticmethod
    def fresh(replica_id: int, head=None):
        return SimpleNamespace(replica_id=replica_id, head=head or FakeHead(), healthy=True, failure=None,
                               nodes=[], generation=next(_generations))

    def check(self):
        return self.replicas

    report_failure = Controller.report_failure
    _health = threading.Lock()


@pytest.fixture
def fake_ray(monkeypatch):
    monkeypatch.setattr(router_module, "ray", SimpleNamespace(get=lambda value, timeout=None: value))


def _job(name: str) -> GenerateJob:
    return GenerateJob(name, [1, 2, 3], SamplingParams(max_tokens=1))


async def _finished(handle) -> None:
    while not (await handle.next())[-1].finished:
        pass


def test_a_request_counts_for_admission_until_its_handler_releases_it(fake_ray):
    async def scenario():
        router = Router(FakeController(), AdmissionPolicy(max_batch_size=1, max_queued_requests=1), Metrics())
        router.start(asyncio.get_running_loop())
        try:
            first, second = router.submit(_job("a")), router.submit(_job("b"))
            await asyncio.gather(_finished(first), _finished(second))
            assert first.done and second.done  # the engine is done with both...
            with pytest.raises(Overloaded, match="2 requests admitted"):
                router.submit(_job("c"))  # ...but nobody has written their last message yet
            router.release(first)
            router.release(first)  # idempotent
            third = router.submit(_job("d"))
            await _finished(third)
            router.release(second)
            router.release(third)
            assert router._admitted == 0
        finally:
            await router.close(0)

    asyncio.run(scenario())


def test_a_stale_failure_report_does_not_take_out_the_rebuilt_replica(fake_ray):
    async def scenario():
        controller = FakeController()
        router = Router(controller, AdmissionPolicy(4, 4), Metrics())
        router.start(asyncio.get_running_loop())
        try:
            old_link, old_replica = router._links[0], controller.replicas[0]
            router._fail_replica(old_link, "rank 1 died")
            assert not router.serving
            new_replica = controller.replicas[0] = FakeController.fresh(0)
            router._revive(new_replica)
            assert router.serving
            # late reports about the old incarnation: a poll thread's, then the monitor's
            router._fail_replica(old_link, "poll failed: RayActorError")
            old_replica.healthy, old_replica.failure = False, "rank 1 is not running"
            router._fail_unhealthy(old_replica)
            assert router.serving and router._links[0].replica is new_replica
            handle = router.submit(_job("after"))
            await _finished(handle)
            router.release(handle)
            # a report about the current incarnation still counts
            router._fail_replica(router._links[0], "rank 0 died")
            assert not router.serving
            text = router.metrics.registry.get_sample_value
            assert text("tpserve_replica_failures_total", {"replica": "0"}) == 2
            assert text("tpserve_replica_restarts_total", {"replica": "0"}) == 1
        finally:
            await router.close(0)

    asyncio.run(scenario())


def test_the_controller_alone_marks_a_replica_failed_and_only_its_current_generation():
    controller = FakeController(2)
    old = controller.replicas[0]
    assert controller.report_failure(0, old.generation, "rank 1 died")
    assert not controller.report_failure(0, old.generation, "poll failed")  # the first failure stays
    assert (old.healthy, old.failure) == (False, "rank 1 died")
    new = controller.replicas[0] = FakeController.fresh(0)
    assert not controller.report_failure(0, old.generation, "late report about the old one")
    assert new.healthy and controller.replicas[1].healthy
    assert controller.report_failure(0, new.generation, "rank 0 died") and not new.healthy


# -- failover: a failed replica's requests resume elsewhere -----------------------------------------


class ManualHead(FakeHead):
    """Rank 0 of a replica whose outputs the test writes (`emit`); it keeps what it was sent."""

    def __init__(self):
        super().__init__()
        self.requests: list = []
        self.aborted: list = []
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.submit = _Remote(lambda batch: self.requests.extend(batch))
        self.abort = _Remote(lambda ids: self.aborted.extend(ids))

    def emit(self, request, tokens, finished=False):
        done = len(request.output_token_ids) + len(tokens)
        self._outbox.put(RequestOutput(request.request_id, tokens, finish_reason=FinishReason.LENGTH if finished
                                       else None, num_prompt_tokens=len(request.prompt_token_ids),
                                       num_output_tokens=done))

    def _poll(self, timeout_s):
        try:
            return SimpleNamespace(outputs=[self._outbox.get(timeout=timeout_s)], failure=None)
        except queue.Empty:
            return SimpleNamespace(outputs=[], failure=None)


class RebuildingController(FakeController):
    def __init__(self, replicas: int):
        self.replicas = [self.manual(i) for i in range(replicas)]
        self.restarts = 0

    @staticmethod
    def manual(replica_id: int):
        return FakeController.fresh(replica_id, ManualHead())

    def restart(self, replica_id: int):
        self.restarts += 1
        self.replicas[replica_id] = self.manual(replica_id)
        return self.replicas[replica_id]


def _hold_rebuilds(controller: RebuildingController) -> threading.Event:
    """Makes `controller`'s rebuilds wait (up to 10 s) until the returned event is set."""
    release = threading.Event()
    restart = controller.restart
    controller.restart = lambda rid: release.wait(10) and restart(rid)
    return release


async def _until(condition, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def _tokens(outputs):
    return [t for out in outputs for t in out.token_ids]


def test_a_failed_replicas_request_resumes_on_another_with_the_tokens_it_streamed(fake_ray):
    async def scenario():
        controller = RebuildingController(2)
        router = Router(controller, AdmissionPolicy(4, 4), Metrics())
        router.start(asyncio.get_running_loop())
        first, second = (r.head for r in controller.replicas)
        try:
            handle = router.submit(_job("a"))
            await _until(lambda: first.requests)
            (req,) = first.requests
            first.emit(req, [5, 6])
            got = await handle.next()
            router._fail_replica(router._links[0], "rank 1 died")
            await _until(lambda: second.requests)
            (resumed,) = second.requests
            assert resumed.output_token_ids == [5, 6] and resumed.prompt_token_ids == [1, 2, 3]
            assert resumed.request_id != req.request_id  # a new attempt: late outputs of the old one are ignored
            second.emit(resumed, [7], finished=True)
            got += await handle.next()
            assert _tokens(got) == [5, 6, 7] and got[-1].finished and got[-1].num_output_tokens == 3
            assert handle.replica_id == 1 and handle.failures == 1
            value = router.metrics.registry.get_sample_value
            assert value("tpserve_request_failovers_total", {"replica": "0"}) == 1
            router.release(handle)
        finally:
            await router.close(0)

    asyncio.run(scenario())


def test_a_request_waits_for_the_rebuild_when_no_replica_is_left(fake_ray):
    async def scenario():
        controller = RebuildingController(1)
        # The rebuild holds until the test has seen the request wait: a rebuild that is instant
        # could otherwise come and go between two looks of `_until`.
        release = _hold_rebuilds(controller)
        router = Router(controller, AdmissionPolicy(4, 4), Metrics(), rebuild=True)
        router.start(asyncio.get_running_loop())
        try:
            head = controller.replicas[0].head
            handle = router.submit(_job("a"))
            await _until(lambda: head.requests)
            head.emit(head.requests[0], [5])
            await handle.next()
            controller.replicas[0].healthy = False  # what the controller's check finds
            controller.replicas[0].failure = "rank 0 is not running"
            await _until(lambda: router._waiting)
            assert handle.waiting is not None and not handle.done and controller.restarts == 0
            release.set()
            await _until(lambda: controller.restarts == 1 and controller.replicas[0].head.requests)
            rebuilt = controller.replicas[0].head
            (resumed,) = rebuilt.requests
            assert resumed.output_token_ids == [5] and not router._waiting
            rebuilt.emit(resumed, [8], finished=True)
            assert _tokens(await handle.next()) == [8]
            router.release(handle)
        finally:
            release.set()
            await router.close(0)

    asyncio.run(scenario())


def test_a_new_request_waits_while_every_replica_is_being_rebuilt(fake_ray):
    async def scenario():
        controller = RebuildingController(1)
        release = _hold_rebuilds(controller)  # the rebuild takes a while
        router = Router(controller, AdmissionPolicy(4, 4), Metrics(), rebuild=True, wait_s=30)
        router.start(asyncio.get_running_loop())
        try:
            router._fail_replica(router._links[0], "rank 0 died")
            handle = router.submit(_job("new"))  # nothing is up: it waits instead of failing
            assert handle.waiting is not None and not handle.done
            release.set()
            await _until(lambda: controller.restarts == 1 and controller.replicas[0].head.requests)
            head = controller.replicas[0].head
            (req,) = head.requests
            assert req.output_token_ids == [] and req.prompt_token_ids == [1, 2, 3]
            head.emit(req, [4], finished=True)
            assert _tokens(await handle.next()) == [4]
            router.release(handle)
        finally:
            release.set()
            await router.close(0)

    asyncio.run(scenario())


def test_a_waiting_request_gives_up_after_failover_wait_s(fake_ray):
    async def scenario():
        controller = RebuildingController(1)
        release = threading.Event()
        controller.restart = lambda rid: release.wait(10) and None
        metrics = Metrics()
        router = Router(controller, AdmissionPolicy(4, 4), metrics, rebuild=True, wait_s=0.2)
        router.start(asyncio.get_running_loop())
        try:
            router._fail_replica(router._links[0], "rank 0 died")
            handle = router.submit(_job("new"))
            with pytest.raises(ReplicaUnavailable, match="no replica came back within 0.2 s"):
                await handle.next()
            router.release(handle)
            assert router._admitted == 0 and not router._waiting
            # no replica ever took it: counted as replica "none", not under a replica id of -1
            finished = {tuple(sorted(s.labels.items())): s.value for m in metrics.registry.collect()
                        if m.name == "tpserve_requests_finished" for s in m.samples if s.name.endswith("_total")}
            assert finished == {(("reason", "replica_failed"), ("replica", "none")): 1.0}, finished
        finally:
            release.set()
            await router.close(0)

    asyncio.run(scenario())


@pytest.mark.parametrize("retries,rebuild", [(0, False), (2, False)])
def test_a_request_ends_unavailable_when_it_cannot_fail_over(fake_ray, retries, rebuild):
    """Past its retries, or with no replica left and none rebuilt, a request ends UNAVAILABLE."""
    async def scenario():
        controller = RebuildingController(2)
        router = Router(controller, AdmissionPolicy(4, 4), Metrics(), rebuild=rebuild, max_retries=retries)
        router.start(asyncio.get_running_loop())
        try:
            handle = router.submit(_job("a"))
            router._fail_replica(router._links[0], "rank 1 died")
            if retries:
                assert not handle.done and handle.replica_id == 1
                router._fail_replica(router._links[1], "rank 0 died")
            with pytest.raises(ReplicaUnavailable) as err:
                await handle.next()
            expect = ("gave up after 1 replica failures" if not retries
                      else "no other replica, and failed replicas are not rebuilt")
            assert expect in str(err.value) and handle.done
            router.release(handle)
            assert router._admitted == 0 and not router._in_flight()
        finally:
            await router.close(0)

    asyncio.run(scenario())


# -- a stuck step at TP = 1 -----------------------------------------------------------------------


class StuckEngine:
    """An engine whose first step never returns (until released)."""

    def __init__(self):
        self.release = threading.Event()
        self.has_work = True

    def wait_for_work(self, timeout):
        pass

    def step(self):
        self.release.wait()
        self.has_work = False
        return []

    def wake(self):
        self.release.set()

    def abort_all(self, reason):
        return []


def _spec(**over) -> WorkerSpec:
    base = dict(replica_id=0, rank=0, world_size=1, model_ref="none", plan=None, dtype="float32", device="cpu",
                threads=torch.get_num_threads(), pin=False, block_size=16, num_blocks=4, max_batch_size=1,
                max_tokens_per_step=16, max_model_len=64, collective_timeout_s=0.05)
    return WorkerSpec(**{**base, **over})


def test_a_stuck_step_makes_rank_0_unhealthy():
    worker = RankWorker(_spec())
    worker.engine = StuckEngine()
    worker.runner = SimpleNamespace(heartbeat=lambda: None, stop_peers=lambda: None, cache=SimpleNamespace(close=lambda: None))
    worker._loop = worker._compute.submit(worker._engine_loop)
    try:
        assert worker.health()["ok"]  # a step under 4 x 0.05 s is fine
        deadline = time.monotonic() + 5
        while worker.health()["ok"] and time.monotonic() < deadline:
            time.sleep(0.02)
        health = worker.health()
        assert not health["ok"] and "an engine step has run for" in health["failure"]
        assert "engine.collective_timeout_s" in health["failure"]
    finally:
        worker.engine.release.set()
        worker.shutdown()
    assert worker.health()["failure"] is None  # the step ended: nothing is stuck any more


# -- shared memory that fails safe ----------------------------------------------------------------


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_orphaned_segments_of_dead_creators_are_swept():
    orphan = os.path.join(ShmCommunicator.SHM_DIR, f"{ShmCommunicator.NAME_PREFIX}replica9-shm-{_dead_pid()}-0bad")
    live = os.path.join(ShmCommunicator.SHM_DIR, f"{ShmCommunicator.NAME_PREFIX}replica9-shm-{os.getpid()}-0ok0")
    for path in (orphan, live):
        with open(path, "wb") as f:
            f.write(b"\0" * 64)
    try:
        removed = ShmCommunicator.sweep_orphans()
        assert orphan in removed and not os.path.exists(orphan)
        assert os.path.exists(live)  # its creator (this process) is alive
    finally:
        for path in (orphan, live):
            if os.path.exists(path):
                os.unlink(path)


def test_a_rank_0_killed_during_the_rendezvous_leaves_nothing_behind(tmp_path):
    """Rank 0 creates the segment and waits for a peer that never comes; it is SIGKILLed there.
    Its file stays until the next communicator on the host is created, which sweeps it."""
    code = f"""
import datetime, sys
import torch.distributed as dist
from sharding.shm import ShmCommunicator
store = dist.FileStore({str(tmp_path / 'store')!r}, 2)
print("ready", flush=True)
ShmCommunicator.create(store, 0, 2, capacity_bytes=1 << 16, timeout_s=60, tag="killed")
"""
    before = set(os.listdir(ShmCommunicator.SHM_DIR))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        assert child.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 20
        while not (set(os.listdir(ShmCommunicator.SHM_DIR)) - before) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = {n for n in set(os.listdir(ShmCommunicator.SHM_DIR)) - before if "killed" in n}
        assert left, "rank 0 created its segment"
    finally:
        child.kill()
        child.wait()
    assert all(os.path.exists(os.path.join(ShmCommunicator.SHM_DIR, n)) for n in left)
    ShmCommunicator.sweep_orphans()  # what the next create() runs first
    assert not any(os.path.exists(os.path.join(ShmCommunicator.SHM_DIR, n)) for n in left)


def test_auto_backend_falls_back_to_gloo_without_room_in_dev_shm(caplog):
    cpu = torch.device("cpu")
    need = ShmCommunicator.segment_bytes(2, SHM_CAPACITY_BYTES)
    assert resolve_backend("auto", cpu, True, 2, need) == "shm"
    with caplog.at_level("WARNING"):
        assert resolve_backend("auto", cpu, True, 2, need - 1) == "gloo"
    assert "/dev/shm has" in caplog.text and "using gloo" in caplog.text
    assert resolve_backend("shm", cpu, True, 2, 0) == "shm"  # asked for explicitly: the user's call
    assert resolve_backend("auto", cpu, False, 2, need) == "gloo"


def test_spinning_ranks_claim_their_cores_machine_wide(tmp_path):
    d = str(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from sharding.pinning import claim_cores
print(claim_cores(2, [0, 1, 2, 3], {d!r}), flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        assert holder.stdout.readline().strip() == "[0, 1]"
        assert pinning.claim_cores(2, [0, 1, 2, 3], d) == [2, 3]  # another server: other cores
        assert pinning.claim_cores(1, [0, 1, 2, 3], d) is None  # none left, none half-claimed
        assert sorted(os.listdir(d)) == ["core-0", "core-1", "core-2", "core-3"]
    finally:
        holder.kill()
        holder.wait()
    assert proc_start_time(holder.pid) is None
    assert pinning.claim_cores(2, [0, 1, 2, 3], d) == [0, 1]  # the dead holder's claims are stale
    pinning.release([0, 1, 2, 3], d)
    assert os.listdir(d) == []
