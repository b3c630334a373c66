"""The base model directory as the exporter sees it: tensor locations, side files, checks.

A Hugging Face model directory holds either ``model.safetensors`` or shards listed by
``model.safetensors.index.json``. Only headers are read here; tensors are read later, row ranges at
a time. The base order (shard files in name order, tensors by position in each file) is the order
of the export's passes, so the base is read front to back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from maskpro_ds.formats.dtypes import FLOAT_DTYPES
from maskpro_ds.formats.hashing import WEIGHT_SUFFIXES
from maskpro_ds.formats.safetensors_io import TensorInfo, read_header
from maskpro_ds.models.hf_dir import INDEX_FILE, SINGLE_FILE, check_model_dir

# Config keys that would make a loader treat the dense export as quantized or compressed.
COMPRESSION_KEYS = ("quantization_config", "sparsity_config", "compression_config")


class BaseModel:
    """Header-level view of a base model directory; errors name the file and what to do."""

    def __init__(self, model_dir: str | os.PathLike):
        self.dir = check_model_dir(model_dir, "--base")
        self.tensors: dict[str, TensorInfo] = {}
        for file in self._weight_files():
            infos, _ = read_header(file)
            wanted = self._index_names.get(file.name) if self._index_names is not None else None
            for name, info in infos.items():
                if wanted is not None and name not in wanted:
                    continue
                if name in self.tensors:
                    raise ValueError(f"{file}: tensor {name} also in {self.tensors[name].path.name}; the base is inconsistent")
                self.tensors[name] = info
        if self._index_names is not None:
            for file_name, names in self._index_names.items():
                for name in names:
                    if name not in self.tensors:
                        raise ValueError(f"{self.dir / file_name}: has no tensor {name}, which {INDEX_FILE} places there; "
                                         "the base shard is corrupt or from another model")

    def _weight_files(self) -> list[Path]:
        index = self.dir / INDEX_FILE
        self._index_names: dict[str, set[str]] | None = None
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: not a valid safetensors index ({e})") from e
            self._index_names = {}
            for name, file_name in weight_map.items():
                self._index_names.setdefault(file_name, set()).add(name)
            files = [self.dir / f for f in sorted(self._index_names)]
            for f in files:
                if not f.is_file():
                    raise FileNotFoundError(f"{f}: missing; {INDEX_FILE} lists it. The base model download is incomplete")
            return files
        if (self.dir / SINGLE_FILE).is_file():
            return [self.dir / SINGLE_FILE]
        if any(p.name.endswith(WEIGHT_SUFFIXES) for p in self.dir.iterdir()):
            raise ValueError(f"--base {self.dir}: weights are not safetensors; re-save the model with "
                             "save_pretrained(dir, safe_serialization=True)")
        raise FileNotFoundError(f"--base {self.dir}: no {SINGLE_FILE} or {INDEX_FILE}")

    def ordered(self) -> list[TensorInfo]:
        """Tensors in base order: shard files by name, then by position in the file."""
        return sorted(self.tensors.values(), key=lambda t: (t.path.name, t.start))

    def side_files(self) -> list[Path]:
        """Config, tokenizer, generation config, licence...: every top-level non-weight file."""
        return sorted(
            p for p in self.dir.iterdir()
            if p.is_file() and not p.name.startswith(".") and not p.name.endswith(WEIGHT_SUFFIXES)
            and not p.name.endswith(".index.json")
        )

    def config(self) -> dict:
        return json.loads((self.dir / "config.json").read_text())

    def check_masked_layers(self, shapes: dict[str, tuple[int, int]], source: str) -> dict[str, TensorInfo]:
        """Each masked layer must have a floating ``<name>.weight`` of the recorded shape."""
        found = {}
        for name, shape in shapes.items():
            info = self.tensors.get(f"{name}.weight")
            if info is None:
                raise ValueError(f"{source}: masked layer {name} has no tensor {name}.weight in base {self.dir}; "
                                 "pass the base model the masks were trained on")
            if tuple(info.shape) != tuple(shape):
                raise ValueError(f"{info.path}: {name}.weight has shape {list(info.shape)}, {source} records "
                                 f"{list(shape)}; pass the base model the masks were trained on")
            if info.dtype not in FLOAT_DTYPES:
                raise ValueError(f"{info.path}: {name}.weight has dtype {info.dtype}; only {', '.join(FLOAT_DTYPES)} "
                                 "weights can be masked (dequantize the base first)")
            found[name] = info
        return found
