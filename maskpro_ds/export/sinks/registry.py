"""The export formats ``--format`` knows, in the order they are written; adding one is a new file and one line here."""

from __future__ import annotations

from maskpro_ds.export.sinks.base import Sink
from maskpro_ds.export.sinks.ct_sparse24 import CtSparse24Sink
from maskpro_ds.export.sinks.hf_dense import HfDenseSink
from maskpro_ds.export.sinks.logits import LogitsSink
from maskpro_ds.export.sinks.mask import MaskSink

SINKS: dict[str, type[Sink]] = {cls.format: cls for cls in (
    HfDenseSink,
    MaskSink,
    CtSparse24Sink,
    LogitsSink,
)}
FORMATS = tuple(SINKS)


def parse_formats(text: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"hf-dense,mask"`` -> known format names, in the given order, without repeats."""
    items = text.split(",") if isinstance(text, str) else list(text)
    formats = []
    for item in (i.strip() for i in items):
        if item not in SINKS:
            raise ValueError(f"--format: unknown format {item!r}; choose from {', '.join(FORMATS)}")
        if item not in formats:
            formats.append(item)
    if not formats:
        raise ValueError(f"--format: give at least one of {', '.join(FORMATS)}")
    return formats
