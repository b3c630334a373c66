"""``hf-dense`` (formats.md §1): a plain Hugging Face model directory with the mask applied.

Weights keep the base dtype and tensor set; in masked layers pruned slots hold exactly +0.0
(``torch.where(mask, w, 0)``; ``w * mask`` would leave -0.0 where w < 0, which some vLLM versions
mishandle). Config, tokenizer and generation config are copied; any quantization or sparsity block
is dropped so every loader reads it as an ordinary dense model. This module also holds the pieces
the compressed format shares: shard naming, the index file, side-file copying, the index check.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from maskpro_ds.export.base_model import COMPRESSION_KEYS, BaseModel
from maskpro_ds.export.sinks.base import (
    CheckContext,
    ExportOptions,
    RowBlock,
    RowView,
    SinkContext,
    raw_bytes,
)
from maskpro_ds.formats.safetensors_io import (
    PlannedTensor,
    Reader,
    ShardedWriter,
    TensorInfo,
    plan_shards,
)
from maskpro_ds.models.hf_dir import INDEX_FILE


def shard_name(i: int, count: int) -> str:
    return f"model-{i + 1:05d}-of-{count:05d}.safetensors"


def open_model_writer(directory: Path, planned: list[PlannedTensor], max_shard_bytes: int | None) -> ShardedWriter:
    """Sharded ``model-XXXXX-of-YYYYY.safetensors`` files, metadata ``format: pt`` as transformers expects."""
    directory.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(planned, max_shard_bytes)
    files = {shard_name(i, len(shards)): shard for i, shard in enumerate(shards)}
    return ShardedWriter(directory, files, {"format": "pt"})


def write_index(directory: Path, writer: ShardedWriter) -> None:
    index = {"metadata": {"total_size": writer.total_size},
             "weight_map": {name: writer.weight_map[name] for name in sorted(writer.weight_map)}}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def write_config(path: Path, config: dict) -> None:
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_side_files(base: BaseModel, directory: Path, config: dict | None) -> None:
    """Copy tokenizer, generation config etc.; config.json is rewritten when ``config`` is given."""
    for file in base.side_files():
        if file.name == "config.json" and config is not None:
            write_config(directory / "config.json", config)
        else:
            shutil.copyfile(file, directory / file.name)


def dense_config(base: BaseModel) -> dict | None:
    """The base config without compression blocks, or None when it can be copied byte for byte."""
    config = base.config()
    if not any(key in config for key in COMPRESSION_KEYS):
        return None
    return {k: v for k, v in config.items() if k not in COMPRESSION_KEYS}


def check_index(label: str, model: BaseModel, report) -> None:
    """The shard index lists exactly the tensors present, with their total size."""
    index = json.loads((model.dir / INDEX_FILE).read_text())
    total = sum(t.nbytes for t in model.tensors.values())
    if index["metadata"].get("total_size") != total or set(index["weight_map"]) != set(model.tensors):
        report.fail(f"{label}: {INDEX_FILE} does not match the shard files")


class HfDenseCheck:
    """verify's view of an hf-dense directory: its weights; same tensor set as the base; a plain config."""

    authority = 3  # holds no mask of its own

    def __init__(self, ctx: CheckContext):
        self.ctx = ctx
        self.model = BaseModel(ctx.directory)

    def check_files(self, report) -> None:
        if self.ctx.base is not None:
            expected = {n: (t.dtype, t.shape) for n, t in self.ctx.base.tensors.items()}
            got = {n: (t.dtype, t.shape) for n, t in self.model.tensors.items()}
            if got != expected:
                report.fail(f"hf-dense: tensor set differs from the base (missing {sorted(set(expected) - set(got))[:4]}, "
                            f"extra {sorted(set(got) - set(expected))[:4]}, or dtype/shape changed)")
        check_index("hf-dense", self.model, report)
        bad = [k for k in COMPRESSION_KEYS if k in self.model.config()]
        if bad:
            report.fail(f"hf-dense/config.json carries {bad}; dense loaders would misread it")

    def rows(self, layer: str, r0: int, r1: int) -> RowView:
        dense = self.ctx.reader.read_rows(self.model.tensors[f"{layer}.weight"], r0, r1)
        return RowView(dense=dense, dense_label="hf-dense")

    def copied(self, name: str) -> TensorInfo | None:
        return self.model.tensors.get(name)

    def finish(self, report) -> None:
        pass


class HfDenseSink:
    """Streams a dense, masked copy of the base into ``directory``."""

    format = "hf-dense"
    needs_weights = True
    Check = HfDenseCheck

    @classmethod
    def check(cls, source, options: ExportOptions) -> None:
        pass

    def __init__(self, ctx: SinkContext):
        self.directory = ctx.directory
        self.base = ctx.base
        planned = [PlannedTensor(t.name, t.dtype, t.shape) for t in self.base.ordered()]
        self.writer = open_model_writer(self.directory, planned, ctx.options.max_shard_bytes)
        self._row_bytes = {layer: info.row_bytes for layer, info in ctx.masked.items()}

    def masked_rows(self, layer: str, block: RowBlock) -> None:
        self.writer.write(f"{layer}.weight", block.r0 * self._row_bytes[layer], raw_bytes(block.pruned_bits))

    def passthrough(self, info: TensorInfo, reader: Reader) -> None:
        self.writer.copy(info.name, reader.fd(info.path), info.start)

    def tally(self) -> dict:
        return {"written": self.writer.take_written()}

    def absorb(self, tally: dict) -> None:
        self.writer.add_written(tally["written"])

    def finish(self) -> dict:
        self.writer.close()
        write_index(self.directory, self.writer)
        copy_side_files(self.base, self.directory, dense_config(self.base))
        return {"files": len(set(self.writer.weight_map.values())), "bytes": self.writer.total_size}

    def abort(self) -> None:
        self.writer.abort()
