"""Reads one rank's slices of a Hugging Face safetensors checkpoint, and nothing else.

A checkpoint is a directory with ``config.json`` and either ``model.safetensors`` or several shard
files listed in ``model.safetensors.index.json``. `load_rank_weights` walks a `RankPlan` and, for
every `Part`, asks safetensors for exactly that slice (``get_slice``), so a rank's resident
parameters are its share of the model, never the whole of it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from sharding.plan import LocalWeight, Part, RankPlan

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(RuntimeError):
    pass


class Checkpoint:
    """The safetensors files of one checkpoint directory, opened lazily (memory-mapped)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file_of = self._index()
        self._open: dict[str, object] = {}

    def _index(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            return dict(json.loads(index.read_text())["weight_map"])
        files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors files in {self.path}")
        names = {}
        for f in files:
            with safe_open(self.path / f, framework="pt") as h:
                names.update((n, f) for n in h.keys())
        return names

    @property
    def names(self) -> set[str]:
        return set(self._file_of)

    def _handle(self, tensor: str):
        try:
            f = self._file_of[tensor]
        except KeyError:
            raise CheckpointError(f"tensor {tensor!r} is missing from the checkpoint {self.path}") from None
        if f not in self._open:
            self._open[f] = safe_open(self.path / f, framework="pt")
        return self._open[f]

    def shape(self, tensor: str) -> tuple[int, ...]:
        return tuple(self._handle(tensor).get_slice(tensor).get_shape())

    def read(self, part: Part) -> torch.Tensor:
        """Rows [start, stop) of `part.tensor` along `part.dim`; only those bytes are copied."""
        sl = self._handle(part.tensor).get_slice(part.tensor)
        index = (slice(None),) * part.dim + (slice(part.start, part.stop),)
        return sl[index]

    def close(self) -> None:
        self._open.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_weight(ckpt: Checkpoint, w: LocalWeight, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Reads the parts of one rank-local weight, concatenates, transposes and pads it."""
    pieces = [ckpt.read(p).to(dtype) for p in w.parts]
    t = torch.cat(pieces, dim=w.parts[0].dim) if pieces else torch.empty((0,) + w.shape[1:], dtype=dtype)
    if w.transpose:
        t = t.t()
    if w.pad:
        t = torch.cat([t, t.new_zeros((w.pad,) + tuple(t.shape[1:]))])
    if tuple(t.shape) != w.shape:
        raise CheckpointError(
            f"{w.name}: read shape {tuple(t.shape)} from {[p.tensor for p in w.parts]}, plan expects {w.shape}"
        )
    return t.contiguous().to(device)


def load_rank_weights(
    path: str | Path,
    plan: RankPlan,
    dtype: torch.dtype,
    device: torch.device,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """All of one rank's weights; tied weights appear once, under the name they are tied to.
    `progress(done, total)` is called after each weight (for a loading bar)."""
    weights = {}
    with Checkpoint(path) as ckpt:
        todo = [w for w in plan.weights if w.tied_to is None]
        for i, w in enumerate(todo):
            weights[w.name] = load_weight(ckpt, w, dtype, device)
            if progress is not None:
                progress(i + 1, len(todo))
    return weights
