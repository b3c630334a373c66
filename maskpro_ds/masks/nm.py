"""N:M mask math: groups, strict validation, deterministic top-N, bit packing, magnitude prior.

Groups are M consecutive weights along the input (last) dimension of an ``[out, in]`` weight,
the layout of cuSPARSELt, CUTLASS and compressed-tensors. Pure tensor code: no torch.distributed.

Bit packing is little-endian along the input dim: bit j of byte b is column 8b + j, byte-identical
to ``numpy.packbits(mask, axis=-1, bitorder="little")``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
# Row b holds the 8 bits of byte b, little-endian: unpacking is one row gather per byte.
_UNPACK_TABLE = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).to(torch.bool)


def parse_pattern(text: str) -> tuple[int, int]:
    """Parse ``"N:M"`` into ``(n, m)`` with ``0 < n < m``; the one place this string is read."""
    parts = str(text).strip().split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"mask.pattern must look like 'N:M' with integers, e.g. '2:4'; got {text!r}")
    n, m = int(parts[0]), int(parts[1])
    if not 0 < n < m:
        raise ValueError(f"mask.pattern {text!r}: need 0 < N < M (e.g. '2:4', '4:8'); got N={n}, M={m}")
    return n, m


def check_divisible(shape: tuple[int, ...] | torch.Size, m: int, name: str = "weight") -> None:
    """Raise ValueError unless the input (last) dimension divides into groups of ``m``."""
    if len(shape) < 1 or shape[-1] % m != 0:
        raise ValueError(
            f"{name}: input dim {tuple(shape)[-1] if len(shape) else None} of shape {tuple(shape)} is not "
            f"divisible by M={m}; exclude this layer (model.exclude) or choose another pattern"
        )


def group_view(t: torch.Tensor, m: int) -> torch.Tensor:
    """View ``t`` (``[..., in]``) as ``[num_groups, m]`` groups along the input dim."""
    check_divisible(t.shape, m)
    return t.reshape(-1, m)


def topn_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the N largest scores of every group of M along the last dim; returns bool, same shape.

    Ties go to the lower column (the order a stable descending sort gives). Ties are common
    (weights dequantised from 4-bit files), so this rule is part of the format. NaN scores are
    rejected rather than silently ranked.
    """
    if torch.isnan(scores).any():
        raise ValueError("topn_mask: scores contain NaN; refusing to pick a mask from them")
    groups = group_view(scores, m)
    if m > 8:  # M^2 comparisons stop paying off against one sort
        order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[:, :n]
        mask = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
        mask.scatter_(1, order, True)
        return mask.reshape(scores.shape)
    # Rank of column j = columns that come before it in the stable descending order: earlier columns
    # with a score >= its own, later ones with a strictly greater score. Kept iff rank < N.
    # ~4x faster than torch.sort on groups of 4 (it dominates the export of a 70B model).
    cols = groups.unbind(dim=1)
    keep = torch.empty(groups.shape, dtype=torch.bool, device=scores.device)
    for j in range(m):
        rank = torch.zeros(groups.shape[0], dtype=torch.uint8, device=scores.device)
        for k in range(m):
            if k < j:
                rank += cols[k] >= cols[j]
            elif k > j:
                rank += cols[k] > cols[j]
        keep[:, j] = rank < n
    return keep.reshape(scores.shape)


def magnitude_prior(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The magnitude prior: top-N |w| per group (computed in fp32 so bf16 ties resolve the same)."""
    return topn_mask(weight.detach().abs().float(), n, m)


def nm_violations(mask: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Indices of groups of ``mask`` that do not keep exactly N of M (empty tensor if strict)."""
    counts = group_view(mask.to(torch.int32), m).sum(dim=-1)
    return torch.nonzero(counts != n).flatten()


@dataclass
class NMReport:
    """Result of validating several layers: which layers break strict N:M and at which groups."""

    n: int
    m: int
    layers_checked: int = 0
    offending: dict[str, list[int]] = field(default_factory=dict)  # layer -> first offending groups
    offending_counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.offending

    def summary(self) -> str:
        if self.ok:
            return f"strict {self.n}:{self.m}: all {self.layers_checked} layers pass"
        lines = [f"strict {self.n}:{self.m} violated in {len(self.offending)} of {self.layers_checked} layers:"]
        for name, groups in self.offending.items():
            lines.append(f"  {name}: {self.offending_counts[name]} groups, first {groups}")
        return "\n".join(lines)


def validate_nm(masks: dict[str, torch.Tensor], n: int, m: int, max_listed: int = 8) -> NMReport:
    """Check every mask is strict N:M; the report names offending layers and their first groups."""
    report = NMReport(n=n, m=m)
    for name, mask in masks.items():
        report.layers_checked += 1
        bad = nm_violations(mask, n, m)
        if bad.numel():
            report.offending[name] = bad[:max_listed].tolist()
            report.offending_counts[name] = int(bad.numel())
    return report


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor ``[..., k]`` into uint8 ``[..., ceil(k/8)]``, little-endian along the last dim."""
    mask = mask.to(torch.bool)
    k = mask.shape[-1]
    pad = (-k) % 8
    if pad:
        mask = torch.nn.functional.pad(mask, (0, pad))
    bits = mask.reshape(*mask.shape[:-1], -1, 8).to(torch.uint8)
    weights = _BIT_WEIGHTS.to(mask.device)
    return (bits * weights).sum(dim=-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``[..., ceil(k/8)]`` -> bool ``[..., k]``."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_bits: expected uint8, got {packed.dtype}")
    if packed.shape[-1] != (k + 7) // 8:
        raise ValueError(f"unpack_bits: last dim {packed.shape[-1]} does not hold {k} bits")
    table = _UNPACK_TABLE.to(packed.device)
    bits = table.index_select(0, packed.reshape(-1).to(torch.int32))
    return bits.reshape(*packed.shape[:-1], -1)[..., :k]
