"""Where final masks come from, a row range at a time: a training checkpoint or a mask artifact.

From a checkpoint, a layer's mask is ``topn_mask`` over its consolidated logits viewed as
``[out, in]`` (lower column wins ties; computed by export/fused.py's block kernel). The logits of
rows ``[r0, r1)`` are the groups ``[r0 * in/M, r1 * in/M)``, read with positional reads from
whichever rank shards hold them, so the world size the run used does not matter and no layer is
ever loaded whole. From a mask artifact the packed bits of the same rows are read and unpacked.
Sources hold no open file between processes: a copy sent to an export worker opens its own.
Either source checks the content hashes its manifest records before anything is exported (one read
of every shard, several at a time).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from maskpro_ds.export.fused import BlockKernel, NanLogits
from maskpro_ds.formats.checkpoint_format import MANIFEST, read_manifest, verify_checksums
from maskpro_ds.formats.mask_artifact import MASK_FILE, read_mask_artifact
from maskpro_ds.formats.safetensors_io import Reader, TensorInfo, read_header


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
        self._reader = Reader()
        self._shard_tensors: dict[str, dict[str, TensorInfo]] = {}  # shard file -> header, read on first use

    def _tensor(self, shard_file: str, name: str) -> TensorInfo:
        if shard_file not in self._shard_tensors:
            self._shard_tensors[shard_file] = read_header(self.path / shard_file)[0]
        return self._shard_tensors[shard_file][name]

    def read_logits(self, name: str, g0: int, g1: int, kernel: BlockKernel) -> np.ndarray:
        """fp32 logits ``[g1 - g0, M]`` of groups ``[g0, g1)``: a view of the mapped shard (or a kernel
        buffer where the range spans shards), valid until the next block."""
        shards = [s for s in self.manifest.shards if max(s.group_ranges[name][0], g0) < min(s.group_ranges[name][1], g1)]
        if len(shards) == 1:  # the usual case: one rank's shard holds the block
            s0 = shards[0].group_ranges[name][0]
            info = self._tensor(shards[0].file, name)
            if info.dtype == "F32":
                raw = kernel.files.view(info.path, info.start + (g0 - s0) * self.m * 4, (g1 - g0) * self.m * 4)
                return raw.view(np.float32).reshape(g1 - g0, self.m)
        out = kernel.buffer("logits", (g1 - g0) * self.m, np.float32).reshape(g1 - g0, self.m)
        for shard in shards:
            s0, s1 = shard.group_ranges[name]
            lo, hi = max(s0, g0), min(s1, g1)
            if lo >= hi:
                continue
            info = self._tensor(shard.file, name)
            if info.dtype == "F32":
                self._reader.read_into(info.path, info.start + (lo - s0) * self.m * 4, out[lo - g0:hi - g0])
            else:  # a checkpoint written with other logit dtypes: convert
                out[lo - g0:hi - g0] = self._reader.read_rows(info, lo - s0, hi - s0).to(torch.float32).numpy()
        return out

    def block(self, name: str, r0: int, r1: int, kernel: BlockKernel, weights: np.ndarray | None) -> tuple:
        """(keep uint8 ``[r1 - r0, in]``, packed bits, the pruned ``weights`` (raw bits, flat) or None,
        fp32 logits ``[(r1 - r0) * in/M, M]``) of rows ``[r0, r1)``: one kernel pass."""
        in_f = self.shapes[name][1]
        per_row = in_f // self.m
        logits = self.read_logits(name, r0 * per_row, r1 * per_row, kernel)
        try:
            keep, packed, pruned = kernel.from_logits(logits, r1 - r0, in_f, weights)
        except NanLogits as e:
            raise ValueError(f"{self.path}: layer {name}, rows {r0}..{r1}: {e} (NaN); the checkpoint is corrupt, "
                             "use an earlier one") from e
        return keep, packed, pruned, logits

    def close(self) -> None:
        self._reader.close()


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

    def block(self, name: str, r0: int, r1: int, kernel: BlockKernel, weights: np.ndarray | None) -> tuple:
        """(keep uint8 ``[r1 - r0, in]``, packed bits as stored, the pruned ``weights`` or None, None) of
        rows ``[r0, r1)``, after checking every group is strict N:M."""
        in_f = self.shapes[name][1]
        packed = self._reader.read_rows(self.packed[name], r0, r1).numpy()
        keep = kernel.keep_from_packed(packed, in_f)
        bad = kernel.violations(keep)
        if bad:
            raise ValueError(f"{self.path}: layer {name} is not strict {self.n}:{self.m} in {bad} groups of rows "
                             f"{r0}..{r1}; refusing to export it")
        if in_f % 8:  # repack: the stored padding bits of a row's last byte are not ours to copy
            packed = kernel.pack(keep)
        return keep, packed, None if weights is None else kernel.prune(weights, keep), None

    def close(self) -> None:
        self._reader.close()
