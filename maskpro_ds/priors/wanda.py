"""The Wanda prior: score |W_ij| · ||X_j||₂, keep the top N of every group of M along the input dim.

||X_j||₂ is the L2 norm of input column j over every calibration token reaching the Linear, gathered
in one pass per block (Wanda's one-pass statistics), with blocks processed sequentially: block k+1
sees the outputs of the already pruned blocks 0..k, as in the Wanda reference. Within a group only
the ratio of scores matters, so the statistic's scale (sum vs mean over tokens) does not change the
mask; it is accumulated in fp64 so ties are decided by the weights, not by rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from maskpro_ds.masks.nm import topn_mask
from maskpro_ds.models.lazy import ModelHandle
from maskpro_ds.priors.base import NoOptions, PriorInputs
from maskpro_ds.priors.calibration import BlockResult, ColumnSumSq, run_blockwise


def wanda_scores(weight: torch.Tensor, col_sumsq: torch.Tensor) -> torch.Tensor:
    """|W| · sqrt(Σ_tokens X_j²) per weight, fp64, shape of ``weight``."""
    return weight.detach().double().abs() * col_sumsq.double().sqrt().unsqueeze(0)


def wanda_masks(
    handle: ModelHandle, tokens: torch.Tensor, targets: list[str], n: int, m: int, batch_size: int = 8
) -> dict[str, torch.Tensor]:
    """name -> bool [out, in] Wanda N:M mask for every target, computed block by block."""

    def make_stat(lin: nn.Linear) -> ColumnSumSq:
        return ColumnSumSq(lin.in_features, lin.weight.device)

    def prune(name: str, lin: nn.Linear, stat: ColumnSumSq) -> BlockResult:
        mask = topn_mask(wanda_scores(lin.weight, stat.sumsq), n, m)
        return BlockResult(mask=mask, pruned_weight=torch.where(mask, lin.weight.data, 0))

    return run_blockwise(handle, tokens, targets, make_stat, prune, batch_size=batch_size)


class WandaPrior:
    name = "wanda"
    needs_calibration = True
    Options = NoOptions

    def masks(self, inputs: PriorInputs, options: NoOptions) -> tuple[dict[str, torch.Tensor], dict]:
        return wanda_masks(inputs.handle, inputs.tokens, inputs.targets, inputs.n, inputs.m,
                           batch_size=inputs.batch_size), {}
