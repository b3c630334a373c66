"""``apply``: a mask artifact + the base model it was made from -> an exported model.

The same streaming pass as a checkpoint export, with the mask read from the artifact's packed bits
instead of top-N of logits. The artifact's base fingerprint must match ``--base`` (a mask applied
to other weights is a different, untested model); formats: hf-dense (default), ct-sparse24, mask.
"""

from __future__ import annotations

import os
from pathlib import Path

from maskpro_ds.export.consolidate import ArtifactMasks
from maskpro_ds.export.pipeline import run_export


def apply_mask(mask_dir: str | os.PathLike, base_dir: str | os.PathLike, out: str | os.PathLike,
               formats="hf-dense", **options) -> Path:
    """Write ``out/<format>/`` for each format from a mask artifact applied to ``base_dir``."""
    source = ArtifactMasks(mask_dir)
    try:
        return run_export(source, base_dir, out, formats, **options)
    finally:
        source.close()
