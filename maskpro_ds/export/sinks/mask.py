"""``mask`` (formats.md §2): the learned mask as a mask artifact, written as it streams.

Same directory layout and manifest as every other mask artifact
(:class:`maskpro_ds.formats.mask_artifact.MaskArtifactWriter` does the writing), so
``read_mask_artifact``, the trainer's ``mask.prior`` and ``apply`` read it.
"""

from __future__ import annotations

from maskpro_ds.export.sinks.base import (
    CheckContext,
    ExportOptions,
    RowBlock,
    RowView,
    SinkContext,
    raw_bytes,
)
from maskpro_ds.formats.mask_artifact import MASK_FILE, MaskArtifactWriter, read_mask_artifact
from maskpro_ds.formats.safetensors_io import read_header
from maskpro_ds.masks.nm import unpack_bits


class MaskCheck:
    """verify's view of a mask artifact: its manifest agrees with export.json; its packed bits."""

    authority = 0  # the mask itself: every other format is compared with it

    def __init__(self, ctx: CheckContext):
        self.ctx = ctx
        self.artifact = read_mask_artifact(ctx.directory)
        self.tensors, _ = read_header(ctx.directory / MASK_FILE)

    def check_files(self, report) -> None:
        if self.artifact.shapes != self.ctx.shapes or (self.artifact.n, self.artifact.m) != (self.ctx.n, self.ctx.m):
            report.fail("mask: mask_manifest.json layers or pattern differ from export.json")
        try:
            if self.artifact.verify():
                report.checked.append(f"mask: sha256 of {MASK_FILE}")
            else:
                report.skipped.append(f"mask: checksum of {MASK_FILE} (written before checksums were recorded)")
        except ValueError as e:
            report.fail(str(e))

    def rows(self, layer: str, r0: int, r1: int) -> RowView:
        packed = self.ctx.reader.read_rows(self.tensors[layer], r0, r1)
        return RowView(mask=unpack_bits(packed, self.ctx.shapes[layer][1]), mask_label="the exported mask")

    def copied(self, name: str):
        return None

    def finish(self, report) -> None:
        pass


class MaskSink:
    """Streams packed mask rows into the format directory; the manifest comes last."""

    format = "mask"
    needs_weights = False
    Check = MaskCheck

    @classmethod
    def check(cls, source, options: ExportOptions) -> None:
        pass

    def __init__(self, ctx: SinkContext):
        src = ctx.source
        self.writer = MaskArtifactWriter(ctx.directory, src.shapes, src.n, src.m, src.base_fingerprint, src.meta)

    def masked_rows(self, layer: str, block: RowBlock) -> None:
        self.writer.write_packed_rows(layer, block.r0, raw_bytes(block.packed_bits))

    def passthrough(self, info, reader) -> None:
        pass

    def tally(self) -> dict:
        return {"written": self.writer.writer.take_written()}

    def absorb(self, tally: dict) -> None:
        self.writer.writer.add_written(tally["written"])

    def finish(self) -> dict:
        return self.writer.finish()

    def abort(self) -> None:
        self.writer.abort()
