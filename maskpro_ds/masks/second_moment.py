"""Per-logit adaptive steps: the logit update divided by a running second moment (RMSProp-style).

The plain update moves logit i by lr · d_i with d = −(1/K) Σ_k a_k ∇log P(m_k | π) (docs/method.md
§3). This rule keeps, per logit, v_i = running mean of d_i² over PAST steps and moves it by

    π_i ← π_i + lr · d_i / (sqrt(v̂_i) + ε),      v̂ = v / (1 − β^t)   (t past updates; v̂ = 0 at t = 0)
    v_i ← β v_i + (1 − β) d_i²                    (after the step: use, then refresh)

The divisor depends only on earlier steps, so given the past it is a fixed positive diagonal D and
E[step] = lr · D⁻¹ E[d]: the expected direction is the true gradient direction preconditioned by D,
with no bias from this step's samples (Adam's refresh-then-use order would shrink exactly the rare,
large events this rule is for). A group that rarely deviates has a small v and moves further when
it does; a group that deviates often moves less per event. ε floors the divisor, in the units of d
(advantage × score): with ``train.advantage_norm = rms`` a deviation event has |d| of order 1/K.

State: v is fp32 ``[g, M]`` beside the logits (4 bytes per weight, sharded like them). bf16 is not
enough: with β = 0.999 the refresh adds (1 − β) d² ≈ 1e-3 · v per step, below bf16's relative step
of 2⁻⁸, so v would stop moving. Every operation is elementwise per logit (chunking and slicing
never change the bits), so a sliced store and a whole-layer reference agree bit for bit.
"""

from __future__ import annotations

import math

import torch

from maskpro_ds.masks.policy import score, top2_code_t, update_block, update_weights
from maskpro_ds.masks.sampling import check_finite, chunk_groups, code_dtype, masks_to_codes


def bias_scale(beta: float, updates: int) -> float:
    """1 / (1 − β^t), the bias correction of v after ``updates`` refreshes; 0.0 when there were none."""
    if updates <= 0:
        return 0.0
    return 1.0 / -math.expm1(updates * math.log(beta))


def second_moment_step(xt: torch.Tensor, vt: torch.Tensor, d: torch.Tensor, lr: float, beta: float, eps: float,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(new logits, new v) from logits ``xt``, state ``vt`` and direction ``d`` of one block (any layout).

    fp32 throughout; ``scale`` = :func:`bias_scale` of the updates so far.
    """
    denom = torch.sqrt(vt * scale) + eps if scale else torch.full_like(vt, eps)
    new = xt + (d * lr) / denom
    new_v = vt * beta + (d * d) * (1.0 - beta)
    return new, new_v


class SecondMomentRule:
    """The store-facing update of one layer slice with its second-moment state ``v`` (updated in place).

    ``apply_codes`` is the N = 2 path (per-group mask codes, chunked like policy.apply_update_codes_);
    ``apply_masks`` takes bool masks for any N. Both return after checking the logits are finite.
    """

    def __init__(self, v: torch.Tensor, beta: float, eps: float, updates: int):
        if v.dtype != torch.float32:
            raise ValueError(f"SecondMomentRule: the second moment must be fp32, got {v.dtype}")
        self.v, self.beta, self.eps = v, float(beta), float(eps)
        self.scale = bias_scale(self.beta, updates)

    def _check(self, logits: torch.Tensor) -> None:
        if logits.shape != self.v.shape:
            raise ValueError(f"SecondMomentRule: logits {tuple(logits.shape)} and state {tuple(self.v.shape)} differ")

    @torch.no_grad()
    def apply_codes(self, logits: torch.Tensor, codes: torch.Tensor, advantages: list[float], lr: float) -> torch.Tensor:
        """Update fp32 ``logits [G, M]`` and ``v`` in place from codes ``[K, G]``; returns the top-2 codes."""
        self._check(logits)
        g_total, m = logits.shape
        if codes.dim() != 2 or codes.shape != (len(advantages), g_total):
            raise ValueError(f"SecondMomentRule: need codes [K, {g_total}] for K advantages, got {tuple(codes.shape)}")
        w = torch.tensor(update_weights(advantages, 1.0), dtype=torch.float32, device=logits.device)
        final = torch.empty(g_total, dtype=code_dtype(m), device=logits.device)
        step = chunk_groups(logits.device)
        for start in range(0, g_total, step):
            stop = min(start + step, g_total)
            xt = logits[start:stop].t().contiguous()
            d = update_block(xt, codes[:, start:stop].contiguous(), w)
            new, new_v = second_moment_step(xt, self.v[start:stop].t(), d, lr, self.beta, self.eps, self.scale)
            final[start:stop] = top2_code_t(list(new.unbind(0))).to(final.dtype)
            logits[start:stop] = new.t()
            self.v[start:stop] = new_v.t()
        check_finite(logits, 0, "update")
        return final

    @torch.no_grad()
    def apply_masks(self, logits: torch.Tensor, masks: list[torch.Tensor], advantages: list[float], lr: float,
                    n: int) -> torch.Tensor:
        """Update ``logits`` and ``v`` in place from bool masks ``[G, M]`` (any N); returns the logits."""
        self._check(logits)
        if len(masks) != len(advantages) or not masks:
            raise ValueError(f"SecondMomentRule: need one advantage per mask, got {len(masks)} and {len(advantages)}")
        if n == 2:  # the codes path, so N = 2 gives the same bits whichever entry point is used
            self.apply_codes(logits, torch.stack([masks_to_codes(mk) for mk in masks]), advantages, lr)
            return logits
        d = torch.zeros_like(logits)
        for mask, w in zip(masks, update_weights(advantages, 1.0), strict=True):
            d += w * score(logits, mask, n)
        new, new_v = second_moment_step(logits, self.v, d, lr, self.beta, self.eps, self.scale)
        logits.copy_(new)
        self.v.copy_(new_v)
        check_finite(logits, 0, "update")
        return logits
