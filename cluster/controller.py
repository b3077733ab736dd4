"""The controller: from a deployment config to running replicas on Ray.

    controller = Controller(load_config("configs/default.yaml"))
    controller.start()          # Ray up, replicas placed, loaded, warmed up
    controller.replicas[0].head # rank 0's actor: submit / abort / poll
    controller.shutdown()

It starts an embedded Ray or joins a cluster, computes the sharding plan once, and for each
replica creates a placement group (one bundle per rank: packed on one node, or allowed to span
nodes), starts one `RankWorker` actor per rank, has rank 0 open the rendezvous store on a free
port, forms the process group (shared memory when all ranks share a host on CPU, gloo across
hosts, NCCL on GPUs), loads the shards and starts the engine. `check()` reports replicas whose
actors died or whose engine failed; `restart()` rebuilds one.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import ConfigError, DeploymentConfig, resolve
from cluster.model_store import resolve_model
from sharding.arch import ModelConfig
from sharding.group import resolve_backend
from sharding.loader import DTYPES
from sharding.plan import ShardingPlan
from worker import host_memory
from worker.actor import RankWorker, WorkerSpec
from worker.kv_cache import KVCache

log = logging.getLogger("tpserve.controller")

STRATEGIES = {"pack": "STRICT_PACK", "spread": "PACK", "strict_spread": "STRICT_SPREAD"}
DEFAULT_KV_BYTES_PER_RANK = 4 << 30


class DeploymentError(RuntimeError):
    """The deployment could not be started (placement, loading); the message says why."""


@dataclass
class Replica:
    replica_id: int
    ranks: list  # actor handles, rank order
    nodes: list[dict]  # node_info() of each rank
    backend: str
    placement: object = field(repr=False)
    # Health belongs to the controller: only `Controller.check` and `Controller.report_failure`
    # write it; the router and ModelInfo read it.
    healthy: bool = True
    failure: str | None = None
    generation: int = 0  # 0 for the first incarnation of this replica id, +1 per rebuild

    @property
    def head(self):
        return self.ranks[0]


def kv_cache_blocks(cfg: DeploymentConfig, model: ModelConfig, plan: ShardingPlan) -> int:
    """KV blocks per replica: the same block ids on every rank, sized for the rank with the most
    KV heads."""
    e = cfg.engine
    if e.kv_cache_tokens is not None:
        return -(-e.kv_cache_tokens // e.block_size)
    per_block = max(
        KVCache.bytes_per_block(model.num_layers, r.num_kv_heads, model.head_dim, e.block_size,
                                DTYPES[cfg.model.dtype])
        for r in plan.ranks
    )
    if e.kv_cache_memory is not None:
        blocks = e.kv_cache_memory // per_block
    else:
        wanted = -(-e.max_batch_size * e.max_model_len // e.block_size)
        blocks = min(wanted, DEFAULT_KV_BYTES_PER_RANK // per_block)
    if blocks * e.block_size < e.max_model_len:
        raise ConfigError("engine.kv_cache_memory", f"holds {blocks * e.block_size} tokens, less than "
                          f"one sequence of max_model_len={e.max_model_len}", e.kv_cache_memory,
                          source=cfg.source)
    return blocks


def _rank_environment(cfg: DeploymentConfig) -> dict[str, str]:
    """What a rank's process must be started with: host_memory's environment for CPU ranks."""
    return host_memory.rank_environment() if cfg.device.type == "cpu" else {}


class Controller:
    def __init__(self, cfg: DeploymentConfig, *, cuda_available: bool | None = None):
        self.model_path = resolve_model(cfg.model.path)
        self.model = ModelConfig.from_dir(self.model_path)
        self._owns_ray = False
        self._workers_environment: dict[str, str] = {}  # what an embedded Ray's workers start with
        if cuda_available is None:
            cuda_available = self._gpus_available(cfg)
        self.cfg = resolve(cfg, self.model, cuda_available=cuda_available)
        self.plan = ShardingPlan.build(self.model, self.cfg.parallel.tensor_parallel_size)
        self.num_blocks = kv_cache_blocks(self.cfg, self.model, self.plan)
        self.replicas: list[Replica] = []
        self.deployment_id = uuid.uuid4().hex[:8]  # names this deployment's placement groups
        self._placements = 0
        self._lifecycle = threading.Lock()  # restart (a monitor's thread) vs shutdown
        self._health = threading.Lock()  # replica health: check (monitor thread) vs reports (loop)
        self._closed = False

    def _gpus_available(self, cfg: DeploymentConfig) -> bool:
        """Whether the ranks can have GPUs: this machine's for an embedded Ray, else the
        cluster's (a head node without a GPU may drive GPU workers), which means joining it now."""
        if cfg.ray.address is None and not ray.is_initialized():
            import torch

            return torch.cuda.is_available()
        self._connect_ray(cfg)
        return ray.cluster_resources().get("GPU", 0) > 0

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, progress=None) -> None:
        """Ray up, then every replica placed, loaded and serving. `progress(replica, done, total)`
        is called while weights load."""
        self._connect_ray(self.cfg)
        for i in range(self.cfg.parallel.replicas):
            self.replicas.append(self._start_replica(i, progress))

    def shutdown(self) -> None:
        with self._lifecycle:  # waits for a restart in progress
            self._closed = True
            for replica in self.replicas:
                self._stop_replica(replica)
            self.replicas = []
            if self._owns_ray and ray.is_initialized():
                ray.shutdown()
                self._workers_environment = {}

    def check(self) -> list[Replica]:
        """Refreshes each replica's health; a dead actor or a failed engine marks it unhealthy."""
        for replica in self.replicas:
            if not replica.healthy:
                continue
            try:
                states = ray.get([a.health.remote() for a in replica.ranks], timeout=10)
                bad = [s["failure"] or f"rank {r} is not running" for r, s in enumerate(states) if not s["ok"]]
            except Exception as exc:  # RayActorError, GetTimeoutError
                bad = [f"{type(exc).__name__}: {exc}"]
            if bad:
                self.report_failure(replica.replica_id, replica.generation, bad[0])
        return self.replicas

    def report_failure(self, replica_id: int, generation: int, message: str) -> bool:
        """Marks incarnation `generation` of replica `replica_id` failed. A report about an
        incarnation already replaced by a rebuild is ignored (False); so is one about a replica
        already marked failed, whose first failure stays its message."""
        with self._health:
            replica = self.replicas[replica_id] if replica_id < len(self.replicas) else None
            if replica is None or replica.generation != generation or not replica.healthy:
                return False
            replica.healthy, replica.failure = False, message
            return True

    def restart(self, replica_id: int, progress=None) -> Replica:
        """Replaces a replica with a fresh one: new placement group, actors, process group."""
        with self._lifecycle:
            if self._closed:
                raise DeploymentError("the deployment is shut down")
            old = self.replicas[replica_id]
            self._stop_replica(old)
            fresh = self._start_replica(replica_id, progress)
            fresh.generation = old.generation + 1
            with self._health:
                self.replicas[replica_id] = fresh
            return fresh

    # -- steps ----------------------------------------------------------------------------------
    def _connect_ray(self, cfg: DeploymentConfig) -> None:
        if ray.is_initialized():
            return  # a caller (a test session, an application) already runs Ray, or we joined
        r = cfg.ray
        if r.address is None:
            # Ranks are the machine's main work: Ray's default would start them at nice 15.
            os.environ.setdefault("RAY_worker_niceness", "0")
            # An embedded Ray's processes, and the workers it starts, take this process's
            # environment: given the rank environment now, rank actors need no runtime_env and
            # run in the workers Ray starts with it. A runtime_env makes Ray start a new worker
            # process for each actor after them (2-4 s of a 2-core VM's start-up).
            env = _rank_environment(cfg)
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                ray.init(num_cpus=r.num_cpus, namespace=r.namespace, include_dashboard=False,
                         log_to_driver=True)
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            self._workers_environment = env
        else:
            ray.init(address=r.address, namespace=r.namespace)
        self._owns_ray = True  # this driver's connection (and an embedded Ray) ends with shutdown()

    def _start_replica(self, replica_id: int, progress) -> Replica:
        tp = self.cfg.parallel.tensor_parallel_size
        pg = self._place(replica_id)
        actors = [self._actor(pg, replica_id, rank) for rank in range(tp)]
        try:
            nodes = ray.get([a.node_info.remote() for a in actors])
            self._check_host_memory(replica_id, nodes)
            backend = self._backend(nodes)
            # Rank 0's store listens on this address only: loopback when the replica is on one
            # node (its ranks then also run gloo over loopback, see RankWorker.init_group), so
            # nothing of it is reachable from the network; else rank 0's node address.
            host = "127.0.0.1" if len({n["node_id"] for n in nodes}) == 1 else nodes[0]["ip"]
            port = ray.get(actors[0].open_store.remote(host))
            ray.get([a.init_group.remote(host, port, backend) for a in actors])
            self._load(replica_id, actors, progress)
            ray.get([a.start.remote() for a in actors[1:]])
            ray.get(actors[0].start.remote())
        except Exception:
            for a in actors:
                ray.kill(a)
            remove_placement_group(pg)
            raise
        log.info("replica %d ready: %d ranks on %s, backend %s", replica_id, tp,
                 sorted({n["node_id"][:8] for n in nodes}), backend)
        return Replica(replica_id, actors, nodes, backend, pg)

    def _place(self, replica_id: int):
        d, p = self.cfg.device, self.cfg.parallel
        bundle = {"CPU": d.cpus_per_rank}
        if d.type == "cuda":
            bundle["GPU"] = d.gpus_per_rank
        pg = placement_group([dict(bundle) for _ in range(p.tensor_parallel_size)],
                             strategy=STRATEGIES[p.placement],
                             name=f"tpserve-{self.deployment_id}-{replica_id}-{self._placements}")
        self._placements += 1
        try:
            ray.get(pg.ready(), timeout=60)
        except Exception:
            remove_placement_group(pg)
            raise DeploymentError(
                f"replica {replica_id}: could not place {p.tensor_parallel_size} ranks of {bundle} "
                f"with placement '{p.placement}' within 60 s; cluster resources: "
                f"{ray.available_resources()}"
            ) from None
        return pg

    def _actor(self, pg, replica_id: int, rank: int):
        d, e = self.cfg.device, self.cfg.engine
        spec = WorkerSpec(
            replica_id=replica_id, rank=rank, world_size=self.plan.tp,
            model_ref=self.cfg.model.path, plan=self.plan.ranks[rank], dtype=self.cfg.model.dtype,
            device=d.type, threads=d.threads_per_rank, pin=d.pin_ranks, block_size=e.block_size,
            num_blocks=self.num_blocks, max_batch_size=e.max_batch_size,
            max_tokens_per_step=e.max_tokens_per_step, max_model_len=e.max_model_len,
            collective_timeout_s=e.collective_timeout_s,
            cuda_graphs_up_to=e.max_batch_size if e.cuda_graphs == "on" else 0,
            prefix_caching=e.prefix_caching, kv_cache_populate=e.kv_cache_populate,
        )
        options = dict(
            num_cpus=d.cpus_per_rank,
            num_gpus=d.gpus_per_rank if d.type == "cuda" else 0,
            max_concurrency=16,  # poll, submit and health run beside the engine thread
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
        )
        if (runtime_env := self._runtime_env()) is not None:
            options["runtime_env"] = runtime_env
        return ray.remote(RankWorker).options(**options).remote(spec)

    def _runtime_env(self) -> dict | None:
        """The environment a rank's process must start with (read by glibc when the process
        starts: huge pages) where Ray's workers do not have it already: Ray then starts a
        process for it."""
        env = _rank_environment(self.cfg)
        if env.items() <= self._workers_environment.items():
            return None
        return {"env_vars": env}

    def _check_host_memory(self, replica_id: int, nodes: list[dict]) -> None:
        """CPU ranks: their weights and KV caches must fit in what their node has available, in
        a clear error now, not in the kernel's OOM killer later (the cache's pages are faulted
        in after the replica is ready, `engine.kv_cache_populate`)."""
        if self.cfg.device.type != "cpu":
            return
        dtype = DTYPES[self.cfg.model.dtype]
        need: dict[str, list[int]] = {}
        for rank, node in enumerate(nodes):
            if node.get("mem_available_bytes") is None:
                continue  # not Linux: nothing to compare with
            r = self.plan.ranks[rank]
            kv = (self.num_blocks + 1) * KVCache.bytes_per_block(
                self.model.num_layers, r.num_kv_heads, self.model.head_dim, self.cfg.engine.block_size, dtype)
            total = need.setdefault(node["node_id"], [0, 0, node["mem_available_bytes"]])
            total[0] += kv
            total[1] += r.bytes(self.cfg.model.dtype)
        for node_id, (kv, weights, available) in need.items():
            if kv + weights > available:
                gib = 1 << 30
                raise DeploymentError(
                    f"replica {replica_id}: its ranks on node {node_id[:8]} need {(kv + weights) / gib:.1f} GiB "
                    f"of memory (KV cache {kv / gib:.1f} GiB, set by engine.kv_cache_tokens or "
                    f"engine.kv_cache_memory; weights {weights / gib:.1f} GiB), and the node has "
                    f"{available / gib:.1f} GiB available")

    def _backend(self, nodes: list[dict]) -> str:
        import torch

        same_host = len({n["node_id"] for n in nodes}) == 1
        free = min(n.get("shm_free_bytes", 0) for n in nodes)  # measured on the ranks' node
        backend = resolve_backend(self.cfg.device.backend, torch.device(self.cfg.device.type), same_host,
                                  len(nodes), free)
        if backend == "shm" and not same_host:
            raise DeploymentError("device.backend shm needs all ranks of a replica on one node; "
                                  "use gloo or placement: pack")
        return backend

    def _load(self, replica_id: int, actors, progress) -> None:
        pending = [a.load.remote() for a in actors]
        while True:
            done, _ = ray.wait(pending, num_returns=len(pending), timeout=0.5)
            if progress is not None:
                states = ray.get([a.progress.remote() for a in actors])
                progress(replica_id, sum(s[0] for s in states), sum(s[1] for s in states))
            if len(done) == len(pending):
                ray.get(pending)  # raises the load error, if any
                return

    def _stop_replica(self, replica: Replica) -> None:
        try:
            ray.get([a.shutdown.remote() for a in replica.ranks], timeout=15)
        except Exception:
            pass  # a dead or hung rank: it is killed below either way
        for a in replica.ranks:
            ray.kill(a)
        remove_placement_group(replica.placement)
