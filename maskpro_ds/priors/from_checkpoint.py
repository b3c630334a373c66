"""The zero pattern of an already pruned checkpoint as a prior mask.

Two layouts are read, tensor by tensor (never the whole checkpoint):
- plain: an HF safetensors directory whose target weights are 0 in pruned slots (hf-dense export,
  SparseGPT/Wanda outputs); kept = ``P.weight != 0`` (−0.0 counts as zero);
- ct-sparse24: compressed-tensors ``sparse-24-bitmask`` (docs/formats.md §3); ``P.bitmask`` is
  unpacked directly (little-endian along the input dim), ``P.shape`` gives ``[out, in]``; the values
  in ``P.compressed`` are not needed.

Strictness rule: a group with MORE than N kept slots is an error (the checkpoint is not N:M at this
pattern). A group with FEWER than N non-zeros happens when a kept weight is exactly 0 (bf16
rounding, or SparseGPT's update landing on 0); it is completed deterministically with the
lowest-index zero slots of the group, so the mask is strict N:M and the same on every run. The
number of completed groups is reported in the artifact's meta.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from maskpro_ds.masks.nm import group_view, topn_mask, unpack_bits
from maskpro_ds.models.lazy import WeightFiles
from maskpro_ds.priors.base import PriorInputs


def _detect_layout(files: WeightFiles, name: str) -> str:
    if name + ".bitmask" in files:
        return "ct-sparse24"
    if name + ".weight" in files:
        return "plain"
    raise ValueError(f"--source has neither {name}.weight nor {name}.bitmask; exclude the layer (--exclude)")


def read_kept(files: WeightFiles, name: str, shape: tuple[int, int]) -> tuple[torch.Tensor, str]:
    """The raw kept pattern of layer ``name`` in the source (before strictness repair) and its layout."""
    layout = _detect_layout(files, name)
    if layout == "ct-sparse24":
        stored = tuple(int(v) for v in files.get(name + ".shape").flatten().tolist())
        if stored != tuple(shape):
            raise ValueError(f"--source {name}.shape is {list(stored)}, the base layer is {list(shape)}")
        kept = unpack_bits(files.get(name + ".bitmask"), shape[1])
    else:
        weight = files.get(name + ".weight")
        if tuple(weight.shape) != tuple(shape):
            raise ValueError(f"--source {name}.weight is {list(weight.shape)}, the base layer is {list(shape)}")
        kept = weight != 0
    return kept, layout


def strict_from_kept(kept: torch.Tensor, n: int, m: int, name: str = "layer") -> tuple[torch.Tensor, int]:
    """Apply the strictness rule; returns (strict N:M mask, number of groups completed)."""
    counts = group_view(kept.to(torch.int32), m).sum(dim=-1)
    over = torch.nonzero(counts > n).flatten()
    if over.numel():
        raise ValueError(
            f"--source {name}: {over.numel()} groups keep more than N={n} of M={m} (first groups "
            f"{over[:8].tolist()}); the checkpoint is not {n}:{m} sparse in this layer, exclude it (--exclude)"
        )
    short = int((counts < n).sum())
    if short == 0:
        return kept.clone(), 0
    # Kept slots score 1, zeros 0; top-N with the lower-index tie-break adds the lowest-index zeros.
    return topn_mask(kept.to(torch.float32), n, m), short


def masks_from_checkpoint(
    source_dir: str | os.PathLike, shapes: dict[str, tuple[int, int]], n: int, m: int
) -> tuple[dict[str, torch.Tensor], dict]:
    """Masks of every layer in ``shapes`` from the pruned checkpoint; also provenance for meta."""
    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise FileNotFoundError(f"--source {source_dir}: no such directory")
    files = WeightFiles(source_dir)
    masks: dict[str, torch.Tensor] = {}
    layouts: set[str] = set()
    completed = 0
    for name, shape in shapes.items():
        kept, layout = read_kept(files, name, shape)
        masks[name], short = strict_from_kept(kept, n, m, name)
        layouts.add(layout)
        completed += short
    files.close()
    declared = None
    config_path = source_dir / "config.json"
    if config_path.is_file():
        qc = json.loads(config_path.read_text()).get("quantization_config") or {}
        declared = (qc.get("sparsity_config") or {}).get("format")
    info = {
        "source": str(source_dir),
        "layouts": sorted(layouts),
        "declared_sparsity_format": declared,
        "completed_groups": completed,
        "completion_rule": "groups with fewer than N non-zeros are completed with their lowest-index zero slots",
    }
    return masks, info


@dataclass
class FromCheckpointOptions:
    source: str | None = field(default=None, metadata={"help": "pruned checkpoint directory to read the mask from"})


class FromCheckpointPrior:
    name = "from-checkpoint"
    needs_calibration = False
    Options = FromCheckpointOptions

    def masks(self, inputs: PriorInputs, options: FromCheckpointOptions) -> tuple[dict[str, torch.Tensor], dict]:
        if not options.source:
            raise ValueError("--method from-checkpoint needs --source (the pruned checkpoint directory)")
        shapes = {t: tuple(inputs.handle.model.get_submodule(t).weight.shape) for t in inputs.targets}
        masks, info = masks_from_checkpoint(options.source, shapes, inputs.n, inputs.m)
        return masks, {"from_checkpoint": info}
