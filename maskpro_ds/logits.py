"""The sharded logit store: who owns which groups, init from the prior, masks for every rank, update.

Every masked layer's ``G = out·in/M`` groups are cut into R contiguous, byte-aligned ranges
(checkpoint_format.split_groups); rank r owns range r of EVERY layer, as an fp32 ``[g, M]`` tensor.
Only the owner reads or writes its logits.

Masks reach the ranks as bits. In the forward of layer l at step t, the owner draws, on its slice,
the mask of every rank s (counter-based sampler keyed by (seed, t, s, l) at the groups' global
indices), packs each to 1 bit per weight, and one ``all_to_all`` gives every rank the R slices of
its own mask: R·d/(8R) bytes received per layer, against 2·d bytes for ZeRO-3's bf16 weight gather.

The update regenerates the same R masks on the slice (a pure function of the same keys and the
unchanged logits) and applies π ← π − η/R Σ_s a_s ∇log P(m_s). No logit-sized tensor ever crosses
the network, and the regenerated masks need no memory between forward and update.
"""

from __future__ import annotations

import math

import torch

from maskpro_ds import distributed
from maskpro_ds.checkpoint_format import split_groups
from maskpro_ds.masks.nm import pack_bits, unpack_bits
from maskpro_ds.masks.policy import apply_update_, final_mask, init_logits
from maskpro_ds.masks.sampling import key_scalar, sample_masks


class LogitStore:
    """This rank's logit slices of every masked layer, and the mask exchange built on them."""

    def __init__(self, names: list[str], shapes: list[tuple[int, int]], n: int, m: int, rank: int, world_size: int,
                 seed: int, device: torch.device | str = "cpu"):
        self.names, self.shapes = list(names), [tuple(s) for s in shapes]
        self.n, self.m = n, m
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.device = torch.device(device)
        # Range boundaries on whole bytes of packed bits: a slice of g groups is g·M bits.
        self.align = 8 // math.gcd(8, m)
        self.ranges = [split_groups(out_f * in_f // m, world_size, self.align) for out_f, in_f in self.shapes]
        self.logits: list[torch.Tensor] = [
            torch.zeros((r[rank][1] - r[rank][0], m), dtype=torch.float32, device=self.device) for r in self.ranges
        ]
        self.prior_bits: list[torch.Tensor | None] = [None] * len(names)
        # What the masked forward draws: ("sample", step), ("prior",) or ("final",).
        self.mode: tuple = ("final",)

    # ------------------------------------------------------------------ layout
    def local_range(self, layer: int) -> tuple[int, int]:
        return self.ranges[layer][self.rank]

    def num_local_groups(self) -> int:
        return sum(t.shape[0] for t in self.logits)

    def local_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.logits)

    def _slice_bytes(self, layer: int, rank: int) -> int:
        g0, g1 = self.ranges[layer][rank]
        return ((g1 - g0) * self.m + 7) // 8

    # ------------------------------------------------------------------ init
    def init_from_prior(self, layer: int, prior_slice: torch.Tensor, c: float) -> None:
        """Set π0 = C·m0 on this rank's slice; ``prior_slice`` is bool ``[g, M]`` for its range."""
        g0, g1 = self.local_range(layer)
        if tuple(prior_slice.shape) != (g1 - g0, self.m):
            raise ValueError(f"prior slice of {self.names[layer]} has shape {tuple(prior_slice.shape)}, expected {(g1 - g0, self.m)}")
        self.prior_bits[layer] = pack_bits(prior_slice.reshape(-1).to(torch.bool))
        self.logits[layer] = init_logits(prior_slice.to(self.device), c, self.m).to(torch.float32).reshape(g1 - g0, self.m)

    def prior_slice(self, layer: int) -> torch.Tensor:
        g0, g1 = self.local_range(layer)
        return unpack_bits(self.prior_bits[layer], (g1 - g0) * self.m).reshape(g1 - g0, self.m)

    # ------------------------------------------------------------------ masks
    def key(self, step: int, slot: int, layer: int) -> int:
        return key_scalar(self.seed, step, slot, layer)

    def slice_mask(self, layer: int, mode: tuple, slot: int) -> torch.Tensor:
        """Bool ``[g, M]`` on this rank's slice: rank ``slot``'s sample, the prior, or the final mask."""
        g0, _ = self.local_range(layer)
        if mode[0] == "sample":
            return sample_masks(self.logits[layer], self.n, self.key(mode[1], slot, layer), group_offset=g0)
        if mode[0] == "prior":
            return self.prior_slice(layer)
        return final_mask(self.logits[layer], self.n, self.m)

    def mask_for_forward(self, layer: int) -> torch.Tensor:
        """This rank's full ``[out, in]`` bool mask of ``layer`` under the current mode (collective)."""
        world = self.world_size
        if self.mode[0] == "sample":
            chunks = [pack_bits(self.slice_mask(layer, self.mode, s).reshape(-1)) for s in range(world)]
        else:  # the same mask for every rank: pack once
            chunks = [pack_bits(self.slice_mask(layer, self.mode, 0).reshape(-1))] * world
        send = torch.cat(chunks) if world > 1 else chunks[0]
        send_sizes = [c.numel() for c in chunks]
        recv_sizes = [self._slice_bytes(layer, s) for s in range(world)]
        recv = distributed.all_to_all_bytes(send, send_sizes, recv_sizes)
        out_f, in_f = self.shapes[layer]
        return unpack_bits(recv, out_f * in_f).reshape(out_f, in_f)

    # ------------------------------------------------------------------ update
    def apply_update(self, layer: int, step: int, advantages: list[float], lr: float) -> dict[str, float]:
        """π ← π − lr/R Σ_s a_s ∇log P(m_s) on this slice, regenerating the R masks of ``step``.

        Returns local counts for monitoring: groups whose samples deviate from the prior (summed
        over the R samples) and groups whose final mask differs from the prior.
        """
        masks = [self.slice_mask(layer, ("sample", step), s) for s in range(self.world_size)]
        prior = self.prior_slice(layer)
        deviating = sum(int((mk != prior).any(dim=1).sum()) for mk in masks)
        if lr != 0.0 and any(a != 0.0 for a in advantages):
            apply_update_(self.logits[layer], masks, advantages, lr, self.n)
        changed = int((final_mask(self.logits[layer], self.n, self.m) != prior).any(dim=1).sum())
        return {"deviating": deviating, "changed": changed}

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {name: t for name, t in zip(self.names, self.logits, strict=True)}

    def group_ranges(self) -> dict[str, tuple[int, int]]:
        return {name: self.local_range(i) for i, name in enumerate(self.names)}

    def all_finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in self.logits)
