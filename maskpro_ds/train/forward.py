"""Collective forwards of the sharded model: per-sample losses under a mask mode, in padded rounds.

Every forward is collective (ZeRO-3 gathers the weights, the store exchanges mask bits), so every
rank must run the same number of them. :func:`padded_rounds` deals items out round-robin and pads
the last round of the ranks that run short; the padding is computed and discarded. The baseline
pass and the periodic evaluation both use it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from maskpro_ds.train.logit_store import LogitStore
from maskpro_ds.train.mask_modes import MaskMode
from maskpro_ds.train.zero_model import causal_lm_loss


class MaskedForward:
    """The ZeRO-3 engine with its masked Linears, run under one explicit mask mode per call."""

    def __init__(self, engine, store: LogitStore):
        self.engine = engine
        self.store = store

    @torch.no_grad()
    def losses(self, tokens: torch.Tensor, mode: MaskMode) -> torch.Tensor:
        """Per-sample mean CE (fp32) of ``tokens`` (already on the device) under ``mode``; collective."""
        with self.store.drawing(mode):
            logits = self.engine(input_ids=tokens).logits
        return causal_lm_loss(logits, tokens)


def num_rounds(total: int, world: int, batch: int) -> int:
    """Rounds every rank runs to cover ``total`` items dealt round-robin in batches of ``batch``."""
    per_rank = -(-total // world)  # ceil
    return -(-per_rank // batch)


def padded_rounds(total: int, world: int, rank: int, batch: int) -> Iterator[tuple[torch.Tensor, int]]:
    """Items ``rank, rank + world, ...`` of ``range(total)`` in batches of ``batch``: ``(ids, real)``.

    Every rank gets the same number of rounds; a short last batch is padded with id 0 and ``real``
    says how many leading ids are genuine.
    """
    mine = torch.arange(rank, total, world) if rank < total else torch.zeros(0, dtype=torch.long)
    for k in range(num_rounds(total, world, batch)):
        ids = mine[k * batch:(k + 1) * batch]
        real = ids.numel()
        if real < batch:
            ids = torch.cat([ids, torch.zeros(batch - real, dtype=torch.long)])
        yield ids, real
