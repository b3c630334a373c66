"""Export: a training checkpoint (or a mask artifact) plus its base model -> files users deploy.

Formats are sinks (``sinks/``: ``hf-dense``, ``mask``, ``ct-sparse24``, ``logits``; the ``Sink``
protocol and its verify hook in ``sinks/base.py``, the list in ``sinks/registry.py``). One streaming
pass over the base feeds every requested sink (``pipeline.py``); ``verify.py`` re-reads an export
and checks it. Masks come from ``sources.py``. Command lines: maskpro_ds.cli.export.
"""

from maskpro_ds.export.pipeline import apply_mask, export_checkpoint, run_export
from maskpro_ds.export.sinks.registry import FORMATS
from maskpro_ds.export.verify import VerifyReport, verify_export

__all__ = ["FORMATS", "VerifyReport", "apply_mask", "export_checkpoint", "run_export", "verify_export"]
