"""The two halves of an export format: a :class:`Sink` that writes it and a :class:`FormatCheck` that re-reads it.

Writing (export/pipeline.py): one streaming pass over the base model. For every masked layer, row
block by row block, each sink gets the block's strict N:M mask, the pruned weights
``torch.where(mask, W, +0.0)`` (read only when some sink ``needs_weights``) and, from a checkpoint,
the logits behind the mask; every other base tensor goes to ``passthrough``. ``finish`` writes the
format's indexes and manifests; ``abort`` closes its files after an error (the pipeline deletes the
temp directory). ``check`` refuses a request before anything is written.

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


class Sink(Protocol):
    format: ClassVar[str]
    needs_weights: ClassVar[bool]  # the pass must read and prune the base weights for this format
    Check: ClassVar[type[FormatCheck]]  # the verify hook

    @classmethod
    def check(cls, source, options: ExportOptions) -> None:
        """Refuse (ValueError naming the option) before anything is written."""

    def masked_rows(self, layer: str, r0: int, pruned: torch.Tensor | None, mask: torch.Tensor,
                    logits: torch.Tensor | None) -> None: ...

    def passthrough(self, info: TensorInfo, reader: Reader) -> None: ...

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
