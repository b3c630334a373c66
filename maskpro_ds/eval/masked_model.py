"""Apply a mask artifact to a loaded model on the fly (no export needed).

The mask is applied in place after loading, ``W ← torch.where(mask, W, 0)``: pruned slots are
exactly +0.0, the same weights an ``hf-dense`` export would hold. The artifact's base fingerprint is
checked against the model directory first, so a mask is never applied to a base it was not made
from (pass ``check_fingerprint=False`` only for a base whose files were re-written, e.g. re-sharded).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from maskpro_ds.formats.hashing import model_fingerprint
from maskpro_ds.formats.mask_artifact import read_mask_artifact


@dataclass
class MaskApplied:
    artifact: str
    pattern: str
    layers: int
    weights_masked: int
    fingerprint_checked: bool
    method: str | None


def apply_mask_artifact(
    model: torch.nn.Module,
    artifact_dir: str | os.PathLike,
    model_dir: str | os.PathLike | None = None,
    check_fingerprint: bool = True,
) -> MaskApplied:
    """Zero every pruned slot of every layer in the artifact, in place; returns what was done."""
    art = read_mask_artifact(artifact_dir)
    checked = False
    if check_fingerprint:
        if model_dir is None:
            raise ValueError("apply_mask_artifact: pass model_dir to check the fingerprint, or check_fingerprint=False")
        art.check_base(model_fingerprint(model_dir))
        checked = art.base_fingerprint is not None
    masked = 0
    for name, shape in art.shapes.items():
        try:
            module = model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"--mask {artifact_dir}: layer {name} does not exist in the model") from e
        weight = module.weight
        if tuple(weight.shape) != tuple(shape):
            raise ValueError(f"--mask {artifact_dir}: layer {name} is {list(shape)} in the mask, {list(weight.shape)} in the model")
        mask = art.layer_mask(name).to(weight.device)
        with torch.no_grad():
            weight.copy_(torch.where(mask, weight, 0))
        masked += weight.numel()
    return MaskApplied(
        artifact=str(artifact_dir), pattern=art.pattern, layers=len(art.shapes), weights_masked=masked,
        fingerprint_checked=checked, method=art.meta.get("method"),
    )
