"""``logits`` (formats.md §4): each masked layer's consolidated logits, one tensor per layer.

``logits-XXXXX-of-YYYYY.safetensors`` hold, under the layer's name, its ``[num_groups, M]`` logits
in fp32 (exact) or fp16 (half the size; refused when a logit would overflow). ``logits_manifest.json``
records the pattern, dtype, layer shapes, base fingerprint, run id and step, and which file holds
each layer. Uses: analysis, continuing training from a learned mask, later sampling-based exports.
Whatever the world size of the run, the result is the same file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from maskpro_ds.export.st_io import PlannedTensor, ShardedWriter, plan_shards, tensor_bytes

LOGITS_FORMAT = "maskpro_ds.logits"
LOGITS_MANIFEST = "logits_manifest.json"
LOGITS_DTYPES = {"fp32": ("F32", torch.float32), "fp16": ("F16", torch.float16)}


def logits_file_name(i: int, count: int) -> str:
    return f"logits-{i + 1:05d}-of-{count:05d}.safetensors"


class LogitsSink:
    """Streams consolidated logits into ``directory``."""

    format = "logits"
    needs_weights = False

    def __init__(self, directory: Path, shapes: dict[str, tuple[int, int]], n: int, m: int, dtype: str,
                 base_fingerprint: str | None, meta: dict | None, max_shard_bytes: int | None):
        if dtype not in LOGITS_DTYPES:
            raise ValueError(f"--logits-dtype must be one of {', '.join(LOGITS_DTYPES)}; got {dtype!r}")
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.dtype_name = dtype
        st_dtype, self.dtype = LOGITS_DTYPES[dtype]
        self.m = m
        planned = [PlannedTensor(name, st_dtype, (out_f * in_f // m, m)) for name, (out_f, in_f) in shapes.items()]
        shards = plan_shards(planned, max_shard_bytes)
        files = {logits_file_name(i, len(shards)): shard for i, shard in enumerate(shards)}
        self.writer = ShardedWriter(directory, files, {"format": LOGITS_FORMAT, "pattern": f"{n}:{m}"})
        self.manifest = {
            "format": LOGITS_FORMAT,
            "version": 1,
            "pattern": f"{n}:{m}",
            "dtype": dtype,
            "layers": [{"name": name, "shape": list(shape), "num_groups": shape[0] * shape[1] // m}
                       for name, shape in shapes.items()],
            "base_fingerprint": base_fingerprint,
            **(meta or {}),
        }

    def masked_rows(self, layer: str, r0: int, pruned, mask: torch.Tensor, logits: torch.Tensor) -> None:
        out = logits.to(self.dtype)
        if self.dtype != torch.float32 and bool(torch.isinf(out).any()) and not bool(torch.isinf(logits).any()):
            raise ValueError(f"--logits-dtype {self.dtype_name}: layer {layer} has logits beyond the fp16 range; "
                             "use --logits-dtype fp32")
        groups_before = r0 * mask.shape[1] // self.m
        self.writer.write(layer, groups_before * self.m * out.element_size(), tensor_bytes(out))

    def passthrough(self, info, reader) -> None:
        pass

    def finish(self) -> dict:
        self.writer.close()
        self.manifest["weight_map"] = dict(self.writer.weight_map)
        (self.directory / LOGITS_MANIFEST).write_text(json.dumps(self.manifest, indent=2) + "\n")
        return {"bytes": self.writer.total_size, "dtype": self.dtype_name}

    def abort(self) -> None:
        self.writer.abort()
