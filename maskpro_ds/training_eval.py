"""Periodic held-out evaluation inside a training run (keep-best), on the sharded model.

The same perplexity protocol as maskpro_ds.eval (texts joined with "\\n\\n", tokenised once,
non-overlapping windows, mean CE over windows, ppl = exp(mean)), but run through the ZeRO-3 engine
with the current final (top-N) mask, the windows split across ranks. Every rank runs the same number
of forwards (they are collective); padding windows are computed and discarded.
"""

from __future__ import annotations

import math

import torch

from maskpro_ds import distributed
from maskpro_ds.data import build_samples


def heldout_windows(tokenizer, source: str, seqlen: int, max_tokens: int, cache_dir: str | None = None) -> torch.Tensor:
    """The first ``max_tokens // seqlen`` windows of ``source`` -> LongTensor ``[W, seqlen]``."""
    num = max(1, max_tokens // seqlen)
    return build_samples(tokenizer, source, seqlen=seqlen, num_samples=num, cache_dir=cache_dir).tokens


@torch.no_grad()
def masked_perplexity(trainer, windows: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean window CE) of the final mask, computed collectively by all ranks."""
    world, rank = trainer.info.world_size, trainer.info.rank
    mine = torch.arange(rank, windows.shape[0], world)
    per_rank = -(-windows.shape[0] // world)  # ceil
    rounds = -(-per_rank // batch_size)
    total = torch.zeros(2, dtype=torch.float64)
    for k in range(rounds):
        ids = mine[k * batch_size:(k + 1) * batch_size]
        real = ids.numel()
        if real < batch_size:
            ids = torch.cat([ids, torch.zeros(batch_size - real, dtype=torch.long)])
        losses = trainer.forward_losses(windows[ids].to(trainer.info.device), ("final",)).double().cpu()
        total += torch.tensor([float(losses[:real].sum()), float(real)], dtype=torch.float64)
    total = distributed.all_gather_floats(total.to(trainer.info.device)).sum(0).cpu()
    return math.exp(float(total[0] / total[1]))
