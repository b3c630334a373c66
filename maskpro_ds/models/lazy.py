"""Open a causal LM for block-by-block work: lazily (one decoder block in memory) or eagerly.

Lazy mode builds the model on the ``meta`` device from config.json (no memory), then loads from the
safetensors files only what a blockwise pass needs: the embedding and the rotary tables up front,
and each decoder block's tensors when :meth:`ModelHandle.materialize_block` is called; after
:meth:`release_block` the block goes back to ``meta``. Peak memory is one block plus the
embedding plus the calibration activations, whatever the model's size; a 70B model's blocks are
read one by one from its sharded safetensors (``model.safetensors.index.json``).

Lazy mode expects checkpoint keys equal to the module's ``state_dict`` keys (true for the Llama
family written by ``save_pretrained``) and rotary position tables in ``model.rotary_emb``. Eager
mode (``from_pretrained`` on CPU) is the fallback for anything else; both give the same masks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from maskpro_ds.models.hf_dir import check_model_dir, weight_map
from maskpro_ds.models.targets import decoder_layers


class WeightFiles:
    """Tensors by name from a directory's safetensors files (:func:`maskpro_ds.models.hf_dir.weight_map`)."""

    def __init__(self, model_dir: str | os.PathLike):
        self.model_dir = Path(model_dir)
        self._where = weight_map(self.model_dir)
        self._handles: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(f"{self.model_dir}: no tensor {name!r} in the safetensors files")
        path = self._where[name]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path].get_tensor(name)

    def close(self) -> None:
        self._handles.clear()


@dataclass
class ModelHandle:
    """A causal LM plus the bookkeeping to hold only one decoder block at a time (in lazy mode)."""

    model: nn.Module
    model_dir: Path
    dtype: torch.dtype
    device: torch.device
    lazy: bool
    files: WeightFiles | None = None
    layers_prefix: str = ""
    layers: nn.ModuleList = field(default_factory=nn.ModuleList)

    def materialize_block(self, index: int) -> nn.Module:
        """Make block ``index`` real (lazy: read its tensors now) and return it."""
        block = self.layers[index]
        if not self.lazy:
            return block
        assert self.files is not None
        prefix = f"{self.layers_prefix}.{index}."
        non_persistent = {n for n, _ in block.named_buffers()} - set(block.state_dict())
        if non_persistent:
            raise ValueError(
                f"{prefix}: block has computed buffers {sorted(non_persistent)} that lazy loading cannot "
                "rebuild; use --load eager"
            )
        state = {}
        for key in block.state_dict():
            state[key] = self.files.get(prefix + key).to(device=self.device, dtype=self.dtype)
        block.load_state_dict(state, assign=True)
        return block

    def release_block(self, index: int) -> None:
        """Drop block ``index``'s tensors (lazy mode); eager mode keeps the whole model."""
        if self.lazy:
            self.layers[index].to("meta")

    def weight(self, name: str) -> torch.Tensor:
        """The ORIGINAL weight of Linear ``name`` (from the files in lazy mode), in ``dtype``."""
        if self.lazy:
            assert self.files is not None
            return self.files.get(name + ".weight").to(self.dtype)
        return self.model.get_submodule(name).weight.detach()

    def close(self) -> None:
        if self.files is not None:
            self.files.close()


def _load_top_level(model: nn.Module, files: WeightFiles, layers_prefix: str, dtype, device) -> None:
    """Lazy mode: load every tensor outside the decoder blocks, rebuild the rotary tables."""
    inner = getattr(model, "model", None)
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is not None:
        # inv_freq is a computed (non-persistent) buffer: build the module again on a real device.
        with torch.device(device):
            inner.rotary_emb = type(rotary)(config=model.config)
    state = {}
    for key in model.state_dict():
        if key.startswith(layers_prefix + ".") or ".rotary_emb." in key:
            continue
        if key in files:
            state[key] = files.get(key).to(device=device, dtype=dtype)
        # A key absent from the files is a tied weight (lm_head) or unused by a blockwise pass: it stays meta.
    model.load_state_dict(state, strict=False, assign=True)


def open_causal_lm(
    model_dir: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    lazy: bool = True,
    device: str | torch.device = "cpu",
) -> ModelHandle:
    """Open ``model_dir`` for blockwise passes (see the module docstring for lazy vs eager)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = check_model_dir(model_dir, "--model")
    device = torch.device(device)
    if lazy:
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        files = WeightFiles(model_dir)
        layers_prefix, layers = decoder_layers(model)
        _load_top_level(model, files, layers_prefix, dtype, device)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
        files = None
        layers_prefix, layers = decoder_layers(model)
    model.eval()
    return ModelHandle(
        model=model, model_dir=model_dir, dtype=dtype, device=device, lazy=lazy, files=files,
        layers_prefix=layers_prefix, layers=layers,
    )
