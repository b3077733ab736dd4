"""Tests of sharding.shm.ShmCommunicator.

Multi-rank tests start one fresh process per rank (forkserver context with torch
preloaded: like "spawn", but cheap on this 2-core machine); the ranks rendezvous through
a TCPStore whose server lives in the pytest process. Worker functions run in the
children and return a small result (or raise: the traceback comes back and fails the test).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import time
import traceback
import uuid
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from sharding.shm import CollectiveError, CollectiveTimeout, PeerDied, ShmCommunicator

pytestmark = pytest.mark.skipif(
    not ShmCommunicator.supported(), reason="shared-memory collectives need Linux on x86-64")

CAP = 64 * 1024  # small capacity, so that moderately sized tensors are chunked
SHM_DIR = ShmCommunicator.SHM_DIR


# ---- process harness ------------------------------------------------------------------------

def _child(fn, rank, world, port, args, results, native_ranks):
    torch.set_num_threads(1)
    try:
        if rank in native_ranks:  # this rank's all_reduce runs csrc/shm_all_reduce.cpp
            from tpkernels import native
            assert native.available(), native.unavailable_reason()
        import sharding.shm
        assert (sharding.shm._native_ops() is not None) == (rank in native_ranks)
        store = dist.TCPStore("127.0.0.1", port, world + 1, False, timeout=timedelta(seconds=60))
        results.put((rank, None, fn(store, rank, world, *args)))
    except BaseException:
        results.put((rank, traceback.format_exc(), None))


def _mp_context():
    """Fresh-interpreter children like "spawn", but forked from a server that has already
    imported torch: each rank starts in ~0.1 s instead of ~2 s of CPU."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "sharding.shm"])
    return ctx


def _run(world, fn, *args, dying=(), timeout=60.0, native_ranks=()):
    """Run ``fn(store, rank, world, *args)`` in ``world`` spawned processes.

    Returns ({rank: result}, {rank: exitcode}). Ranks in ``dying`` are expected to die
    without reporting. Ranks in ``native_ranks`` load the native kernels, so that their
    all_reduce runs in C++ (the others' in Python; the two take the same steps).
    """
    ctx = _mp_context()
    master = dist.TCPStore("127.0.0.1", 0, world + 1, True,
                           timeout=timedelta(seconds=60), wait_for_workers=False)
    results = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(fn, r, world, master.port, args, results, native_ranks),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    out, errors = {}, {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) + len(errors) < world - len(dying):
            try:
                rank, err, res = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"ranks did not finish within {timeout} s; got {sorted(out)}")
            if err is not None:
                errors[rank] = err
            else:
                out[rank] = res
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        pytest.fail("\n".join(f"rank {r} failed:\n{tb}" for r, tb in sorted(errors.items())))
    return out, {r: p.exitcode for r, p in enumerate(procs)}


def _tag():
    return uuid.uuid4().hex


def _leftovers(tag):
    return [f for f in os.listdir(SHM_DIR) if tag in f]


# ---- data generators (every rank can compute every rank's input) ----------------------------

def _input(seed: int, rank: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    if dtype == torch.int64:
        return torch.randint(-(10 ** 12), 10 ** 12, (n,), generator=g)
    return (torch.randn(n, generator=g) * 3).to(dtype)


def _expected_sum(seed: int, world: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Sum in rank order, 16-bit floats accumulated in float32 (what the communicator does)."""
    acc_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    acc = _input(seed, 0, n, dtype).to(acc_dtype)
    for r in range(1, world):
        acc = acc + _input(seed, r, n, dtype).to(acc_dtype)
    return acc.to(dtype)


# ---- workers (run in the spawned ranks) ------------------------------------------------------

def _w_correctness(store, rank, world, tag, stress_iters):
    dist.init_process_group("gloo", store=dist.PrefixStore("gloo", store),
                            rank=rank, world_size=world)
    comm = ShmCommunicator.create(store, rank, world, capacity_bytes=CAP, timeout_s=30, tag=tag)
    assert _leftovers(tag) == [], "segment must be unlinked right after the rendezvous"
    _check_against_gloo(comm, rank, world)
    _check_bf16_rounding(comm, rank, world)
    _check_chunked_broadcast_gather(comm, rank, world)
    _stress(comm, rank, world, stress_iters)
    comm.barrier()
    comm.close()
    comm.close()  # idempotent
    with pytest.raises(CollectiveError, match="closed"):
        comm.all_reduce(torch.ones(4))
    dist.destroy_process_group()
    return "ok"


def _check_against_gloo(comm, rank, world):
    cap_f32 = CAP // 4
    sizes = [1, 2, 7, 255, 1024, 1031, cap_f32, cap_f32 + 1, 2 * CAP + 3, 3 * 2 ** 20 // 4 + 13]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.int64]
    for seed, (dtype, n) in enumerate((d, n) for d in dtypes for n in sizes):
        x = _input(seed, rank, n, dtype)
        ref = x.clone()
        comm.all_reduce(x)
        want = _expected_sum(seed, world, n, dtype)
        assert torch.equal(x, want), f"{dtype} n={n}: differs from the rank-ordered sum"
        dist.all_reduce(ref)
        if dtype == torch.int64 or (dtype == torch.float32 and world == 2):
            assert torch.equal(x, ref), f"{dtype} n={n}: differs from gloo"
        else:  # gloo may sum in another order, or in 16-bit precision
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(x.float(), ref.float(), rtol=tol, atol=tol * 10)
    # Non-flat shapes (one chunk and several chunks).
    for seed, shape in enumerate([(3, 576), (2, 3, 4), (40, 1000)], start=1000):
        x = _input(seed, rank, int(torch.Size(shape).numel()), torch.float32).view(shape)
        comm.all_reduce(x)
        want = _expected_sum(seed, world, x.numel(), torch.float32).view(shape)
        assert torch.equal(x, want)


def _bf16_specials(rank: int) -> torch.Tensor:
    """Sums that overflow, meet infinities and NaN, and float32 sums exactly halfway between two
    bfloat16 values (1 + 2**-8 rounds down to even, 1 + 3 * 2**-8 up); ranks past 1 add zeros."""
    h = 2.0 ** -8
    rows = {0: [3.0e38, float("inf"), float("nan"), 1.0, 1.0, -3.0e38, 1.0, -0.0, 2.0 ** -126],
            1: [3.0e38, float("-inf"), 1.0, h, 3 * h, -3.0e38, -1.0, -0.0, 2.0 ** -126]}
    row = rows.get(rank, [0.0] * len(rows[0]))
    return torch.tensor(row * 37, dtype=torch.float32).to(torch.bfloat16)  # long enough for vector loops


def _check_bf16_rounding(comm, rank, world):
    x = _bf16_specials(rank)
    comm.all_reduce(x)
    acc = _bf16_specials(0).float()
    for r in range(1, world):
        acc = acc + _bf16_specials(r).float()
    want = acc.to(torch.bfloat16)
    assert torch.equal(x.isnan(), want.isnan()), "bf16 all_reduce: NaNs differ from float32 sums rounded"
    keep = ~want.isnan()
    assert torch.equal(x[keep].view(torch.int16), want[keep].view(torch.int16)), (
        f"bf16 all_reduce: {x[:9].tolist()}, want {want[:9].tolist()} (float32 sums rounded to nearest even)")


def _check_chunked_broadcast_gather(comm, rank, world):
    for src in range(world):
        n = 3 * CAP // 8 + 5  # int64, over capacity: 4 chunks
        t = torch.arange(n) * (src + 1) if rank == src else torch.zeros(n, dtype=torch.int64)
        comm.broadcast(t, src=src)
        assert torch.equal(t, torch.arange(n) * (src + 1))
    for dst in range(world):
        # Uneven sizes, the largest spanning several chunks; different dtypes too.
        mine = torch.full(((rank + 1) * 9000 + 7,), float(rank), dtype=torch.float32)
        if rank == 1:
            mine = mine.to(torch.bfloat16).view(-1, 1)
        got = comm.gather(mine, dst=dst)
        if rank != dst:
            assert got is None
            continue
        assert len(got) == world and got[dst] is mine
        for j, g in enumerate(got):
            assert g.numel() == (j + 1) * 9000 + 7
            assert g.dtype == (torch.bfloat16 if j == 1 else torch.float32)
            assert g.shape == ((g.numel(), 1) if j == 1 else (g.numel(),))
            assert torch.all(g == j)


def _stress(comm, rank, world, iters):
    """Back-to-back collectives whose payload changes every call: stale or torn reads show."""
    base = torch.arange(4096, dtype=torch.float32)
    rank_sum = 1000 * sum(range(world))
    for i in range(iters):
        n = 1 + (i * 37) % 1500
        if i % 13 == 0:
            n = CAP // 4 + 1 + i % 200  # two chunks
        x = (base[:n] + i * 7).remainder_(1000)
        want = x * world + rank_sum
        x += 1000 * rank
        comm.all_reduce(x)
        if not torch.equal(x, want):
            bad = (x != want).nonzero()[0].item()
            raise AssertionError(f"iteration {i}: element {bad} is {x[bad]}, want {want[bad]}")

        if i % 7 == 0:
            src = i % world
            m = 1 + i % 40
            plan = torch.arange(m) + i * 100 if rank == src else torch.full((m,), -1)
            comm.broadcast(plan, src=src)
            assert torch.equal(plan, torch.arange(m) + i * 100), f"broadcast at {i}"
        if i % 11 == 0:
            dst = (i // 11) % world
            got = comm.gather(torch.full((rank + 1, 3 + i % 5), float(i * 10 + rank)), dst=dst)
            if rank == dst:
                for j, g in enumerate(got):
                    assert g.shape == (j + 1, 3 + i % 5) and torch.all(g == i * 10 + j), (i, j)
        if i % 8 == 3:
            y = torch.full((1 + i % 300,), 0.5 * (i % 64) + rank, dtype=torch.bfloat16)
            comm.all_reduce(y)
            want_y = torch.full_like(y, 0.5 * (i % 64) * world + sum(range(world)))
            assert torch.equal(y, want_y), f"bf16 all_reduce at {i}"
        if i % 97 == 5:
            # The source runs ahead while the receivers lag: it must not overwrite a
            # buffer they have not read yet.
            src = (i // 97) % world
            for burst in range(6):
                plan = torch.full((64,), i * 10 + burst) if rank == src else torch.zeros(64).long()
                if rank != src:
                    time.sleep(0.0005)
                comm.broadcast(plan, src=src)
                assert torch.all(plan == i * 10 + burst), f"broadcast burst at {i}.{burst}"
        if (i * 2654435761 + rank) % 89 == 0:
            time.sleep(0.0003)  # random-ish lag of one rank: other interleavings
        if i % 500 == 0:
            comm.barrier()


def _w_kill(store, rank, world, tag):
    victim = world - 1
    comm = ShmCommunicator.create(store, rank, world, capacity_bytes=CAP, timeout_s=30, tag=tag)
    x = torch.ones(1024)
    for i in range(300):
        x.fill_(i)
        comm.all_reduce(x)
        if i % 50 == 0:
            comm.broadcast(torch.zeros(8), src=0)
    if rank == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    last_ok = time.monotonic()
    try:
        while True:
            comm.all_reduce(x)
            last_ok = time.monotonic()
    except PeerDied as e:
        return type(e).__name__, str(e), time.monotonic() - last_ok


def _w_idle_and_timeout(store, rank, world, tag):
    # A rank waiting a long time must not burn a core. The per-call timeout overrides
    # the communicator's (0.2 s) for this wait.
    comm = ShmCommunicator.create(store, rank, world, capacity_bytes=CAP, timeout_s=0.2,
                                  rendezvous_timeout_s=30, tag=tag + "-idle")
    plan = torch.zeros(16, dtype=torch.int64)
    wall0, cpu0 = time.monotonic(), time.process_time()
    if rank == 1:
        time.sleep(1.0)
        plan.fill_(7)
    comm.broadcast(plan, src=1, timeout_s=10)
    wall, cpu = time.monotonic() - wall0, time.process_time() - cpu0
    assert torch.all(plan == 7)
    comm.close()
    result = {"idle_wall": wall, "idle_cpu": cpu}

    # A peer that never shows up: CollectiveTimeout; the peer then learns we aborted.
    comm = ShmCommunicator.create(store, rank, world, capacity_bytes=CAP, timeout_s=0.5,
                                  rendezvous_timeout_s=30, tag=tag + "-timeout")
    x = torch.ones(64)
    if rank == 0:
        t0 = time.monotonic()
        with pytest.raises(CollectiveTimeout) as info:
            comm.all_reduce(x)
        result["timeout_after"] = time.monotonic() - t0
        result["timeout_msg"] = str(info.value)
        store.set(tag + "/timed-out", "1")
        with pytest.raises(CollectiveError, match="cannot run barrier"):
            comm.barrier()
    else:
        store.wait([tag + "/timed-out"], timedelta(seconds=10))
        t0 = time.monotonic()
        with pytest.raises(PeerDied) as info:
            # Rank 0 posted its data before timing out, so the first call may complete.
            for _ in range(3):
                comm.all_reduce(x)
        result["aborted_after"] = time.monotonic() - t0
        result["aborted_msg"] = str(info.value)
    comm.close()

    # A per-call timeout overrides the communicator's (30 s) for that all_reduce.
    comm = ShmCommunicator.create(store, rank, world, capacity_bytes=CAP, timeout_s=30,
                                  tag=tag + "-percall")
    if rank == 0:
        t0 = time.monotonic()
        with pytest.raises(CollectiveTimeout, match="timed out after 0.3 s"):
            comm.all_reduce(torch.ones(64), timeout_s=0.3)
        result["percall_after"] = time.monotonic() - t0
        store.set(tag + "/percall", "1")
    else:
        store.wait([tag + "/percall"], timedelta(seconds=30))
    comm.close()

    # Mismatched all_reduce sizes are caught, not summed.
    comm = ShmCommunicator.create(store, rank, world, capacity_bytes=CAP, timeout_s=30,
                                  tag=tag + "-sizes")
    with pytest.raises(ValueError, match="all_reduce: rank .* passed"):
        comm.all_reduce(torch.ones(10 + rank))
    comm.close()

    # A peer arriving after rank 0 gave up on the rendezvous learns why.
    if rank == 0:
        with pytest.raises(CollectiveTimeout, match="attach of all 2 ranks"):
            ShmCommunicator.create(store, rank, world, capacity_bytes=CAP, timeout_s=30,
                                   rendezvous_timeout_s=0.3, tag=tag + "-late")
        store.set(tag + "/gave-up", "1")
    else:
        store.wait([tag + "/gave-up"], timedelta(seconds=30))
        with pytest.raises(CollectiveError, match="rank 0 gave up"):
            ShmCommunicator.create(store, rank, world, capacity_bytes=CAP, timeout_s=30,
                                   tag=tag + "-late")

    # Mismatched parameters: every rank fails the rendezvous with a clear error.
    with pytest.raises(CollectiveError, match="rank 1|unexpected size"):
        ShmCommunicator.create(store, rank, world, capacity_bytes=CAP * (rank + 1),
                               timeout_s=30, tag=tag + "-mismatch")
    return result


# ---- tests --------------------------------------------------------------------------------------

def _native_here() -> bool:
    from tpkernels import native
    return native.available()


# Which ranks run the native all-reduce: none, all, or some (the two implementations interleave
# their steps on one segment).
NATIVE_SETS = {"python": lambda world: (), "native": lambda world: tuple(range(world)),
               "mixed": lambda world: tuple(range(0, world, 2))}


def _native_ranks(which: str, world: int) -> tuple:
    if which != "python" and not _native_here():
        pytest.skip("native kernels unavailable")
    return NATIVE_SETS[which](world)


@pytest.mark.parametrize("world,stress_iters,which", [(2, 5000, "python"), (3, 1500, "python"),
                                                      (2, 5000, "native"), (2, 3000, "mixed"),
                                                      (3, 1500, "mixed")])
def test_collectives_match_reference(world, stress_iters, which):
    tag = _tag()
    out, codes = _run(world, _w_correctness, tag, stress_iters, timeout=120,
                      native_ranks=_native_ranks(which, world))
    assert out == {r: "ok" for r in range(world)} and set(codes.values()) == {0}
    assert _leftovers(tag) == []


@pytest.mark.parametrize("world,which", [(2, "python"), (3, "python"), (2, "native"), (3, "native")])
def test_sigkilled_peer_is_detected_fast(world, which):
    tag = _tag()
    victim = world - 1
    out, codes = _run(world, _w_kill, tag, dying=(victim,), native_ranks=_native_ranks(which, world))
    assert codes[victim] == -signal.SIGKILL
    for rank, (kind, msg, elapsed) in out.items():
        assert kind == "PeerDied"
        assert elapsed < 2.0, f"rank {rank} took {elapsed:.2f} s to notice"
        assert f"rank {rank}/{world}" in msg and "all_reduce" in msg
        # Rank 0 sees the victim's death (or, with 3 ranks, possibly another survivor's abort).
        assert f"rank {victim}" in msg or "aborted" in msg, msg
    assert _leftovers(tag) == []


@pytest.mark.parametrize("which", ["python", "native"])
def test_idle_wait_timeout_and_rendezvous_errors(which):
    tag = _tag()
    out, _ = _run(2, _w_idle_and_timeout, tag, native_ranks=_native_ranks(which, 2))
    r0, r1 = out[0], out[1]
    assert r0["idle_wall"] >= 0.9
    assert r0["idle_cpu"] < 0.25 * r0["idle_wall"], f"idle rank burned {r0['idle_cpu']:.2f} s CPU"
    assert 0.45 <= r0["timeout_after"] < 2.0
    assert "rank 0/2" in r0["timeout_msg"] and "all_reduce" in r0["timeout_msg"]
    assert "waiting for rank 1" in r0["timeout_msg"]
    assert r1["aborted_after"] < 1.0 and "rank 0 aborted" in r1["aborted_msg"]
    assert 0.25 <= r0["percall_after"] < 2.0
    assert _leftovers(tag) == []


def test_single_rank_and_argument_checks():
    store = dist.HashStore()
    tag = _tag()
    comm = ShmCommunicator.create(store, 0, 1, capacity_bytes=4096, timeout_s=5, tag=tag)
    assert _leftovers(tag) == []
    x = torch.arange(10.0)
    comm.all_reduce(x)
    comm.broadcast(x)
    assert torch.equal(x, torch.arange(10.0))
    assert comm.gather(x)[0] is x
    comm.barrier()
    with pytest.raises(ValueError, match="contiguous"):
        comm.all_reduce(torch.ones(4, 4).t())
    with pytest.raises(CollectiveError, match="cannot run"):  # unusable after an error
        comm.all_reduce(x)
    comm.close()

    with pytest.raises(ValueError, match="already used"):
        ShmCommunicator.create(store, 0, 1, capacity_bytes=4096, timeout_s=5, tag=tag)
    with pytest.raises(ValueError):
        ShmCommunicator.create(store, 2, 2, capacity_bytes=4096, timeout_s=5, tag=_tag())
    with pytest.raises(ValueError):
        ShmCommunicator.create(store, 0, 1, capacity_bytes=8, timeout_s=5, tag=_tag())
    assert _leftovers(tag) == []


def test_liveness_probe_sees_zombies():
    import subprocess

    from sharding.shm import proc_start_time
    assert proc_start_time(os.getpid()) is not None
    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 5
    # Exited but not reaped: a zombie must count as dead (os.kill(pid, 0) would succeed).
    while proc_start_time(child.pid) is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc_start_time(child.pid) is None
    child.wait()
    assert proc_start_time(child.pid) is None


def test_supported_reports_architecture(monkeypatch):
    import platform
    assert ShmCommunicator.supported()  # this module is skipped where it is not
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert not ShmCommunicator.supported()
