"""Shared-memory collectives for the tensor-parallel ranks of one replica on one host.

With gloo, a few-KiB all-reduce between two local processes costs 0.5-1 ms (socket and
thread hand-offs). Here the ranks exchange data through one shared memory segment and
spin on counters in it, which brings the same all-reduce down to microseconds.

Segment layout (one file under /dev/shm, mapped by every rank; all integers are int64)
--------------------------------------------------------------------------------------
    [header: 256 B]    magic, version, world_size, capacity (bytes per slot), nonce
    [control: world_size blocks of 512 B, one per rank, 64-byte aligned]
        word 0  POSTED  last step whose data this rank has written into its slot
        word 1  DONE    last step this rank has completely finished (all reads included)
        word 2  STATE   0 empty, 1 active, 2 closed, 3 aborted
        word 3  PID     this rank's pid          } checked by waiting peers to notice
        word 4  START   its start time (/proc)   } a dead rank (and a reused pid)
        words 8..23     metadata of the step using buffer 0: gather: nbytes, dtype code,
                        ndim, shape[<=13]; broadcast: nbytes; all_reduce: numel*16+dtype
                        code (so mismatched calls raise instead of summing garbage)
        words 24..39    the same for buffer 1
    [data, 4 KiB aligned: 2 buffers x world_size slots x capacity bytes]
        slot(b, r) = data + (b * world_size + r) * capacity

Every control block is written only by its owner rank; peers only read it.

Protocol
--------
Every collective is split into *steps* (one per chunk of at most ``capacity`` bytes per
rank). All ranks call the collectives in the same order, so they agree on the step
number ``k`` (1, 2, 3, ...), and step ``k`` uses buffer ``b = k % 2``. In step ``k``:

    1. wait until every peer's DONE >= k - 2   (nobody still reads buffer b from step k-2)
    2. a producer writes its data (and metadata) into slot(b, own rank), then POSTED = k
    3. a consumer waits until POSTED >= k for the producers it needs, then reads their slots
    4. DONE = k

all_reduce and barrier: every rank produces and consumes. broadcast: the source
produces, the others consume. gather: every rank produces, the destination consumes
(the first step also tells every rank all the sizes, so all agree on the chunk count).
all_reduce sums the slots in rank order on every rank, so all ranks get bit-identical
results; bfloat16/float16 are summed in float32 and cast back once.

Invariants that make this safe under any interleaving:
  * A rank writes slot(b, r) only in steps k = b (mod 2), and only after every peer has
    DONE >= k - 2, so no reader of step k - 2 can see data of step k (no torn reads).
  * A reader of step k reads slot(b, j) only after seeing POSTED_j >= k; rank j writes that
    slot again only in step k + 2, which waits for the reader's DONE >= k. So the reader
    always sees exactly step k's data.
  * A rank publishes POSTED = k only after DONE = k - 1, so seeing POSTED_j >= k also
    proves DONE_j >= k - 1 (the step-1 wait is usually free after an all_reduce).

Memory ordering: this relies on x86-64's TSO model (stores become visible in program
order, loads are not reordered with older loads), and on aligned 8-byte loads/stores
being single-copy atomic. Writers store the data, then the counter; readers load the
counter, then the data. The data copies run in torch and the counter accesses in CPython,
separate compiled functions, so the compiler cannot reorder them either.
The native all-reduce (below) loads counters with acquire and stores them with release
semantics: plain moves on x86-64 that the compiler may not move the data copies across.
``ShmCommunicator.supported()`` is False on other architectures (ARM, POWER are weakly
ordered and would need fences); callers fall back to gloo there.

Waiting: spin on the counter; after 5 us, yield the CPU between spin bursts (when two
ranks share a core, the peer gets to run at once); after ``spin_s`` (2 ms; at least 20 ms in
the native all-reduces, which wait inside a forward) sleep with intervals growing from 20 us
to 1 ms, so a rank idle for seconds costs almost no CPU.
Every ~5 ms the waiter checks its peers (STATE, and that each pid is alive, not a zombie,
and still the same process: start time); a dead, closed or aborted peer raises PeerDied,
a wait past ``timeout_s`` (per communicator, or per call) raises CollectiveTimeout. Any
error (argument errors included: they desynchronize the group) marks this rank ABORTED
in the segment, so its peers fail fast too; the communicator is then unusable.

Native all-reduce: where the process has loaded the native kernels (`tpkernels.native`),
`all_reduce` of floating-point tensors runs the same steps in C++
(tpkernels/csrc/shm_all_reduce.cpp: the same waiting, probing, timeouts and errors), and the
decode stack (tpkernels/csrc/decode_stack.cpp) all-reduces between a step's blocks itself. Both
go through `ShmCommunicator.native`, which hands native code the last step number and takes
back the last one it did, so native and Python collectives interleave on one segment, and ranks
may even differ in which they run.

Limits: ranks must share one host, one /dev/shm and one pid namespace (checked at the
rendezvous; every rank fails together, so all can fall back to gloo).

Lifetime: rank 0 creates the file, publishes its name through the store, peers attach
and verify, and once all have attached every rank unlinks the file (whoever comes first).
Mappings stay valid after unlink, so nothing is left in /dev/shm even if a rank is later
SIGKILLed. A rank 0 killed after creating the file but before every peer attached leaves the
file behind; its name holds rank 0's pid, and every later `create` on the host removes such
files whose creator is gone (`sweep_orphans`). The file is opened with os.open + mmap,
bypassing multiprocessing.shared_memory and its resource tracker.
"""

from __future__ import annotations

import mmap
import os
import platform
import secrets
import sys
import time
from datetime import timedelta

import numpy as np
import torch

__all__ = ["ShmCommunicator", "CollectiveError", "CollectiveTimeout", "PeerDied"]


class CollectiveError(RuntimeError):
    """A shared-memory collective failed; the communicator cannot be used any more."""


class CollectiveTimeout(CollectiveError):
    """A peer did not reach the same collective within ``timeout_s``."""


class PeerDied(CollectiveError):
    """A peer process exited, closed its communicator, or aborted after an error."""


# ---- segment layout (offsets in bytes, indices in int64 words) -------------------------
_MAGIC = 0x74707368_6D5F3031  # "tpshm_01"
_VERSION = 1
_HEADER_BYTES = 256
_H_MAGIC, _H_VERSION, _H_WORLD, _H_CAPACITY, _H_NONCE = range(5)

_CTL_BYTES = 512
_CTL_WORDS = _CTL_BYTES // 8
_C_POSTED, _C_DONE, _C_STATE, _C_PID, _C_START = range(5)
_C_META = 8  # metadata of buffer b starts at word _C_META + b * _META_WORDS
_META_WORDS = 16
_M_NBYTES, _M_DTYPE, _M_NDIM, _M_SHAPE = 0, 1, 2, 3
_MAX_DIMS = _META_WORDS - _M_SHAPE

_ST_EMPTY, _ST_ACTIVE, _ST_CLOSED, _ST_ABORTED = 0, 1, 2, 3

_SLOT_ALIGN = 64
_DATA_ALIGN = 4096

# ---- waiting ------------------------------------------------------------------------------
_SPIN_BURST = 32  # counter reads between clock checks (~2 us)
_PURE_SPIN_S = 5e-6  # spin without yielding for this long (then yield between bursts)
_PROBE_S = 5e-3  # check peer liveness this often while waiting
_SLEEP_MIN_S = 20e-6
_SLEEP_MAX_S = 1e-3
# The native all-reduces run inside a forward, where the peer is computing the same layer and the
# wait is that layer's imbalance: they spin at least this long before sleeping. SmolLM2 at TP 2
# (its heads split 6 + 3) keeps rank 1 waiting ~2.4 ms an all-reduce; past a 2 ms spin it slept
# and woke up to 1 ms late, and rank 0 then waited for it. On a Zen 4 pair, the mixed workload
# in process, three alternating pairs of runs: rank 0's time in the 512-token steps' all-reduces
# (waiting and summing) went 2.7 -> 0.9, 2.9 -> 1.2 and 3.6 -> 2.4 s of ~50 s; the throughput
# moved within the VM's noise (+15, -3, -2 %).
_FORWARD_SPIN_S = 20e-3

# dtype <-> code in the segment metadata (gather sends each rank's dtype and shape).
_DTYPES = (
    torch.float32, torch.float16, torch.bfloat16, torch.float64,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
)
_DTYPE_CODE = {dt: i + 1 for i, dt in enumerate(_DTYPES)}

# all_reduce: dtype -> accumulation dtype (None: sum in the dtype itself).
_REDUCE_ACC = {
    torch.float32: None, torch.float64: None, torch.int64: None, torch.int32: None,
    torch.bfloat16: torch.float32, torch.float16: torch.float32,
}

# The dtypes the native all-reduce sums (tpkernels/csrc/shm_all_reduce.cpp), and how its errors
# start: "tpserve-shm:<kind>:<message>".
_NATIVE_REDUCE = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_NATIVE_ERROR = "tpserve-shm:"
_NATIVE_ERRORS = {"PeerDied": PeerDied, "CollectiveTimeout": CollectiveTimeout, "ValueError": ValueError}


def _native_ops():
    """The native kernels where this process has loaded them (this never builds them), else None:
    `all_reduce` then runs in Python."""
    from tpkernels import native

    return native if native.loaded() else None


_VIEW_CACHE_MAX = 512
_STORE_PREFIX = "tpserve_shm"


def _round_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def proc_start_time(pid: int) -> int | None:
    """Start time of ``pid`` (clock ticks since boot) or None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces or parentheses: split after the last ')'.
    fields = raw[raw.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X", b"x"):  # zombie / dead: exited, not yet reaped
        return None
    return int(fields[19])  # field 22 of stat(5)


class ShmCommunicator:
    """Collectives over shared memory for the ranks of one replica on one host.

    Build it with :meth:`create` on every rank. All ranks must call the same collectives
    in the same order (as with any process group). Tensors must be contiguous CPU
    tensors. Not thread-safe: one thread per rank drives it. A waiting thread holds the
    GIL while it spins (the first few microseconds) and releases it while it yields or
    sleeps; other Python threads of a rank can still delay it by holding the GIL.
    """

    SHM_DIR = "/dev/shm"
    NAME_PREFIX = "tpserve-shm-"

    # ---- construction ----------------------------------------------------------------------

    @staticmethod
    def supported() -> bool:
        """True where this implementation is valid: Linux on x86-64 (TSO), with /dev/shm."""
        return (
            sys.platform.startswith("linux")
            and platform.machine().lower() in ("x86_64", "amd64")
            and os.path.isdir(ShmCommunicator.SHM_DIR)
        )

    @staticmethod
    def free_bytes() -> int:
        """Bytes /dev/shm can still take (0 where there is none)."""
        try:
            st = os.statvfs(ShmCommunicator.SHM_DIR)
        except OSError:
            return 0
        return st.f_bavail * st.f_frsize

    @staticmethod
    def segment_bytes(world_size: int, capacity_bytes: int) -> int:
        """Size of the shared segment for these parameters."""
        cap = _round_up(capacity_bytes, _SLOT_ALIGN)
        return _ShmLayout(world_size, cap).total

    @classmethod
    def create(
        cls,
        store,
        rank: int,
        world_size: int,
        *,
        capacity_bytes: int,
        timeout_s: float,
        tag: str,
        spin_s: float = 2e-3,
        rendezvous_timeout_s: float | None = None,
    ) -> "ShmCommunicator":
        """Rendezvous through ``store`` (a torch.distributed Store) and map the segment.

        ``tag`` must be unique per communicator on this store (the keys it uses live
        under ``tpserve_shm/<tag>/``). ``capacity_bytes`` is the largest chunk one rank
        moves per step; bigger tensors are chunked. ``timeout_s`` bounds every wait of
        the collectives, ``rendezvous_timeout_s`` (default: ``timeout_s``) each wait of
        the rendezvous. ``spin_s``: how long a waiter spins (yielding the CPU between
        bursts) before it starts sleeping; the native all-reduces spin at least
        ``_FORWARD_SPIN_S`` (20 ms) whatever it is. Every rank raises if any rank fails to
        attach, so all can fall back to another backend together.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        if capacity_bytes < _SLOT_ALIGN:
            raise ValueError(f"capacity_bytes must be >= {_SLOT_ALIGN}, got {capacity_bytes}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if not cls.supported():
            raise CollectiveError(
                "shared-memory collectives need Linux on x86-64 with /dev/shm; use gloo")
        layout = _ShmLayout(world_size, _round_up(capacity_bytes, _SLOT_ALIGN))
        keys = _RendezvousKeys(tag, world_size)
        rdv_s = timeout_s if rendezvous_timeout_s is None else rendezvous_timeout_s
        wait = timedelta(seconds=min(rdv_s, 7 * 86400))  # the store needs a finite one

        path = mm = comm = None
        try:
            try:
                path, nonce, mm = cls._open_segment(store, rank, layout, keys, wait, tag)
                comm = cls(mm, rank, layout, nonce, timeout_s, spin_s, tag)
                comm._register()
            except Exception as e:
                store.set(keys.attached(rank), f"error: {e!r}")
                raise
            store.set(keys.attached(rank), "ok")
            cls._await_all(store, keys.attached, world_size, wait, "attach")
            # Everyone has mapped it: the name is no longer needed.
            cls._unlink(path)
            try:
                comm._check_peers_visible()
            except Exception as e:
                store.set(keys.verified(rank), f"error: {e!r}")
                raise
            store.set(keys.verified(rank), "ok")
            cls._await_all(store, keys.verified, world_size, wait, "verify")
            return comm
        except BaseException as e:
            if path is not None:
                cls._unlink(path)
            if comm is not None:
                comm._failure = "rendezvous failed"
                comm._set_state(_ST_ABORTED)
                comm._release()
            elif mm is not None:
                _close_quietly(mm)
            cls._note_failure(store, keys.failed(rank), e)
            raise

    @classmethod
    def _open_segment(cls, store, rank: int, layout: "_ShmLayout", keys: "_RendezvousKeys",
                      wait: timedelta, tag: str) -> tuple[str, int, mmap.mmap]:
        """Rank 0 creates the segment and publishes its name; the others map it."""
        if rank == 0:
            if store.check([keys.segment]):
                raise ValueError(f"tag {tag!r} was already used on this store")
            try:
                path, nonce, mm = cls._create_segment(layout, tag)
            except Exception as e:
                store.set(keys.segment, f"error: {e!r}")  # peers fail fast
                raise
            store.set(keys.segment, f"{os.path.basename(path)}:{nonce}")
            return path, nonce, mm
        cls._store_wait(store, [keys.segment], wait, "segment name from rank 0")
        value = store.get(keys.segment).decode()
        if value.startswith("error:"):
            raise CollectiveError(f"shm rendezvous: rank 0 failed: {value}")
        name, nonce = value.rsplit(":", 1)
        path = os.path.join(cls.SHM_DIR, name)
        try:
            return path, int(nonce), cls._attach_segment(path, layout.total)
        except FileNotFoundError:
            if store.check([keys.failed(0)]):
                reason = store.get(keys.failed(0)).decode()
                raise CollectiveError(
                    f"shm rendezvous: rank 0 gave up before rank {rank} attached: {reason}"
                ) from None
            raise CollectiveError(
                f"shared segment {path} not found: is rank {rank} on another host than rank 0?"
            ) from None

    @staticmethod
    def _note_failure(store, key: str, exc: BaseException) -> None:
        """Best effort: tell late peers why this rank left the rendezvous."""
        try:
            store.set(key, repr(exc))
        except Exception:
            pass

    @classmethod
    def sweep_orphans(cls) -> list[str]:
        """Unlinks the segments whose creator (the pid in their name) is gone; returns their
        paths. A segment of a live process is left alone, whatever its state."""
        removed = []
        try:
            names = [n for n in os.listdir(cls.SHM_DIR) if n.startswith(cls.NAME_PREFIX)]
        except OSError:
            return removed
        for name in names:
            pid = name.rsplit("-", 2)[-2]  # ...-<pid>-<random hex>
            if pid.isdigit() and proc_start_time(int(pid)) is None:
                cls._unlink(os.path.join(cls.SHM_DIR, name))
                removed.append(os.path.join(cls.SHM_DIR, name))
        return removed

    @classmethod
    def _create_segment(cls, layout: "_ShmLayout", tag: str):
        cls.sweep_orphans()
        safe_tag = "".join(c if c.isalnum() or c in "-_." else "_" for c in tag)[:64]
        nonce = secrets.randbits(62)
        name = f"{cls.NAME_PREFIX}{safe_tag}-{os.getpid()}-{secrets.token_hex(4)}"
        path = os.path.join(cls.SHM_DIR, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                os.ftruncate(fd, layout.total)  # zero-filled: all counters start at 0
                # Reserve the pages now: on a too small /dev/shm (64 MiB in Docker by
                # default) this fails cleanly instead of a SIGBUS on first touch.
                os.posix_fallocate(fd, 0, layout.total)
                mm = mmap.mmap(fd, layout.total)
            finally:
                os.close(fd)
        except BaseException:
            cls._unlink(path)
            raise
        hdr = memoryview(mm)[:_HEADER_BYTES].cast("q")
        hdr[_H_VERSION] = _VERSION
        hdr[_H_WORLD] = layout.world
        hdr[_H_CAPACITY] = layout.capacity
        hdr[_H_NONCE] = nonce
        hdr[_H_MAGIC] = _MAGIC  # last: marks the header complete
        hdr.release()
        return path, nonce, mm

    @staticmethod
    def _attach_segment(path: str, size: int) -> mmap.mmap:
        fd = os.open(path, os.O_RDWR)  # FileNotFoundError: explained by the caller
        try:
            if os.fstat(fd).st_size != size:
                raise CollectiveError(f"shared segment {path} has an unexpected size")
            return mmap.mmap(fd, size)
        finally:
            os.close(fd)

    @staticmethod
    def _unlink(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    @staticmethod
    def _store_wait(store, keys: list[str], wait: timedelta, what: str) -> None:
        try:
            store.wait(keys, wait)
        except Exception as e:
            missing = [k for k in keys if not store.check([k])]
            raise CollectiveTimeout(
                f"shm rendezvous: no {what} within {wait.total_seconds():g} s "
                f"(missing keys: {missing})") from e

    @classmethod
    def _await_all(cls, store, key_of, world_size: int, wait: timedelta, phase: str) -> None:
        keys = [key_of(r) for r in range(world_size)]
        cls._store_wait(store, keys, wait, f"{phase} of all {world_size} ranks")
        for r, key in enumerate(keys):
            value = store.get(key).decode()
            if value != "ok":
                raise CollectiveError(f"shm rendezvous ({phase}): rank {r} failed: {value}")

    def __init__(self, mm: mmap.mmap, rank: int, layout: "_ShmLayout", nonce: int,
                 timeout_s: float, spin_s: float, tag: str):
        """Private: use :meth:`create`."""
        self._mm = mm
        self._rank = rank
        self._world = layout.world
        self._cap = layout.capacity
        self._timeout_s = float(timeout_s)
        self._op_timeout_s = self._timeout_s  # deadline of the current call's waits
        self._spin_s = float(spin_s)
        self._tag = tag
        # Set once the communicator must not be used (closed or failed); checked per call.
        self._failure: str | None = None

        self._check_header(mm, layout, nonce)
        self._mv = memoryview(mm)
        # Header and control blocks as one int64 view: word index = _ctl_idx(rank, field).
        self._ctl = self._mv[:layout.data_offset].cast("q")
        self._data = torch.from_numpy(
            np.frombuffer(mm, dtype=np.uint8, count=layout.data_bytes, offset=layout.data_offset))
        self._data_offset = layout.data_offset
        self._channel: list[int] | None = None  # for native collectives, made on first use
        # all_reduce in C++ where the native kernels are loaded (benchmarks turn it off to compare)
        self.native_all_reduce = True
        self._slot_bytes = [
            [self._data[(b * self._world + r) * self._cap:][:self._cap] for r in range(self._world)]
            for b in range(2)
        ]
        self._peers = [j for j in range(self._world) if j != rank]
        self._peer_posted = [(j, self._ctl_idx(j, _C_POSTED)) for j in self._peers]
        self._peer_done = [(j, self._ctl_idx(j, _C_DONE)) for j in self._peers]
        self._my_posted = self._ctl_idx(rank, _C_POSTED)
        self._my_done = self._ctl_idx(rank, _C_DONE)
        self._peer_pid: dict[int, tuple[int, int]] = {}
        # all_reduce writes (numel * 16 + dtype code) of each step in the NBYTES word.
        self._my_sig = [self._meta_idx(rank, b, _M_NBYTES) for b in range(2)]
        self._peer_sig = [[(j, self._meta_idx(j, b, _M_NBYTES)) for j in self._peers]
                          for b in range(2)]

        self._step = 0  # last step this rank started
        # Lower bound on every peer's DONE counter (see the third invariant in the docstring).
        self._done_floor = 0
        self._views: dict[tuple, list[torch.Tensor]] = {}
        self._acc_buf: torch.Tensor | None = None

    @staticmethod
    def _ctl_idx(rank: int, field: int) -> int:
        return _HEADER_BYTES // 8 + rank * _CTL_WORDS + field

    def _meta_idx(self, rank: int, buf: int, field: int) -> int:
        return self._ctl_idx(rank, _C_META + buf * _META_WORDS + field)

    @staticmethod
    def _check_header(mm: mmap.mmap, layout: "_ShmLayout", nonce: int) -> None:
        expect = {_H_MAGIC: _MAGIC, _H_VERSION: _VERSION, _H_WORLD: layout.world,
                  _H_CAPACITY: layout.capacity, _H_NONCE: nonce}
        with memoryview(mm) as raw, raw[:_HEADER_BYTES] as head, head.cast("q") as hdr:
            found = {word: hdr[word] for word in expect}
        for word, value in expect.items():
            if found[word] != value:
                raise CollectiveError(
                    f"shared segment header mismatch (word {word}: {found[word]} != {value}); "
                    "do all ranks pass the same world_size and capacity_bytes?")

    def _register(self) -> None:
        pid = os.getpid()
        c = self._ctl
        c[self._ctl_idx(self._rank, _C_PID)] = pid
        c[self._ctl_idx(self._rank, _C_START)] = proc_start_time(pid) or 0
        c[self._ctl_idx(self._rank, _C_STATE)] = _ST_ACTIVE

    def _check_peers_visible(self) -> None:
        """All peers have registered; make sure this rank can watch their processes."""
        for j in self._peers:
            pid = self._ctl[self._ctl_idx(j, _C_PID)]
            start = self._ctl[self._ctl_idx(j, _C_START)]
            if self._ctl[self._ctl_idx(j, _C_STATE)] != _ST_ACTIVE or pid <= 0:
                raise CollectiveError(f"rank {j} did not register in the shared segment")
            if proc_start_time(pid) != start:
                raise CollectiveError(
                    f"rank {j}'s process (pid {pid}) is not visible from rank {self._rank}: "
                    "different pid namespace? shared-memory collectives need one host view")
            self._peer_pid[j] = (pid, start)

    # ---- public API --------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world

    @property
    def capacity_bytes(self) -> int:
        return self._cap

    # Every collective takes an optional ``timeout_s`` overriding the communicator's for
    # this call (e.g. float("inf") for a rank idling until the next request's step plan;
    # a dead peer is still detected within milliseconds).

    def all_reduce(self, t: torch.Tensor, *, timeout_s: float | None = None) -> None:
        """Sum ``t`` over all ranks, in place. Every rank gets bit-identical results."""
        self._start_op(t, "all_reduce", timeout_s)
        acc = _REDUCE_ACC.get(t.dtype, False)
        if acc is False:
            self._fail(TypeError(f"all_reduce: unsupported dtype {t.dtype}"), "all_reduce")
        if self._world == 1 or t.numel() == 0:
            return
        ops = _native_ops() if self.native_all_reduce else None
        if ops is not None and t.dtype in _NATIVE_REDUCE:
            self._run_native(lambda channel, who, timeout_s, step:
                             (None, ops.shm_all_reduce_(t, channel, who, timeout_s, step)), "all_reduce")
            return
        chunk = self._cap // t.element_size()
        if t.numel() <= chunk:
            self._all_reduce_step(t, acc)
            return
        flat = t.view(-1)
        for off in range(0, flat.numel(), chunk):
            self._all_reduce_step(flat[off:off + chunk], acc)

    def broadcast(self, t: torch.Tensor, src: int = 0, *, timeout_s: float | None = None) -> None:
        """Copy ``t`` of rank ``src`` into ``t`` of every rank (same size everywhere)."""
        self._start_op(t, "broadcast", timeout_s)
        self._check_rank(src, "broadcast")
        if t.dtype not in _DTYPE_CODE:
            self._fail(TypeError(f"broadcast: unsupported dtype {t.dtype}"), "broadcast")
        if self._world == 1 or t.numel() == 0:
            return
        nbytes = t.numel() * t.element_size()
        if nbytes <= self._cap:
            self._broadcast_step(t, src, nbytes)
            return
        flat = t.view(-1)
        chunk = self._cap // t.element_size()
        for off in range(0, flat.numel(), chunk):
            self._broadcast_step(flat[off:off + chunk], src, nbytes)

    def gather(self, t: torch.Tensor, dst: int = 0, *,
               timeout_s: float | None = None) -> list[torch.Tensor] | None:
        """Collect every rank's ``t`` on ``dst``: a list in rank order there, None elsewhere.

        Ranks may pass different shapes (and dtypes). The entry of ``dst`` itself is ``t``
        (not a copy); the others are new tensors.
        """
        self._start_op(t, "gather", timeout_s)
        self._check_rank(dst, "gather")
        if t.dtype not in _DTYPE_CODE or t.dim() > _MAX_DIMS:
            self._fail(TypeError(
                f"gather: unsupported tensor (dtype {t.dtype}, {t.dim()} dims)"), "gather")
        if self._world == 1:
            return [t]
        return self._gather(t, dst)

    def barrier(self, *, timeout_s: float | None = None) -> None:
        """Return once every rank has entered the barrier."""
        self._start_op(None, "barrier", timeout_s)
        if self._world == 1:
            return
        k = self._begin_step("barrier")
        self._ctl[self._my_posted] = k
        self._wait_all_posted(k, "barrier")
        self._ctl[self._my_done] = k

    def native(self, run, op: str = "all_reduce", *, timeout_s: float | None = None):
        """Runs `run(channel, who, timeout_s, step) -> (result, step)`, a native function that takes
        this rank's next all-reduces on the segment itself (tpkernels/csrc/shm_all_reduce.h): the
        decode stack, or `all_reduce` where the native kernels are loaded. It gets the segment's
        descriptor, this communicator's name for messages, the call's timeout and the last step done,
        and returns its result with the last step it did, which this communicator goes on from. A
        native collective error becomes the exception the Python path raises (PeerDied,
        CollectiveTimeout, ValueError); any other error in `run` leaves the ranks out of step, so
        either marks this rank failed. Returns `result`."""
        self._start_op(None, op, timeout_s)
        return self._run_native(run, op)

    def _run_native(self, run, op: str):
        """`native` once the call's checks are done and its timeout is set (`_start_op`)."""
        before = self._step
        try:
            result, step = run(self._native_channel(), self._who(), self._op_timeout_s, before)
        except RuntimeError as e:
            text = str(e)
            at = text.find(_NATIVE_ERROR)
            kind, _, message = text[at + len(_NATIVE_ERROR):].partition(":") if at >= 0 else ("", "", "")
            self._fail(_NATIVE_ERRORS[kind](message.strip()) if kind in _NATIVE_ERRORS else e, op)
        if step > before:
            self._step = step
            self._done_floor = step - 1  # each peer posted the last step after finishing the one before
        return result

    def _native_channel(self) -> list[int]:
        """The integers `tpserve_shm::Channel` reads: the segment's address, this rank, the world size,
        the slot capacity, the data offset, the spin time (ns), then (pid, start time) per rank."""
        if self._channel is None:
            pids = [self._peer_pid.get(j, (os.getpid(), 0)) for j in range(self._world)]
            spin_ns = int(max(self._spin_s, _FORWARD_SPIN_S) * 1e9)
            self._channel = [self._data.data_ptr() - self._data_offset, self._rank, self._world, self._cap,
                             self._data_offset, spin_ns, *(v for pair in pids for v in pair)]
        return self._channel

    def close(self) -> None:
        """Leave the group and unmap the segment. Idempotent."""
        if self._mm is None:
            return
        if self._failure is None:
            self._failure = "communicator closed"
            self._set_state(_ST_CLOSED)
        self._release()

    def __enter__(self) -> "ShmCommunicator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- collectives, one step at a time ----------------------------------------------------

    def _all_reduce_step(self, t: torch.Tensor, acc: torch.dtype | None) -> None:
        k = self._begin_step("all_reduce")
        b = k & 1
        c = self._ctl
        slots = self._slot_views(b, t.dtype, t.shape)
        # The size (in elements x dtype code) lets peers catch mismatched calls.
        signature = t.numel() * 16 + _DTYPE_CODE[t.dtype]
        c[self._my_sig[b]] = signature
        slots[self._rank].copy_(t)
        c[self._my_posted] = k
        self._wait_all_posted(k, "all_reduce")
        for j, idx in self._peer_sig[b]:
            if c[idx] != signature:
                self._fail(ValueError(
                    f"all_reduce: rank {self._rank} passed {t.numel()} x {t.dtype}, rank {j} "
                    f"passed {c[idx] // 16} x {_DTYPES[c[idx] % 16 - 1]}"), "all_reduce")
        # Sum in rank order on every rank, so all ranks compute the very same values.
        if acc is None:
            torch.add(slots[0], slots[1], out=t)
            for s in slots[2:]:
                t.add_(s)
        else:
            buf = self._acc_view(t.shape)
            buf.copy_(slots[0])
            for s in slots[1:]:
                buf.add_(s)
            t.copy_(buf)
        self._ctl[self._my_done] = k

    def _broadcast_step(self, t: torch.Tensor, src: int, total_nbytes: int) -> None:
        k = self._begin_step("broadcast")
        b = k & 1
        slot = self._slot_views(b, t.dtype, t.shape)[src]
        c = self._ctl
        if self._rank == src:
            c[self._meta_idx(src, b, _M_NBYTES)] = total_nbytes
            slot.copy_(t)
            c[self._my_posted] = k
        else:
            self._wait_one(src, self._ctl_idx(src, _C_POSTED), k, "broadcast")
            if c[self._meta_idx(src, b, _M_NBYTES)] != total_nbytes:
                self._fail(ValueError(
                    f"broadcast: rank {self._rank} passed {total_nbytes} bytes, source rank "
                    f"{src} sent {c[self._meta_idx(src, b, _M_NBYTES)]}"), "broadcast")
            t.copy_(slot)
        c[self._my_done] = k

    def _gather(self, t: torch.Tensor, dst: int) -> list[torch.Tensor] | None:
        c = self._ctl
        cap = self._cap
        mine = t.view(-1).view(torch.uint8)
        nbytes = mine.numel()

        # Step 1: everybody posts its metadata and first chunk; everybody waits for all,
        # because the chunk count depends on the largest tensor.
        k = self._begin_step("gather")
        b = k & 1
        self._write_meta(b, t, nbytes)
        first = min(nbytes, cap)
        self._slot_bytes[b][self._rank][:first].copy_(mine[:first])
        c[self._my_posted] = k
        self._wait_all_posted(k, "gather")
        sizes = [c[self._meta_idx(j, b, _M_NBYTES)] for j in range(self._world)]
        out = None
        if self._rank == dst:
            out = [t if j == dst else self._empty_from_meta(j, b) for j in range(self._world)]
            out_bytes = [o.view(-1).view(torch.uint8) for o in out]
            self._copy_chunks(b, out_bytes, sizes, 0)
        c[self._my_done] = k

        # Remaining chunks: producers post, only dst waits and reads.
        for off in range(cap, max(sizes), cap):
            k = self._begin_step("gather")
            b = k & 1
            n = min(max(nbytes - off, 0), cap)
            if n:
                self._slot_bytes[b][self._rank][:n].copy_(mine[off:off + n])
            c[self._my_posted] = k
            if out is not None:
                self._wait_all_posted(k, "gather")
                self._copy_chunks(b, out_bytes, sizes, off)
            c[self._my_done] = k
        return out

    def _write_meta(self, b: int, t: torch.Tensor, nbytes: int) -> None:
        c = self._ctl
        base = self._meta_idx(self._rank, b, 0)
        c[base + _M_NBYTES] = nbytes
        c[base + _M_DTYPE] = _DTYPE_CODE[t.dtype]
        c[base + _M_NDIM] = t.dim()
        for i, size in enumerate(t.shape):
            c[base + _M_SHAPE + i] = size

    def _empty_from_meta(self, j: int, b: int) -> torch.Tensor:
        c = self._ctl
        base = self._meta_idx(j, b, 0)
        dtype = _DTYPES[c[base + _M_DTYPE] - 1]
        shape = [c[base + _M_SHAPE + i] for i in range(c[base + _M_NDIM])]
        return torch.empty(shape, dtype=dtype)

    def _copy_chunks(self, b: int, out_bytes: list, sizes: list, off: int) -> None:
        """On dst: copy every peer's chunk at byte offset ``off`` out of buffer ``b``."""
        for j in self._peers:
            n = min(max(sizes[j] - off, 0), self._cap)
            if n:
                out_bytes[j][off:off + n].copy_(self._slot_bytes[b][j][:n])

    # ---- step bookkeeping and waiting ------------------------------------------------------

    def _begin_step(self, op: str) -> int:
        """Start the next step; return its number once its buffer is free to write."""
        k = self._step + 1
        self._step = k
        if self._done_floor < k - 2:
            c = self._ctl
            for j, idx in self._peer_done:
                if c[idx] < k - 2:
                    self._wait(j, idx, k - 2, op)
            self._done_floor = k - 2
        return k

    def _wait_all_posted(self, k: int, op: str) -> None:
        c = self._ctl
        for j, idx in self._peer_posted:
            if c[idx] < k:
                self._wait(j, idx, k, op)
        # Each peer posted step k after finishing step k - 1.
        self._done_floor = k - 1

    def _wait_one(self, j: int, idx: int, target: int, op: str) -> None:
        if self._ctl[idx] < target:
            self._wait(j, idx, target, op)

    def _wait(self, peer: int, idx: int, target: int, op: str) -> None:
        """Wait until control word ``idx`` (of rank ``peer``) reaches ``target``.

        Spins, then yields, then sleeps with growing intervals; probes peers every few ms.
        """
        c = self._ctl
        start = time.monotonic()
        yield_at = start + _PURE_SPIN_S
        sleep_at = start + self._spin_s
        probe_at = start + _PROBE_S
        deadline = start + self._op_timeout_s
        delay = _SLEEP_MIN_S
        while True:
            for _ in range(_SPIN_BURST):
                if c[idx] >= target:
                    return
            now = time.monotonic()
            if now >= probe_at:
                problem = self._peer_problem(peer)
                # Re-read after the probe: a peer may have posted just before it left.
                if problem is not None and c[idx] < target:
                    self._fail(PeerDied(
                        f"{self._who()}: {op} (step {self._step}) waiting for rank {peer}: "
                        f"{problem}"), op)
                probe_at = now + _PROBE_S
            if now >= deadline:
                if c[idx] >= target:
                    return
                self._fail(CollectiveTimeout(
                    f"{self._who()}: {op} (step {self._step}) timed out after "
                    f"{self._op_timeout_s:g} s waiting for rank {peer} (its counter is {c[idx]}, "
                    f"need {target}); did it skip or reorder a collective?"), op)
            if now >= sleep_at:
                time.sleep(delay)
                delay = min(delay * 2, _SLEEP_MAX_S)
            elif now >= yield_at:
                os.sched_yield()

    def _peer_problem(self, first: int) -> str | None:
        """Why the group is broken (a peer exited, closed or aborted), or None.

        Looks at rank ``first`` (the one being waited for) before the others.
        """
        c = self._ctl
        for j in [first] + [p for p in self._peers if p != first]:
            state = c[self._ctl_idx(j, _C_STATE)]
            if state == _ST_ABORTED:
                return f"rank {j} aborted after an error"
            if state == _ST_CLOSED:
                return f"rank {j} closed its communicator"
            pid, start = self._peer_pid[j]
            if proc_start_time(pid) != start:
                return f"rank {j} (pid {pid}) has exited"
        return None

    # ---- errors, validation, views -------------------------------------------------------------

    def _who(self) -> str:
        return f"ShmCommunicator[{self._tag}] rank {self._rank}/{self._world}"

    def _fail(self, exc: Exception, op: str):
        """Mark this rank aborted (peers notice within ms) and raise ``exc``."""
        if self._failure is None:
            self._failure = f"{op} failed: {exc}"
            self._set_state(_ST_ABORTED)
        raise exc

    def _set_state(self, state: int) -> None:
        if self._mm is not None:
            self._ctl[self._ctl_idx(self._rank, _C_STATE)] = state

    def _check_usable(self, op: str) -> None:
        if self._failure is not None:
            raise CollectiveError(f"{self._who()}: cannot run {op}: {self._failure}")

    def _start_op(self, t: torch.Tensor | None, op: str, timeout_s: float | None) -> None:
        """Per-call checks; sets the deadline used by this call's waits."""
        if self._failure is not None:
            self._check_usable(op)
        self._op_timeout_s = self._timeout_s if timeout_s is None else timeout_s
        if t is not None and not (isinstance(t, torch.Tensor) and t.is_cpu and t.is_contiguous()):
            self._fail(ValueError(f"{op}: need a contiguous CPU tensor"), op)

    def _check_rank(self, r: int, op: str) -> None:
        if not 0 <= r < self._world:
            self._fail(ValueError(f"{op}: rank {r} not in [0, {self._world})"), op)

    def _slot_views(self, b: int, dtype: torch.dtype, shape) -> list[torch.Tensor]:
        """Per-rank views of buffer ``b`` with this dtype and shape (cached: views are slow)."""
        key = (b, dtype, shape)
        views = self._views.get(key)
        if views is None:
            if len(self._views) >= _VIEW_CACHE_MAX:
                self._views.clear()
            nbytes = shape.numel() * dtype.itemsize
            views = [s[:nbytes].view(dtype).view(shape) for s in self._slot_bytes[b]]
            self._views[key] = views
        return views

    def _acc_view(self, shape) -> torch.Tensor:
        """float32 scratch of this shape, for summing 16-bit floats."""
        key = ("acc", shape)
        view = self._views.get(key)
        if view is None:
            if self._acc_buf is None:
                self._acc_buf = torch.empty(self._cap // 2, dtype=torch.float32)
            view = self._acc_buf[:shape.numel()].view(shape)
            self._views[key] = view
        return view

    def _release(self) -> None:
        """Drop every view into the mapping, then unmap it."""
        mm, self._mm = self._mm, None
        self._views.clear()
        self._slot_bytes = None
        self._data = None
        self._acc_buf = None
        self._ctl.release()
        self._mv.release()
        _close_quietly(mm)


def _close_quietly(mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:
        pass  # something still holds a view; the mapping goes when that is collected


class _ShmLayout:
    """Byte offsets of the segment for ``world`` ranks and ``capacity`` bytes per slot."""

    def __init__(self, world: int, capacity: int):
        self.world = world
        self.capacity = capacity
        self.data_offset = _round_up(_HEADER_BYTES + world * _CTL_BYTES, _DATA_ALIGN)
        self.data_bytes = 2 * world * capacity
        self.total = self.data_offset + self.data_bytes


class _RendezvousKeys:
    """Store keys of one communicator's rendezvous."""

    def __init__(self, tag: str, world: int):
        self.prefix = f"{_STORE_PREFIX}/{tag}"
        self.segment = f"{self.prefix}/segment"

    def attached(self, rank: int) -> str:
        return f"{self.prefix}/attached/{rank}"

    def verified(self, rank: int) -> str:
        return f"{self.prefix}/verified/{rank}"

    def failed(self, rank: int) -> str:
        return f"{self.prefix}/failed/{rank}"
