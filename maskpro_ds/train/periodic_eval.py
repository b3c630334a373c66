"""Periodic held-out evaluation inside a training run (keep-best), on the sharded model.

The same perplexity protocol as maskpro_ds.eval (texts joined with "\\n\\n", tokenised once,
non-overlapping windows built by maskpro_ds.data.windows, mean CE over windows, ppl = exp(mean)),
but run through the ZeRO-3 engine with the current final (top-N) mask, the windows split across
ranks in padded rounds.
"""

from __future__ import annotations

import math

import torch

from maskpro_ds import distributed
from maskpro_ds.data.samples import build_samples
from maskpro_ds.train.forward import MaskedForward, padded_rounds
from maskpro_ds.train.mask_modes import FINAL


def heldout_windows(tokenizer, source: str, seqlen: int, max_tokens: int, cache_dir: str | None = None,
                    add_bos: str = "auto") -> torch.Tensor:
    """The first ``max_tokens // seqlen`` windows of ``source`` -> LongTensor ``[W, seqlen]`` (the
    training windows' tokenisation policy, ``data.add_bos``)."""
    num = max(1, max_tokens // seqlen)
    return build_samples(tokenizer, source, seqlen=seqlen, num_samples=num, cache_dir=cache_dir, add_bos=add_bos).tokens


@torch.no_grad()
def masked_perplexity(forward: MaskedForward, windows: torch.Tensor, info: distributed.RankInfo,
                      batch_size: int = 4) -> float:
    """exp(mean window CE) of the final mask, computed collectively by all ranks."""
    total = torch.zeros(2, dtype=torch.float64)
    for ids, real in padded_rounds(windows.shape[0], info.world_size, info.rank, batch_size):
        losses = forward.losses(windows[ids].to(info.device), FINAL).double().cpu()
        total += torch.tensor([float(losses[:real].sum()), float(real)], dtype=torch.float64)
    total = distributed.all_gather_floats(total.to(info.device)).sum(0).cpu()
    return math.exp(float(total[0] / total[1]))
