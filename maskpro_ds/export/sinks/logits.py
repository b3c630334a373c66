"""``logits`` (formats.md §4): each masked layer's consolidated logits, one tensor per layer.

``logits-XXXXX-of-YYYYY.safetensors`` hold, under the layer's name, its ``[num_groups, M]`` logits
in fp32 (exact) or fp16 (half the size; refused when a logit would overflow). ``logits_manifest.json``
records the pattern, dtype, layer shapes, base fingerprint, run id and step, and which file holds
each layer. Uses: analysis, continuing training from a learned mask, later sampling-based exports.
Whatever the world size of the run, the result is the same file.
"""

from __future__ import annotations

import json

import numpy as np

from maskpro_ds.export.sinks.base import (
    CheckContext,
    ExportOptions,
    RowBlock,
    RowView,
    SinkContext,
    raw_bytes,
)
from maskpro_ds.formats.dtypes import TORCH_DTYPES, TORCH_TO_ST
from maskpro_ds.formats.safetensors_io import (
    PlannedTensor,
    ShardedWriter,
    TensorInfo,
    plan_shards,
    read_header,
)
from maskpro_ds.masks.nm import topn_mask

LOGITS_FORMAT = "maskpro_ds.logits"
LOGITS_MANIFEST = "logits_manifest.json"
LOGITS_DTYPES = ("fp32", "fp16")  # names from formats.dtypes


def logits_file_name(i: int, count: int) -> str:
    return f"logits-{i + 1:05d}-of-{count:05d}.safetensors"


class LogitsCheck:
    """verify's view of the logits format: top-N of the exported logits is a mask."""

    authority = 1

    def __init__(self, ctx: CheckContext):
        self.ctx = ctx
        manifest = json.loads((ctx.directory / LOGITS_MANIFEST).read_text())
        self.tensors: dict[str, TensorInfo] = {}
        for file_name in sorted(set(manifest["weight_map"].values())):
            infos, _ = read_header(ctx.directory / file_name)
            self.tensors.update(infos)

    def check_files(self, report) -> None:
        pass

    def rows(self, layer: str, r0: int, r1: int) -> RowView:
        in_f, m = self.ctx.shapes[layer][1], self.ctx.m
        logits = self.ctx.reader.read_rows(self.tensors[layer], r0 * in_f // m, r1 * in_f // m)
        mask = topn_mask(logits.float().reshape(r1 - r0, in_f), self.ctx.n, m)
        return RowView(mask=mask, mask_label=f"top-{self.ctx.n} of the exported logits")

    def copied(self, name: str):
        return None

    def finish(self, report) -> None:
        pass


class LogitsSink:
    """Streams consolidated logits into the format directory."""

    format = "logits"
    needs_weights = False
    Check = LogitsCheck

    @classmethod
    def check(cls, source, options: ExportOptions) -> None:
        if not source.has_logits:
            raise ValueError(f"--format logits: {source.path} is a mask artifact and holds no logits; "
                             "export logits from a checkpoint")
        if options.logits_dtype not in LOGITS_DTYPES:
            raise ValueError(f"--logits-dtype must be one of {', '.join(LOGITS_DTYPES)}; got {options.logits_dtype!r}")

    def __init__(self, ctx: SinkContext):
        src, dtype = ctx.source, ctx.options.logits_dtype
        self.check(src, ctx.options)
        shapes, n, m = src.shapes, src.n, src.m
        directory = ctx.directory
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.dtype_name = dtype
        self.dtype = TORCH_DTYPES[dtype]
        self.np_dtype = np.dtype(str(self.dtype).removeprefix("torch."))  # float32 or float16
        st_dtype = TORCH_TO_ST[self.dtype]
        self.m = m
        planned = [PlannedTensor(name, st_dtype, (out_f * in_f // m, m)) for name, (out_f, in_f) in shapes.items()]
        shards = plan_shards(planned, ctx.options.max_shard_bytes)
        files = {logits_file_name(i, len(shards)): shard for i, shard in enumerate(shards)}
        self.writer = ShardedWriter(directory, files, {"format": LOGITS_FORMAT, "pattern": f"{n}:{m}"})
        self.manifest = {
            "format": LOGITS_FORMAT,
            "version": 1,
            "pattern": f"{n}:{m}",
            "dtype": dtype,
            "layers": [{"name": name, "shape": list(shape), "num_groups": shape[0] * shape[1] // m}
                       for name, shape in shapes.items()],
            "base_fingerprint": src.base_fingerprint,
            **(src.meta or {}),
        }

    def masked_rows(self, layer: str, block: RowBlock) -> None:
        logits = block.logits_f32
        out = logits.astype(self.np_dtype, copy=False)
        if out is not logits and np.isinf(out).any() and not np.isinf(logits).any():
            raise ValueError(f"--logits-dtype {self.dtype_name}: layer {layer} has logits beyond the fp16 range; "
                             "use --logits-dtype fp32")
        groups_before = block.r0 * block.keep.shape[1] // self.m
        self.writer.write(layer, groups_before * self.m * out.itemsize, raw_bytes(out))

    def passthrough(self, info, reader) -> None:
        pass

    def tally(self) -> dict:
        return {"written": self.writer.take_written()}

    def absorb(self, tally: dict) -> None:
        self.writer.add_written(tally["written"])

    def finish(self) -> dict:
        self.writer.close()
        self.manifest["weight_map"] = dict(self.writer.weight_map)
        (self.directory / LOGITS_MANIFEST).write_text(json.dumps(self.manifest, indent=2) + "\n")
        return {"bytes": self.writer.total_size, "dtype": self.dtype_name}

    def abort(self) -> None:
        self.writer.abort()
