"""The export's block kernel: keep bits from logits (or packed bits), the packed mask and the pruned
weights of a row block, in a few vectorised integer passes over buffers reused from block to block.

* Keep bytes from fp32 logits, M = 4: three contiguous compares over the flat logits give every
  pairwise comparison of a group as a byte (x0>=x1, x1>=x2, x2>=x3 | x0>=x2, x1>=x3 | x0>=x3, each
  at the byte of its first position). Viewed as one uint32 per group, they combine with one byte
  lane per position (SWAR) into how many positions beat each position; position j is kept iff
  fewer than N beat it. That is nm.topn_mask's rule exactly: k beats j if x_k > x_j, or x_k == x_j
  and k < j (so -0.0 ties +0.0, and inf is an ordinary value). NaN is refused. Other M go through
  nm.topn_mask.
* Keep bytes from packed bits (a mask artifact): ``numpy.unpackbits``, then a strict N:M count.
* The packed mask: ``numpy.packbits(bitorder="little")``, the layout of nm.pack_bits.
* The pruned weights: the weights' raw bits times the keep byte (0 or 1) in place: every kept value
  bit for bit and all bits clear (+0.0) where pruned, i.e. ``torch.where(mask, w, 0)`` for any
  float dtype, without a float operation.

Every output is a view of a buffer the next block overwrites. :meth:`BlockKernel.from_logits` does
all three in one compiled pass (export/native.py: nm4_block.c, kept only when it gives these
bytes on a probe) where it can, else in the numpy passes above.
"""

from __future__ import annotations

import numpy as np
import torch

from maskpro_ds.export.native import NativeNanLogits, native_kernel, run_block
from maskpro_ds.formats.mapped import MappedFiles
from maskpro_ds.masks.nm import nm_violations, topn_mask

LANES = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}  # raw-bit view of a weight by item size
_BYTE_LANES = 0x01010101  # a 1 in each byte lane of a uint32


class NanLogits(ValueError):
    """A block's logits hold NaN; no mask can be picked from them."""


class BlockKernel:
    """One process's buffers, its maps of the input files and the passes over them, for N:M masks."""

    def __init__(self, n: int, m: int):
        self.n, self.m = n, m
        self._buffers: dict[str, np.ndarray] = {}
        self.files = MappedFiles()  # inputs, viewed without a copy (released every RELEASE_BYTES and after every task)

    def buffer(self, key: str, count: int, dtype) -> np.ndarray:
        """A reused 1-D buffer of ``count`` items (grown when a block needs more); contents undefined."""
        buf = self._buffers.get(key)
        if buf is None or buf.dtype != dtype or buf.size < count:
            buf = self._buffers[key] = np.empty(count, dtype=dtype)
        return buf[:count]

    # ------------------------------------------------------------------ one block
    def from_logits(self, logits: np.ndarray, rows: int, in_f: int, weights: np.ndarray | None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """fp32 logits ``[rows * in_f / M, M]`` (and the weights' raw bits, flat, or None) ->
        (keep uint8 ``[rows, in_f]``, packed ``[rows, ceil(in_f/8)]``, pruned raw bits or None)."""
        fn = native_kernel() if self.m == 4 else None
        if fn is None or not logits.flags.c_contiguous or (weights is not None and not weights.flags.c_contiguous):
            keep = self.keep_from_logits(logits).reshape(rows, in_f)
            return keep, self.pack(keep), None if weights is None else self.prune(weights, keep)
        keep = self.buffer("keep", rows * in_f, np.uint8).reshape(rows, in_f)
        packed = self.buffer("packed", rows * ((in_f + 7) // 8), np.uint8).reshape(rows, (in_f + 7) // 8)
        pruned = None if weights is None else self.buffer("pruned", weights.size, weights.dtype)
        try:
            run_block(fn, logits, rows, in_f, self.n, keep, packed, weights, pruned,
                      self.buffer("codes", rows * in_f // 4, np.uint8))
        except NativeNanLogits as e:
            raise NanLogits(str(e)) from None
        return keep, packed, pruned

    # ------------------------------------------------------------------ keep bytes
    def keep_from_logits(self, logits: np.ndarray) -> np.ndarray:
        """fp32 logits ``[g, M]`` -> uint8 ``[g * M]``: 1 where nm.topn_mask keeps the weight."""
        if logits.size and np.isnan(np.max(logits)):  # max propagates NaN: one vectorised pass
            raise NanLogits("logits hold NaN")
        if self.m != 4:
            return topn_mask(torch.from_numpy(logits), self.n, self.m).numpy().view(np.uint8).reshape(-1)
        g = logits.shape[0]
        flat = logits.reshape(-1)
        c1, c2, c3 = self.buffer("c1", 4 * g, np.bool_), self.buffer("c2", 4 * g, np.bool_), self.buffer("c3", 4 * g, np.bool_)
        if g:
            np.greater_equal(flat[:-1], flat[1:], out=c1[:-1])  # bytes 0..2 of a group: c01, c12, c23
            np.greater_equal(flat[:-2], flat[2:], out=c2[:-2])  # bytes 0..1: c02, c13
            np.greater_equal(flat[:-3], flat[3:], out=c3[:-3])  # byte 0: c03
        a, b, c = (x.view(np.uint32) for x in (c1, c2, c3))
        np.bitwise_and(a, 0x00010101, out=a)  # clear the bytes that compared across groups
        np.bitwise_and(b, 0x00000101, out=b)
        np.bitwise_and(c, 0x00000001, out=c)
        # beaten = [3-c01-c02-c03, 2+c01-c12-c13, 1+c02+c12-c23, c03+c13+c23], one byte lane per
        # position: a·(2^8-1) + b·(2^16-1) + c·(2^24-1) + 0x00010203 (exact mod 2^32: every lane
        # of the result lies in 0..3, so no lane borrows from its neighbour).
        beaten = self.buffer("beaten", g, np.uint32)
        tmp = self.buffer("tmp", g, np.uint32)
        np.multiply(a, 0xFF, out=beaten)
        np.multiply(b, 0xFFFF, out=tmp)
        np.add(beaten, tmp, out=beaten)
        np.multiply(c, 0xFFFFFF, out=tmp)
        np.add(beaten, tmp, out=beaten)
        # kept iff beaten < N, i.e. bit 2 of (beaten + 4 - N) is clear (lanes stay below 8)
        np.add(beaten, 0x00010203 + (4 - self.n) * _BYTE_LANES, out=beaten)
        np.right_shift(beaten, 2, out=beaten)
        np.bitwise_and(beaten, _BYTE_LANES, out=beaten)
        np.bitwise_xor(beaten, _BYTE_LANES, out=beaten)
        return beaten.view(np.uint8)

    def keep_from_packed(self, packed: np.ndarray, in_features: int) -> np.ndarray:
        """Packed rows uint8 ``[r, ceil(in/8)]`` -> uint8 ``[r, in]`` (1 = kept)."""
        return np.unpackbits(packed, axis=-1, count=in_features, bitorder="little")

    def violations(self, keep: np.ndarray) -> int:
        """Groups of ``keep`` (uint8 0/1, any shape with the input dim last) not keeping exactly N."""
        if self.m != 4:
            return int(nm_violations(torch.from_numpy(keep).view(torch.bool), self.n, self.m).numel())
        lanes = np.ascontiguousarray(keep).reshape(-1).view(np.uint32)
        counts = self.buffer("counts", lanes.size, np.uint32)
        np.multiply(lanes, _BYTE_LANES, out=counts)  # the top byte sums the four lanes
        np.right_shift(counts, 24, out=counts)
        return int(np.count_nonzero(counts != self.n))

    # ------------------------------------------------------------------ outputs
    @staticmethod
    def pack(keep: np.ndarray) -> np.ndarray:
        """uint8 ``[r, in]`` -> the nm.pack_bits bytes ``[r, ceil(in/8)]``."""
        return np.packbits(keep, axis=-1, bitorder="little")

    def prune(self, weights: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """The weights' raw bits (unsigned, flat) times keep (0/1): a buffer of pruned raw bits."""
        out = self.buffer("pruned", weights.size, weights.dtype)
        np.multiply(weights, keep.reshape(-1), out=out)
        return out
