"""Export: a training checkpoint (or a mask artifact) plus its base model -> files users deploy.

Formats (docs/formats.md): ``hf-dense`` (a plain HF model with pruned slots +0.0), ``mask`` (packed
bits + manifest), ``ct-sparse24`` (compressed-tensors sparse-24-bitmask) and ``logits``
(consolidated per-layer logits). One streaming pass over the base feeds every format
(pipeline.py); ``verify.py`` re-reads an export and checks it. Entry points: cli.py.
"""

from maskpro_ds.export.apply import apply_mask
from maskpro_ds.export.pipeline import FORMATS, export_checkpoint, run_export
from maskpro_ds.export.verify import VerifyReport, verify_export

__all__ = ["FORMATS", "VerifyReport", "apply_mask", "export_checkpoint", "run_export", "verify_export"]
