"""The two halves of an export format: a :class:`Sink` that writes it and a :class:`FormatCheck` that re-reads it.

Writing (export/pipeline.py): one streaming pass over the base model. For every masked layer, row
block by row block, each sink gets a :class:`RowBlock`: the block's strict N:M mask (bytes and packed
bits), the pruned weights ``torch.where(mask, W, +0.0)`` (read only when some sink ``needs_weights``)
and, from a checkpoint, the logits behind the mask; every other base tensor goes to ``passthrough``.
``finish`` writes the format's indexes and manifests; ``abort`` closes its files after an error (the
pipeline deletes the temp directory). ``check`` refuses a request before anything is written.

The pass may run in several worker processes (export/workers.py), each writing its own row ranges
at their planned offsets into the files the sink opened. A sink therefore keeps nothing per block
but counts: ``tally`` hands over (and resets) what this process added since the last call (bytes
written per tensor, a format's statistics) and ``absorb`` adds a worker's tally to the sink the
parent finishes.

Checking (export/verify.py): the sink's ``Check`` class opens the format's directory and, for each
row block, returns what the format says about those rows (:class:`RowView`): a mask, dense
weights, or both, after its own internal checks (raising :class:`CheckFailed`). verify then
compares every format against the others and against the base: all masks agree, the mask is strict
N:M, dense weights hold the base value where kept and +0.0 where pruned, all dense views agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np
import torch

from maskpro_ds.formats.safetensors_io import Reader, TensorInfo


@dataclass
class ExportOptions:
    max_shard_bytes: int | None = None
    logits_dtype: str = "fp32"


@dataclass
class SinkContext:
    """What a sink is built from: its directory, the base, the masked layers and the mask source."""

    directory: Path  # <out>/<format>/ inside the export's temp directory
    base: object  # export.base_model.BaseModel: header-level view of the base model
    masked: dict[str, TensorInfo]  # masked layer -> its base weight tensor
    source: object  # export.sources.CheckpointMasks or ArtifactMasks: n, m, shapes, base_fingerprint, meta
    options: ExportOptions = field(default_factory=ExportOptions)


@dataclass
class RowBlock:
    """Rows ``[r0, r1)`` of one masked layer. Views of buffers the next block reuses: write them out
    (or copy them) inside ``masked_rows``, never keep them. The numpy fields are what the pass made;
    the properties are zero-copy torch views of them."""

    r0: int
    r1: int
    keep: np.ndarray  # uint8 [rows, in]: 1 = kept; strict N:M
    packed_bits: np.ndarray  # uint8 [rows, ceil(in/8)], nm.pack_bits layout
    pruned_bits: np.ndarray | None  # the pruned weights' raw bits, unsigned [rows * in] (None unless a sink needs weights)
    dtype: torch.dtype | None  # the base weight dtype
    logits_f32: np.ndarray | None  # fp32 [rows * in / M, M] from a checkpoint (read-only), else None

    @property
    def mask(self) -> torch.Tensor:
        """Bool ``[rows, in]``."""
        return torch.from_numpy(self.keep).view(torch.bool)

    @property
    def packed(self) -> torch.Tensor:
        return torch.from_numpy(self.packed_bits)

    @property
    def pruned(self) -> torch.Tensor | None:
        """``[rows, in]`` in the base dtype, +0.0 where pruned."""
        if self.pruned_bits is None:
            return None
        signed = self.pruned_bits.view(f"i{self.pruned_bits.itemsize}")  # torch has no wide unsigned views
        return torch.from_numpy(signed).view(self.dtype).view(self.r1 - self.r0, -1)


def raw_bytes(array: np.ndarray) -> memoryview:
    """A contiguous array's bytes, for a positional write."""
    return memoryview(array.reshape(-1).view(np.uint8))


class Sink(Protocol):
    format: ClassVar[str]
    needs_weights: ClassVar[bool]  # the pass must read and prune the base weights for this format
    Check: ClassVar[type[FormatCheck]]  # the verify hook

    @classmethod
    def check(cls, source, options: ExportOptions) -> None:
        """Refuse (ValueError naming the option) before anything is written."""

    def masked_rows(self, layer: str, block: RowBlock) -> None: ...

    def passthrough(self, info: TensorInfo, reader: Reader) -> None: ...

    def tally(self) -> dict:
        """What this process added since the last call (bytes per tensor, counts); resets it."""

    def absorb(self, tally: dict) -> None:
        """Add a worker's :meth:`tally` (or this process's own) to the totals ``finish`` uses."""

    def finish(self) -> dict:
        """Close files, write indexes and manifests; returns facts for export.json."""

    def abort(self) -> None: ...


class CheckFailed(Exception):
    """A format's own check of a row block failed; the message names what."""


@dataclass
class RowView:
    """What one format says about rows ``[r0, r1)`` of a masked layer."""

    mask: torch.Tensor | None = None  # bool [rows, in]
    mask_label: str = ""  # how failures name this mask ("the exported mask", "ct-sparse24 bitmask", ...)
    dense: torch.Tensor | None = None  # [rows, in] in the base dtype, pruned slots +0.0
    dense_label: str = ""


@dataclass
class CheckContext:
    """What a format check is opened with."""

    directory: Path
    shapes: dict[str, tuple[int, int]]
    n: int
    m: int
    base: object | None  # BaseModel of the base model, when it was found
    reader: Reader


class FormatCheck(Protocol):
    def __init__(self, ctx: CheckContext) -> None: ...

    def check_files(self, report) -> None:
        """Whole-file checks before the row pass (tensor sets, indexes, config blocks)."""

    def rows(self, layer: str, r0: int, r1: int) -> RowView: ...

    def copied(self, name: str) -> TensorInfo | None:
        """Where this format holds a byte copy of unmasked base tensor ``name`` (None: it holds none)."""

    def finish(self, report) -> None:
        """Checks that need the whole pass (e.g. a recorded global sparsity)."""
