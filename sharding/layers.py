"""Tensor-parallel layers. Each holds one rank's slice (already read by the loader) and shows its
collective in `forward`.

Plain classes rather than ``nn.Module``: inference only, weights come from the plan, and a decode
step calls these a few hundred times, so hooks and autograd bookkeeping are pure overhead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sharding.group import TPGroup
from tpkernels import Kernels, Matmul


def Linear(weight: torch.Tensor, bias: torch.Tensor | None = None, kernels: Kernels | None = None) -> Matmul:
    """y = x Wᵀ (+ b) on one rank's weight: the product `Kernels.matmul` chose for it (on CPU,
    oneDNN on the weight packed once, for every size of input). `kernels` is the model's choice;
    a layer built on its own (tests, tools) gets its device's default."""
    kernels = kernels if kernels is not None else Kernels.select(weight.device, weight.dtype)
    return kernels.matmul(weight, bias)


class ColumnParallelLinear:
    """A = [A₁; …; Aₚ] split by output rows: rank r computes yᵣ = x Aᵣᵀ + bᵣ, its own slice of y.
    No communication; the next layer consumes the slice as it is."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, kernels: Kernels | None = None):
        self.linear = Linear(weight, bias, kernels)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class RowParallelLinear:
    """A = [A₁ … Aₚ] split by input columns: rank r holds the activation slice xᵣ and computes
    the partial sum xᵣ Aᵣᵀ; y = Σᵣ xᵣ Aᵣᵀ + b. The bias is added once, after the all-reduce."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group: TPGroup,
                 kernels: Kernels | None = None):
        self.linear = Linear(weight, kernels=kernels)
        self.bias = bias
        self.group = group

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        self.group.all_reduce(y)
        if self.bias is not None:
            y += self.bias
        return y


class VocabParallelEmbedding:
    """Rank r owns vocabulary rows [start, stop). It embeds the ids it owns, writes zeros for the
    others, and an all-reduce assembles the full embedding on every rank."""

    def __init__(self, weight: torch.Tensor, start: int, group: TPGroup):
        self.weight = weight
        self.start, self.stop = start, start + weight.shape[0]
        self.group = group

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if self.group.world_size == 1:
            return F.embedding(ids, self.weight)
        foreign = (ids < self.start) | (ids >= self.stop)
        local = (ids - self.start).masked_fill(foreign, 0)
        x = F.embedding(local, self.weight).masked_fill(foreign.unsqueeze(-1), 0.0)
        self.group.all_reduce(x)
        return x


class ParallelLMHead:
    """Rank r computes the logits of its vocabulary rows; rank 0 gathers and concatenates them,
    dropping the padding rows. Returns (tokens, vocab_size) logits on rank 0, None elsewhere."""

    def __init__(self, weight: torch.Tensor, vocab_size: int, group: TPGroup, kernels: Kernels | None = None):
        self.linear = Linear(weight, kernels=kernels)
        self.vocab_size = vocab_size
        self.group = group

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        local = self.linear(x)  # (tokens, padded_vocab / tp)
        parts = self.group.gather_to_first(local)
        if parts is None:
            return None
        if len(parts) == 1:  # one rank: its logits as they are (a copy of them cost ~1 ms a step)
            return parts[0][..., : self.vocab_size]
        return torch.cat(parts, dim=-1)[..., : self.vocab_size]
