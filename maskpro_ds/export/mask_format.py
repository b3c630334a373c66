"""``mask`` (formats.md §2): the learned mask as a mask artifact, written as it streams.

Same directory layout and manifest as ``maskpro_ds.artifacts.write_mask_artifact`` (one
``masks.safetensors`` with a uint8 ``[out, ceil(in/8)]`` tensor per layer in name order, and
``mask_manifest.json``), so ``read_mask_artifact`` and ``apply`` read it. The difference: rows are
packed and written as they come, so a 70B mask (8.8 GB packed) never sits in memory, and the
safetensors metadata keys are written sorted (the reference writer orders them at random), so the
same mask always gives the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from maskpro_ds.artifacts import FORMAT_VERSION, MASK_FILE, MASK_FORMAT, MASK_MANIFEST
from maskpro_ds.export.st_io import PlannedTensor, ShardedWriter, tensor_bytes
from maskpro_ds.masks.nm import pack_bits


def mask_manifest(shapes: dict[str, tuple[int, int]], n: int, m: int, base_fingerprint: str | None,
                  meta: dict | None) -> dict:
    """The manifest ``write_mask_artifact`` writes, key for key."""
    return {
        "format": MASK_FORMAT,
        "version": FORMAT_VERSION,
        "pattern": f"{n}:{m}",
        "layers": {name: list(shape) for name, shape in shapes.items()},
        "base_fingerprint": base_fingerprint,
        "kept_fraction": n / m,
        **(meta or {}),
    }


class MaskSink:
    """Streams packed mask rows into ``directory/masks.safetensors``; the manifest comes last."""

    format = "mask"
    needs_weights = False

    def __init__(self, directory: Path, shapes: dict[str, tuple[int, int]], n: int, m: int,
                 base_fingerprint: str | None, meta: dict | None):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.manifest = mask_manifest(shapes, n, m, base_fingerprint, meta)
        self._row_bytes = {name: (in_f + 7) // 8 for name, (_, in_f) in shapes.items()}
        planned = [PlannedTensor(name, "U8", (shapes[name][0], self._row_bytes[name])) for name in sorted(shapes)]
        self.writer = ShardedWriter(directory, {MASK_FILE: planned}, {"format": MASK_FORMAT, "pattern": f"{n}:{m}"})

    def masked_rows(self, layer: str, r0: int, pruned, mask: torch.Tensor, logits) -> None:
        self.writer.write(layer, r0 * self._row_bytes[layer], tensor_bytes(pack_bits(mask)))

    def passthrough(self, info, reader) -> None:
        pass

    def finish(self) -> dict:
        self.writer.close()
        (self.directory / MASK_MANIFEST).write_text(json.dumps(self.manifest, indent=2) + "\n")
        return {"bytes": self.writer.total_size}

    def abort(self) -> None:
        self.writer.abort()
