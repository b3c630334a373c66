"""The batch schedule: which sample ids rank r reads at step t, as a pure function of integers.

So a resumed run, a single-process reference and rank 3 of 4 all agree on which samples a step
uses, whatever the launcher or node layout.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed of ``epoch``'s permutation: a 63-bit hash of (seed, epoch), no collisions
    between nearby pairs the way ``seed * K + epoch`` would have."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (epoch & _MASK64)) >> 1


@functools.lru_cache(maxsize=8)
def epoch_permutation(seed: int, epoch: int, num_samples: int) -> torch.Tensor:
    """The sample order of one epoch (cached: a step touches one or two epochs). Do not modify it."""
    gen = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(num_samples, generator=gen)


def batch_ids(seed: int, step: int, rank: int, world_size: int, batch_size: int, num_samples: int) -> torch.Tensor:
    """Sample ids of ``rank``'s batch at ``step``: a pure function of these integers.

    Global position ``p = (step * world_size + rank) * batch_size + j``; epoch ``e = p // S``;
    sample ``perm_e[p % S]`` with ``perm_e`` a seeded ``torch.randperm(S)``. Every epoch visits each
    sample once; ranks of one step read adjacent positions, so they never share a sample when
    ``world_size * batch_size <= S`` and that product divides S. A different world size or batch size
    maps steps to other positions, but sample ids (and the baseline cache keyed by them) stay valid.
    """
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    if batch_size <= 0 or num_samples <= 0 or step < 0:
        raise ValueError(
            f"batch_ids needs step >= 0, batch_size > 0, num_samples > 0 (got {step}, {batch_size}, {num_samples})"
        )
    pos = (step * world_size + rank) * batch_size + torch.arange(batch_size, dtype=torch.long)
    epochs = pos // num_samples
    out = torch.empty(batch_size, dtype=torch.long)
    for e in torch.unique(epochs).tolist():
        sel = epochs == e
        out[sel] = epoch_permutation(seed, e, num_samples)[pos[sel] % num_samples]
    return out


@dataclass(frozen=True)
class BatchSchedule:
    """:func:`batch_ids` with the run's fixed integers bound: ``schedule.ids(step, rank)``."""

    seed: int
    world_size: int
    batch_size: int
    num_samples: int

    def ids(self, step: int, rank: int) -> torch.Tensor:
        return batch_ids(self.seed, step, rank, self.world_size, self.batch_size, self.num_samples)

    def steps_per_epoch(self) -> float:
        return self.num_samples / (self.world_size * self.batch_size)
