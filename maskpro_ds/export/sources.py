"""Where final masks come from, a row range at a time: a training checkpoint or a mask artifact.

From a checkpoint, a layer's mask is ``topn_mask`` over its consolidated logits viewed as
``[out, in]`` (lower column wins ties). The logits of rows ``[r0, r1)`` are the groups
``[r0 * in/M, r1 * in/M)``, read from whichever rank shards hold them, so the world size the run
used does not matter and no layer is ever loaded whole. From a mask artifact the packed bits of the
same rows are read and unpacked. Either source checks the content hashes its manifest records before
anything is exported (one read of every shard, several at a time).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from maskpro_ds.formats.checkpoint_format import MANIFEST, load_layer_logits, read_manifest, verify_checksums
from maskpro_ds.formats.mask_artifact import MASK_FILE, read_mask_artifact
from maskpro_ds.formats.safetensors_io import Reader, read_header
from maskpro_ds.masks.nm import topn_mask, unpack_bits


class CheckpointMasks:
    """Masks (and the logits behind them) of a training checkpoint."""

    has_logits = True
    kind = "checkpoint"

    def __init__(self, checkpoint: str | os.PathLike):
        self.manifest = read_manifest(checkpoint)  # checks every shard's size and header
        verify_checksums(self.manifest)  # and its content
        self.path = self.manifest.path
        self.n, self.m = self.manifest.n, self.manifest.m
        self.shapes: dict[str, tuple[int, int]] = {}
        for layer in self.manifest.layers:
            out_f, in_f = layer.shape
            if in_f % self.m or layer.num_groups * self.m != out_f * in_f:
                raise ValueError(f"{self.path / MANIFEST}: layer {layer.name} of shape {list(layer.shape)} cannot hold "
                                 f"{layer.num_groups} groups of {self.m}; the manifest is corrupt")
            self.shapes[layer.name] = layer.shape
        self.base_fingerprint = self.manifest.base_fingerprint
        self.meta = {"run_id": self.manifest.run_id, "step": self.manifest.step}

    def rows(self, name: str, r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(bool mask ``[r1 - r0, in]``, fp32 logits ``[(r1 - r0) * in/M, M]``) of rows ``[r0, r1)``."""
        in_f = self.shapes[name][1]
        per_row = in_f // self.m
        logits = load_layer_logits(self.manifest, name, (r0 * per_row, r1 * per_row))
        try:
            mask = topn_mask(logits.reshape(r1 - r0, in_f), self.n, self.m)
        except ValueError as e:
            raise ValueError(f"{self.path}: layer {name}, rows {r0}..{r1}: {e}; the checkpoint is corrupt, "
                             "use an earlier one") from e
        return mask, logits

    def close(self) -> None:
        pass


class ArtifactMasks:
    """Masks of a mask artifact directory (``masks.safetensors`` + ``mask_manifest.json``)."""

    has_logits = False
    kind = "mask"

    def __init__(self, path: str | os.PathLike):
        self.artifact = read_mask_artifact(path)
        self.artifact.verify()
        self.path = Path(path)
        self.n, self.m = self.artifact.n, self.artifact.m
        self.shapes = dict(self.artifact.shapes)
        self.base_fingerprint = self.artifact.base_fingerprint
        self.meta = {k: v for k, v in self.artifact.meta.items() if k in ("run_id", "step")}
        self.packed, _ = read_header(self.path / MASK_FILE)
        for name, (out_f, in_f) in self.shapes.items():
            info = self.packed.get(name)
            if info is None:
                raise ValueError(f"{self.path / MASK_FILE}: no mask for layer {name} listed in the manifest; re-create the artifact")
            if info.dtype != "U8" or info.shape != (out_f, (in_f + 7) // 8):
                raise ValueError(f"{self.path / MASK_FILE}: layer {name} is {info.dtype} {list(info.shape)}, expected "
                                 f"U8 [{out_f}, {(in_f + 7) // 8}]; the artifact is corrupt, re-create it")
        self._reader = Reader()

    def rows(self, name: str, r0: int, r1: int) -> tuple[torch.Tensor, None]:
        in_f = self.shapes[name][1]
        return unpack_bits(self._reader.read_rows(self.packed[name], r0, r1), in_f), None

    def close(self) -> None:
        self._reader.close()
