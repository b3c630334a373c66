"""``hf-dense`` (formats.md §1): a plain Hugging Face model directory with the mask applied.

Weights keep the base dtype and tensor set; in masked layers pruned slots hold exactly +0.0
(``torch.where(mask, w, 0)``; ``w * mask`` would leave -0.0 where w < 0, which some vLLM versions
mishandle). Config, tokenizer and generation config are copied; any quantization or sparsity block
is dropped so every loader reads it as an ordinary dense model. This module also holds the pieces
the compressed format shares: shard naming, the index file, side-file copying.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from maskpro_ds.export.base_model import COMPRESSION_KEYS, INDEX_FILE, BaseModel
from maskpro_ds.export.st_io import (
    PlannedTensor,
    Reader,
    ShardedWriter,
    TensorInfo,
    plan_shards,
    tensor_bytes,
)


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


class HfDenseSink:
    """Streams a dense, masked copy of the base into ``directory``."""

    format = "hf-dense"
    needs_weights = True

    def __init__(self, directory: Path, base: BaseModel, masked: dict[str, TensorInfo], max_shard_bytes: int | None):
        self.directory = directory
        self.base = base
        planned = [PlannedTensor(t.name, t.dtype, t.shape) for t in base.ordered()]
        self.writer = open_model_writer(directory, planned, max_shard_bytes)
        self._row_bytes = {layer: info.row_bytes for layer, info in masked.items()}

    def masked_rows(self, layer: str, r0: int, pruned: torch.Tensor, mask: torch.Tensor, logits) -> None:
        self.writer.write(f"{layer}.weight", r0 * self._row_bytes[layer], tensor_bytes(pruned))

    def passthrough(self, info: TensorInfo, reader: Reader) -> None:
        self.writer.copy(info.name, reader.fd(info.path), info.start)

    def finish(self) -> dict:
        self.writer.close()
        write_index(self.directory, self.writer)
        copy_side_files(self.base, self.directory, dense_config(self.base))
        return {"files": len(set(self.writer.weight_map.values())), "bytes": self.writer.total_size}

    def abort(self) -> None:
        self.writer.abort()
