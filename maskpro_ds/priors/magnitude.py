"""The magnitude prior: keep the N largest |w| of every group of M, per target Linear.

No calibration data. Weights are read one layer at a time (from the safetensors files in lazy mode),
so memory stays at one weight matrix whatever the model size.
"""

from __future__ import annotations

import torch

from maskpro_ds.masks.nm import magnitude_prior
from maskpro_ds.models.lazy import ModelHandle
from maskpro_ds.priors.base import NoOptions, PriorInputs


def magnitude_masks(handle: ModelHandle, targets: list[str], n: int, m: int) -> dict[str, torch.Tensor]:
    """name -> bool [out, in] top-N |W| per group (lower column wins ties)."""
    return {name: magnitude_prior(handle.weight(name), n, m).cpu() for name in targets}


class MagnitudePrior:
    name = "magnitude"
    needs_calibration = False
    Options = NoOptions

    def masks(self, inputs: PriorInputs, options: NoOptions) -> tuple[dict[str, torch.Tensor], dict]:
        return magnitude_masks(inputs.handle, inputs.targets, inputs.n, inputs.m), {}
