"""One rank's model, KV cache and the per-step protocol between rank 0 and its peers.

Rank 0 calls `run(step)`: it broadcasts the step plan, then runs its share of the forward and gets
the logits. Every other rank sits in `follow()`: receive a plan, run the same forward over its own
weight slices, repeat, until rank 0 sends STOP. The broadcast goes through the replica's process
group, so no Ray call happens per step.

On CUDA, decode-only steps replay CUDA graphs (`worker.cuda_graphs`) when the runner is loaded with
``cuda_graphs``; every other step runs the model eagerly. Every rank makes the same choice, since
it depends on the step alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sharding.arch import ModelConfig
from sharding.group import TPGroup
from sharding.loader import DTYPES, load_rank_weights
from sharding.plan import RankPlan
from worker import host_memory
from worker.cuda_graphs import DecodeGraphs
from worker.kv_cache import KVCache
from worker.model import Transformer
from worker.step import HEADER_LEN, Kind, StepInput


@dataclass
class LoadReport:
    parameter_bytes: int  # bytes of the weights this rank read and holds
    seconds: float


class ModelRunner:
    def __init__(self, model: Transformer, cache: KVCache, group: TPGroup, graphs: DecodeGraphs | None = None):
        self.model, self.cache, self.group, self.graphs = model, cache, group, graphs
        self.block_size = cache.block_size
        self.last_broadcast_s = 0.0  # time the last `run` spent sending the plan

    @classmethod
    def load(cls, path: str | Path, cfg: ModelConfig, plan: RankPlan, group: TPGroup, *,
             dtype: str, num_blocks: int, block_size: int, max_positions: int | None = None,
             kernels: str = "auto", cuda_graphs_up_to: int = 0, populate_cache: str = "before_ready",
             progress=None) -> tuple["ModelRunner", LoadReport]:
        """`cuda_graphs_up_to`: replay decode steps of up to this many sequences from CUDA graphs
        (0: never). `populate_cache`: when a host KV cache's pages are faulted in
        (`KVCache.populate`; the served default is "background", engine.kv_cache_populate)."""
        t0 = time.perf_counter()
        if group.device.type == "cpu":  # activations come from the host heap: keep it mapped
            host_memory.keep_freed_memory()
        weights = load_rank_weights(path, plan, DTYPES[dtype], group.device, progress)
        nbytes = sum(t.numel() * t.element_size() for t in weights.values())
        model = Transformer(cfg, plan, weights, group, max_positions, kernels)
        cache = model.new_cache(num_blocks, block_size)
        cache.populate(populate_cache)
        graphs = DecodeGraphs(model, cache, cuda_graphs_up_to) if cuda_graphs_up_to else None
        return cls(model, cache, group, graphs), LoadReport(nbytes, time.perf_counter() - t0)

    # -- rank 0 ---------------------------------------------------------------------------------
    def run(self, step: StepInput) -> torch.Tensor | None:
        """Broadcast the plan, run the forward; next-token logits (on rank 0)."""
        if self.group.world_size > 1:
            t0 = time.perf_counter()
            header, payload = step.header(), step.payload()
            self.group.broadcast(header)
            self.group.broadcast(payload)
            self.last_broadcast_s = time.perf_counter() - t0
        return self._forward(step)

    def capture_graphs(self) -> None:
        """Rank 0, before serving: one warm-up step per graph bucket, so that no request waits
        for a capture. The peers capture with it, following the same steps."""
        if self.graphs is not None:
            for size in self.graphs.sizes:
                self.run(self.graphs.warm_up_step(size))

    def stop_peers(self) -> None:
        self._send_kind(Kind.STOP)

    def heartbeat(self) -> None:
        """Tells idle peers rank 0 is alive: every collective, the wait for the next plan
        included, has a timeout, so an idle replica must still exchange something."""
        self._send_kind(Kind.IDLE)

    def _send_kind(self, kind: Kind) -> None:
        if self.group.world_size > 1:
            header = torch.zeros(HEADER_LEN, dtype=torch.int64)
            header[0] = kind
            self.group.broadcast(header)

    # -- ranks 1.. ------------------------------------------------------------------------------
    def follow(self) -> None:
        """Execute rank 0's plans until it sends STOP."""
        while True:
            header = torch.empty(HEADER_LEN, dtype=torch.int64)
            self.group.broadcast(header)
            if header[0] == Kind.STOP:
                return
            if header[0] == Kind.IDLE:
                continue
            payload = torch.empty(StepInput.payload_len(header), dtype=torch.int64)
            self.group.broadcast(payload)
            self._forward(StepInput.from_wire(header, payload))

    def _forward(self, step: StepInput) -> torch.Tensor | None:
        if self.graphs is not None and self.graphs.fits(step):
            return self.graphs.run(step)
        return self.model(self.model.batch(step, self.cache), self.cache)
