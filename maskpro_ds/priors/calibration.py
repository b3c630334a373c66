"""Calibration data and the block-by-block activation pass shared by Wanda and SparseGPT.

The pass is the one of the Wanda and SparseGPT reference implementations: run the model on the
calibration tokens and keep block 0's input hidden states and every block's own call arguments
(position ids, attention mask, rotary table: :mod:`maskpro_ds.priors.block_inputs`); then for
each block in turn: load it, run it on the held inputs and its own arguments with forward
hooks on its target Linears feeding per-layer statistics (all Linears of a block see the block's
DENSE weights in this pass), let the method turn statistics into masks (and, for SparseGPT,
updated weights), write the pruned weights into the block, and run it again to produce the next
block's inputs. So block k+1 is calibrated on what the pruned blocks 0..k produce ("sequential"
semantics). Original weights are restored afterwards: the caller's model is unchanged and the
masks apply to the ORIGINAL weights (docs/method.md §2).

Calibration windows: the text is tokenised once and ``nsamples`` windows of ``seqlen`` tokens are
cut at evenly spaced, non-overlapping offsets across the whole stream, so a run is deterministic
without a seed and draws from the whole file rather than its first article. Each window is built
as a training window is (:mod:`maskpro_ds.data.windows`: BOS first when the policy says so).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from maskpro_ds.data.windows import BosPolicy, bos_id, spaced_windows, text_ids
from maskpro_ds.models.lazy import ModelHandle
from maskpro_ds.models.targets import targets_in_block
from maskpro_ds.priors.block_inputs import block_forward, record_block_inputs

log = logging.getLogger(__name__)


def calibration_tokens(tokenizer, text: str, nsamples: int, seqlen: int, add_bos: BosPolicy = "auto") -> torch.Tensor:
    """``[nsamples, seqlen]`` token ids from evenly spaced non-overlapping windows of ``text``."""
    if nsamples < 1 or seqlen < 2:
        raise ValueError(f"need --nsamples >= 1 and --seqlen >= 2; got {nsamples}, {seqlen}")
    return spaced_windows(text_ids(tokenizer, text), nsamples, seqlen, bos_id(tokenizer, add_bos, "--add-bos"),
                          where="--calib")


class ColumnSumSq:
    """Wanda's statistic: per input column j, the sum over calibration tokens of X_j² (fp64)."""

    def __init__(self, in_features: int, device):
        self.sumsq = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        self.sumsq += (x * x).sum(dim=0)
        self.tokens += x.shape[0]


class Hessian:
    """SparseGPT's statistic: H = (2/n) Σ x xᵀ over the n calibration tokens (fp32, as the paper)."""

    def __init__(self, in_features: int, device):
        self.h = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        new = self.tokens + x.shape[0]
        # Running mean, so H's scale does not depend on how many tokens were seen.
        self.h *= self.tokens / new
        self.h.addmm_(x.t(), x, alpha=2.0 / new)
        self.tokens = new


@dataclass
class BlockResult:
    """What a method returns for one Linear: its mask and the weight to use for the next blocks."""

    mask: torch.Tensor  # bool [out, in]
    pruned_weight: torch.Tensor  # what the block runs with while producing the next block's inputs


def run_blockwise(
    handle: ModelHandle,
    tokens: torch.Tensor,
    targets: list[str],
    make_stat: Callable[[nn.Linear], object],
    prune: Callable[[str, nn.Linear, object], BlockResult],
    batch_size: int = 8,
    on_block: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Run the sequential block-by-block pass; returns name -> bool mask for every target.

    ``on_block(index, {name: pruned weight})``, when given, receives each block's pruned weights as
    soon as they are known (e.g. to stream SparseGPT's reconstructed weights to disk)."""
    masks: dict[str, torch.Tensor] = {}
    n_blocks = len(handle.layers)
    with torch.no_grad():
        inputs = record_block_inputs(handle, tokens, batch_size)
        states = inputs.hidden
        for index in range(n_blocks):
            calls = inputs.calls[index]
            t0 = time.perf_counter()
            block = handle.materialize_block(index)
            names = targets_in_block(targets, f"{handle.layers_prefix}.{index}")
            linears = {name: handle.model.get_submodule(name) for name in names}
            stats = {name: make_stat(lin) for name, lin in linears.items()}
            hooks = [
                lin.register_forward_hook(lambda _m, inp, _out, s=stats[name]: s.add(inp[0]))
                for name, lin in linears.items()
            ]
            try:
                if names:
                    for hidden, call in zip(states, calls, strict=True):
                        block_forward(block, hidden, call)
            finally:
                for h in hooks:
                    h.remove()
            originals = {}
            for name, lin in linears.items():
                result = prune(name, lin, stats.pop(name))
                masks[name] = result.mask.cpu()
                originals[name] = lin.weight.data
                lin.weight.data = result.pruned_weight.to(dtype=lin.weight.dtype, device=lin.weight.device)
            if on_block is not None and linears:
                on_block(index, {name: lin.weight.data for name, lin in linears.items()})
            if index + 1 < n_blocks:
                states = [block_forward(block, hidden, call) for hidden, call in zip(states, calls, strict=True)]
            inputs.calls[index] = []  # this block's arguments are no longer needed
            for name, lin in linears.items():
                lin.weight.data = originals[name]
            handle.release_block(index)
            log.info("block %d/%d: %d layers in %.2fs", index + 1, n_blocks, len(names), time.perf_counter() - t0)
    missing = [t for t in targets if t not in masks]
    assert not missing, f"targets outside the decoder blocks were not visited: {missing[:4]}"
    return masks
