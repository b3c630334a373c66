"""Layer-local credit (``train.layer_credit`` = λ > 0): each masked Linear's own reconstruction error
as a second, deterministic signal for the logits of the groups this rank owns.

During the step's first sampled forward (draw 0), right after ZeRO-3 gathered a layer's weight W,
the layer's input X of this rank's batch gives H = XᵀX; with the owner's slice of the logits, the
exact gradient of the expected error E_r = E‖X (w_r ⊙ (1 − m))ᵀ‖² of every row the slice touches,
each row weighed by 1 / (w_r H w_rᵀ) (its error relative to its dense output energy, so λ means
the same in every layer), is computed by masks/layer_error.py::slice_error_gradient. Groups of
those rows outside the slice are held at this rank's sampled mask of the same forward, which it
has whole (an unbiased stand-in for their probabilities: E is linear in each of them). After the
policy-gradient update of the layer, the logits move by −λ·G. Everything is computed at the
logits the forward used, so the two terms add like one step of a combined objective.

Cost (docs/estimators.md): per layer and step, tokens·d_in² multiply-adds for H (shared by the
Linears that read one input: q, k, v and gate, up) and rows/R·d_in² for the gradient; G is fp32
``[g, M]``, 4 bytes per masked weight summed over ranks, held from the forward to the update and
none between steps. Nothing crosses ranks: each rank's slice learns from its own batch.
"""

from __future__ import annotations

import torch

from maskpro_ds.masks.layer_error import slice_error_gradient
from maskpro_ds.masks.nm import unpack_bits
from maskpro_ds.train.logit_store import LogitStore
from maskpro_ds.train.mask_modes import SampleMode


def owned_rows(store: LogitStore, layer: int) -> tuple[int, int, int]:
    """(first row, end row, offset of the slice's first group within those rows) of this rank's slice."""
    in_f = store.shapes[layer][1]
    per_row = in_f // store.m
    g0, g1 = store.local_range(layer)
    r0, r1 = g0 // per_row, -(-g1 // per_row)
    return r0, r1, g0 - r0 * per_row


def rows_of_packed(packed: torch.Tensor, in_f: int, r0: int, r1: int) -> torch.Tensor:
    """Bool ``[(r1 - r0) · in_f]``: rows ``[r0, r1)`` of a packed ``[out, in_f]`` mask (nm.pack_bits)."""
    first, last = r0 * in_f, r1 * in_f
    bits = unpack_bits(packed[first // 8:-(-last // 8)], -(-last // 8) * 8 - (first // 8) * 8)
    return bits[first % 8:first % 8 + last - first]


def row_gradient(weight_rows: torch.Tensor, h: torch.Tensor, logits: torch.Tensor, kept_rows: torch.Tensor,
                 offset: int, m: int) -> torch.Tensor:
    """The layer-credit gradient ``[g, M]`` of a slice (fp32), rows weighed by 1 / (w H wᵀ).

    ``weight_rows`` ``[rows, in]``, ``h`` the input Gram matrix, ``logits`` the slice ``[g, M]``,
    ``kept_rows`` bool ``[rows · in]`` this forward's mask of the rows, ``offset`` the slice's first
    group within the rows. Shared by the trainer and the test reference."""
    w = weight_rows.float()
    energy = ((w @ h) * w).sum(dim=1)  # the rows' dense output energy
    scale = torch.where(energy > 0, 1.0 / energy.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(energy))
    pruned = (~kept_rows).to(torch.float32).view(-1, m)
    return slice_error_gradient(w, h, logits, pruned, offset, row_scale=scale)


def gram(x: torch.Tensor) -> torch.Tensor:
    """H = XᵀX (fp32) over every token of a layer input ``[..., in]``."""
    xs = x.reshape(-1, x.shape[-1]).float()
    return xs.t() @ xs


class LayerCredit:
    """Collects each layer's credit gradient in the first sampled forward of a step; applies it after
    the layer's policy-gradient update."""

    def __init__(self, store: LogitStore, weight: float, every: int = 1):
        if store.n != 2:
            raise ValueError(f"train.layer_credit needs N = 2 (the pair kernels); mask.n is {store.n}")
        self.store, self.weight, self.every = store, float(weight), int(every)
        self._grads: dict[int, torch.Tensor] = {}
        self._step: int | None = None  # the step the gradients are of
        self._gram: tuple[torch.Tensor, torch.Tensor] | None = None  # (the input it was made from, H)

    @classmethod
    def from_config(cls, store: LogitStore, train) -> LayerCredit | None:
        """The credit ``train`` (a TrainConfig) asks for, or None when ``train.layer_credit`` is 0."""
        return cls(store, train.layer_credit, train.layer_credit_every) if train.layer_credit > 0 else None

    def active(self, step: int) -> bool:
        """Whether ``step`` computes the credit (every ``every``-th step, from step 0)."""
        return step % self.every == 0

    @torch.no_grad()
    def collect(self, layer: int, weight: torch.Tensor, x: torch.Tensor, packed_mask: torch.Tensor) -> None:
        """Called by the masked Linear with its gathered weight, its input and this forward's mask."""
        mode = self.store.active_mode
        if not isinstance(mode, SampleMode) or mode.draw != 0 or not self.active(mode.step):
            return
        if mode.step != self._step:  # a new step: what a skipped step collected is dropped
            self._grads.clear()
            self._step = mode.step
        logits = self.store.logits[layer].contiguous()  # the store keeps them transposed
        if logits.shape[0] == 0:  # this rank owns no group of the layer: no H to form
            return
        # q, k and v (gate and up) read the same tensor: one H for them. Holding the tensor keeps its
        # memory from being reused by a later input, so identity cannot match a different one.
        if self._gram is None or self._gram[0] is not x:
            self._gram = (x, gram(x))
        in_f = self.store.shapes[layer][1]
        r0, r1, offset = owned_rows(self.store, layer)
        kept = rows_of_packed(packed_mask, in_f, r0, r1)
        self._grads[layer] = row_gradient(weight[r0:r1], self._gram[1], logits, kept, offset, self.store.m)

    @torch.no_grad()
    def apply(self, layer: int) -> None:
        """logits −= λ·G for this rank's slice of ``layer`` (nothing if the forward did not reach it)."""
        self._gram = None  # the forward is over: drop H and the input it holds
        grad = self._grads.pop(layer, None)
        if grad is not None:
            self.store.logits[layer].sub_(self.weight * grad)
