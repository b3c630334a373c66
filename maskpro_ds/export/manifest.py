"""``export.json``: the record an export leaves at its root (formats, pattern, source, base, per-layer counts).

Written last by the pipeline (so an export without it is unfinished) and read first by verify.
"""

from __future__ import annotations

EXPORT_MANIFEST = "export.json"
EXPORT_FORMAT = "maskpro_ds.export"
DEFAULT_CHUNK_ELEMENTS = 1 << 22  # 4M weights per block: ~100 MB of temporaries, large enough to stream at disk speed
