"""One replica's tensor-parallel group, as seen by one of its ranks.

A *replica* is one tensor-parallel group of `world_size` processes; a *rank* is a process's
position in it (rank 0 also runs the engine loop). Everything distributed goes through a `TPGroup`
passed in explicitly: no module globals, no reliance on an implicit default group.

Backends: NCCL for CUDA activations (CPU metadata still goes over gloo: the group is created as
``cpu:gloo,cuda:nccl``), gloo for CPU ranks on different hosts, and a shared-memory communicator
(`sharding.shm`) for CPU ranks that share a host, where gloo's per-call thread hand-off costs more
than a whole decode step's compute. Every collective has a timeout.

Gloo also serves CUDA ranks that cannot use NCCL (two ranks sharing one GPU, which NCCL refuses):
their activations are copied to host memory around each collective, since gloo's own CUDA support
does not cover every collective (gather among them).

Rendezvous: rank 0 opens a `TCPStore` on port 0 (the OS picks a free port), the controller passes
the address to the other ranks, and they connect to it.
"""

from __future__ import annotations

import datetime
import logging
import socket
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

log = logging.getLogger("tpserve.group")

SHM_CAPACITY_BYTES = 4 << 20  # the shared-memory communicator's largest chunk per rank and step


def interface_with_address(ip: str) -> str | None:
    """The name of this host's network interface that holds IPv4 address `ip` (Linux), or None.

    Gloo picks its interface by resolving the host name, which inside containers and on many
    distributions gives a loopback address, and then advertises that address to the other hosts;
    ranks point it (GLOO_SOCKET_IFNAME) at the interface of the address Ray knows the node by."""
    import fcntl
    import struct

    SIOCGIFADDR = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address on it
            if socket.inet_ntoa(raw[20:24]) == ip:
                return name
    return None


def open_store(host: str, port: int, world_size: int, is_master: bool, timeout_s: float) -> dist.TCPStore:
    """The rendezvous store; on rank 0 with port 0 the OS picks a free port (read it from `.port`).

    Rank 0's store listens on `host` only: TCPStore itself would listen on every interface
    whatever `host` says, so it gets a socket already bound to `host` (and owns it from then on)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if not (is_master and port == 0):
        return dist.TCPStore(host, port, world_size, is_master, timeout=timeout, wait_for_workers=False)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, 0), family=family)
    return dist.TCPStore(host, listener.getsockname()[1], world_size, True, timeout=timeout,
                         wait_for_workers=False, master_listen_fd=listener.detach())


def resolve_backend(backend: str, device: torch.device, same_host: bool, world_size: int = 2,
                    shm_free_bytes: int | None = None) -> str:
    """'auto' picks nccl for CUDA; for co-located CPU ranks shm when supported and /dev/shm
    (`shm_free_bytes` on the ranks' host; measured here when None) has room for the segment,
    else gloo, saying why in one log line."""
    if backend != "auto":
        return backend
    if device.type == "cuda":
        return "nccl"
    if same_host:
        from sharding.shm import ShmCommunicator

        if ShmCommunicator.supported():
            need = ShmCommunicator.segment_bytes(world_size, SHM_CAPACITY_BYTES)
            free = ShmCommunicator.free_bytes() if shm_free_bytes is None else shm_free_bytes
            if free >= need:
                return "shm"
            log.warning("tpserve: /dev/shm has %d MiB free, the shared-memory collectives need %d MiB; "
                        "using gloo", free >> 20, -(-need >> 20))
    return "gloo"


@dataclass
class TPGroup:
    rank: int
    world_size: int
    device: torch.device
    backend: str = "none"
    timeout_s: float = 30.0
    _pg: object = field(default=None, repr=False)
    _shm: object = field(default=None, repr=False)
    comm_seconds: float = 0.0  # wall time spent inside all_reduce and gather_to_first

    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> "TPGroup":
        """A group of one: every collective is the identity."""
        return cls(rank=0, world_size=1, device=torch.device(device))

    @classmethod
    def connect(
        cls,
        store: dist.Store,
        rank: int,
        world_size: int,
        device: str | torch.device,
        backend: str = "gloo",
        timeout_s: float = 30.0,
        tag: str = "tp",
    ) -> "TPGroup":
        """Join the replica's group through `store`. `backend`: gloo | nccl | shm (not 'auto')."""
        device = torch.device(device)
        if world_size == 1:
            return cls.single(device)
        pg_backend = "cpu:gloo,cuda:nccl" if backend == "nccl" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(pg_backend, store=dist.PrefixStore(f"{tag}/pg", store),
                                rank=rank, world_size=world_size, timeout=timeout)
        shm = None
        if backend == "shm":
            from sharding.shm import ShmCommunicator

            shm = ShmCommunicator.create(
                store, rank, world_size, capacity_bytes=SHM_CAPACITY_BYTES, timeout_s=timeout_s, tag=f"{tag}/shm"
            )
        return cls(rank, world_size, device, backend, timeout_s, dist.group.WORLD, shm)

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def shm(self):
        """The shared-memory communicator (`sharding.shm.ShmCommunicator`) where the group runs on one,
        else None; native code takes its all-reduces through `ShmCommunicator.native`."""
        return self._shm

    @property
    def stages_through_host(self) -> bool:
        """gloo carrying CUDA activations: each collective copies them to host memory and back."""
        return self.backend == "gloo" and self.device.type != "cpu"

    def all_reduce(self, t: torch.Tensor) -> None:
        """In-place sum over the group's ranks."""
        if self.world_size == 1:
            return
        t0 = time.perf_counter()
        if self._shm is not None:
            self._shm.all_reduce(t)
        elif self.stages_through_host:
            host = t.cpu()
            dist.all_reduce(host, group=self._pg)
            t.copy_(host)
        else:
            dist.all_reduce(t, group=self._pg)
        self.comm_seconds += time.perf_counter() - t0

    def gather_to_first(self, t: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's `t` (same shape on every rank), in rank order, on rank 0; None elsewhere."""
        if self.world_size == 1:
            return [t]
        t0 = time.perf_counter()
        if self._shm is not None:
            out = self._shm.gather(t, dst=0)
        elif self.stages_through_host:
            host = t.cpu()
            out = [torch.empty_like(host) for _ in range(self.world_size)] if self.rank == 0 else None
            dist.gather(host, out, dst=0, group=self._pg)
            out = None if out is None else [part.to(t.device) for part in out]
        else:
            out = [torch.empty_like(t) for _ in range(self.world_size)] if self.rank == 0 else None
            dist.gather(t, out, dst=0, group=self._pg)
        self.comm_seconds += time.perf_counter() - t0
        return out

    def broadcast(self, t: torch.Tensor, src: int = 0) -> None:
        """In-place broadcast of a CPU tensor (step plans, metadata)."""
        if self.world_size == 1:
            return
        if self._shm is not None:
            self._shm.broadcast(t, src=src)
        else:
            dist.broadcast(t, src=src, group=self._pg)

    def barrier(self) -> None:
        if self.world_size == 1:
            return
        if self._shm is not None:
            self._shm.barrier()
        else:
            dist.barrier(group=self._pg)

    def close(self) -> None:
        if self._shm is not None:
            self._shm.close()
            self._shm = None
        if self._pg is not None:
            dist.destroy_process_group(self._pg)
            self._pg = None
