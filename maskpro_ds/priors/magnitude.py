"""The magnitude prior: keep the N largest |w| of every group of M, per target Linear.

No calibration data. Weights are read one layer at a time (from the safetensors files in lazy mode),
so memory stays at one weight matrix whatever the model size.
"""

from __future__ import annotations

import torch

from maskpro_ds.masks.nm import magnitude_prior
from maskpro_ds.priors.model_io import ModelHandle


def magnitude_masks(handle: ModelHandle, targets: list[str], n: int, m: int) -> dict[str, torch.Tensor]:
    """name -> bool [out, in] top-N |W| per group (lower column wins ties)."""
    return {name: magnitude_prior(handle.weight(name), n, m).cpu() for name in targets}
