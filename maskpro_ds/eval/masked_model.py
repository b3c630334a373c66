"""Apply a mask artifact to a loaded model on the fly (no export needed).

The mask is applied in place after loading, ``W ← torch.where(mask, W, 0)``: pruned slots are
exactly +0.0, the same weights an ``hf-dense`` export would hold. The artifact's base fingerprint is
checked against the model directory first, so a mask is never applied to a base it was not made
from (pass ``check_fingerprint=False`` only for a base whose files were re-written, e.g. re-sharded).

:func:`apply_weight_files` loads pruned weights written by a prior (SparseGPT's ``--save-weights``:
the one-shot baseline whose kept weights were changed) in place of the model's own.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

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


def apply_weight_files(model: torch.nn.Module, directory: str | os.PathLike) -> int:
    """Copy the weights listed in ``directory/weights.json`` into ``model``; returns how many layers."""
    directory = Path(directory)
    index = directory / "weights.json"
    if not index.is_file():
        raise FileNotFoundError(f"{index} not found: pass a directory written by maskpro-prior --save-weights")
    weight_map = json.loads(index.read_text()).get("weight_map") or {}
    by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, []).append(name)
    for file, names in sorted(by_file.items()):
        with safe_open(str(directory / file), framework="pt") as f:
            for name in names:
                try:
                    weight = model.get_submodule(name).weight
                except AttributeError as e:
                    raise ValueError(f"{directory / file}: layer {name} does not exist in the model") from e
                new = f.get_tensor(name)
                if tuple(new.shape) != tuple(weight.shape):
                    raise ValueError(f"{directory / file}: layer {name} is {list(new.shape)}, "
                                     f"{list(weight.shape)} in the model")
                with torch.no_grad():
                    weight.copy_(new.to(weight.dtype))
    return len(weight_map)
