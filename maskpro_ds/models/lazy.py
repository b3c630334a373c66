"""Open a causal LM for block-by-block work: lazily (one decoder block in memory) or eagerly.

Lazy mode builds the model from config.json with its parameters on the ``meta`` device (no memory)
and its buffers real (``accelerate.init_empty_weights(include_buffers=False)``): buffers that are
not in the checkpoint (non-persistent ones: rotary inverse frequencies, Gemma's ``embed_scale``)
are computed from the config exactly as ``from_pretrained`` computes them. It then loads from the
safetensors files what a blockwise pass needs: every tensor outside the decoder blocks up front,
and each decoder block's tensors when :meth:`ModelHandle.materialize_block` is called; after
:meth:`release_block` the block goes back to ``meta`` (its computed buffers are kept aside and put
back on the next materialise). Peak memory is one block plus the embedding plus the calibration
activations, whatever the model's size; a 70B model's blocks are read one by one from its sharded
safetensors (``model.safetensors.index.json``).

Files are read through :mod:`maskpro_ds.models.checkpoint_layout`, so checkpoints that transformers
converts at load time (per-expert MoE tensors fused into 3-D parameters, renamed modules) load the
same tensors as ``from_pretrained``. A tensor a partial forward needs but that nothing can provide
is an error naming the module (:meth:`ModelHandle.guard_top_level`). Eager mode
(``from_pretrained`` on CPU) is the fallback; both give the same masks.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from maskpro_ds.models.checkpoint_layout import CheckpointLayout
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
    layout: CheckpointLayout | None = None
    # block -> its buffers the checkpoint does not hold: name -> (value built from the config, persistent)
    computed: dict[int, dict[str, tuple[torch.Tensor, bool]]] = field(default_factory=dict)

    def materialize_block(self, index: int) -> nn.Module:
        """Make block ``index`` real (lazy: read its tensors now) and return it."""
        block = self.layers[index]
        if not self.lazy:
            return block
        assert self.files is not None and self.layout is not None
        prefix = f"{self.layers_prefix}.{index}."
        state = {}
        computed = self.computed.get(index, {})
        for key, current in block.state_dict(keep_vars=True).items():
            if key in computed:
                continue  # a buffer the checkpoint does not hold: the value built from the config, below
            if prefix + key not in self.layout:
                raise ValueError(f"{self.model_dir}: no tensor in the safetensors files makes {prefix + key}; "
                                 "the checkpoint does not match config.json (or use --load eager)")
            # Each tensor keeps the dtype the model gave it (fp32-kept modules stay fp32), as from_pretrained does.
            state[key] = self.layout.read(prefix + key, self.files.get).to(device=self.device, dtype=current.dtype)
        self.layout.forget()
        block.load_state_dict(state, assign=True)
        for name, (value, persistent) in computed.items():
            if value.is_meta:
                raise ValueError(f"{prefix}{name}: a computed buffer that config.json does not determine (it is "
                                 "not in the checkpoint and was not built with the model); use --load eager")
            owner, _, leaf = name.rpartition(".")
            block.get_submodule(owner).register_buffer(leaf, value.to(self.device), persistent=persistent)
        return block

    def release_block(self, index: int) -> None:
        """Drop block ``index``'s tensors (lazy mode); eager mode keeps the whole model."""
        if self.lazy:
            self.layers[index].to("meta")

    def weight(self, name: str) -> torch.Tensor:
        """The ORIGINAL weight of Linear ``name`` (from the files in lazy mode), in ``dtype``."""
        if self.lazy:
            assert self.files is not None and self.layout is not None
            return self.layout.read(name + ".weight", self.files.get).to(self.dtype)
        return self.model.get_submodule(name).weight.detach()

    @contextmanager
    def guard_top_level(self):
        """While active, a module outside the decoder blocks that runs with a tensor still on ``meta``
        raises a ValueError naming it (instead of torch's "Tensor on device meta" from deep inside)."""
        if not self.lazy:
            yield
            return
        hooks = [module.register_forward_pre_hook(_MetaCheck(name, self.model_dir))
                 for name, module in self.model.named_modules()
                 if not (name == self.layers_prefix or name.startswith(self.layers_prefix + "."))]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def close(self) -> None:
        if self.files is not None:
            self.files.close()


class _MetaCheck:
    """Forward pre-hook: refuse to run a module whose own parameters or buffers were never loaded."""

    def __init__(self, name: str, model_dir: Path):
        self.name, self.model_dir = name, model_dir

    def __call__(self, module: nn.Module, _args) -> None:
        missing = [n for n, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
                   if t is not None and t.is_meta]
        if missing:
            raise ValueError(
                f"{self.name or type(module).__name__} ({type(module).__name__}): {', '.join(missing)} not loaded: "
                f"absent from the safetensors files of {self.model_dir} and not computable from config.json; "
                "use --load eager")


def _load_top_level(handle: ModelHandle) -> None:
    """Lazy mode: load every tensor outside the decoder blocks; computed buffers are already real."""
    model, prefix = handle.model, handle.layers_prefix + "."
    assert handle.files is not None and handle.layout is not None
    state = {}
    for key, current in model.state_dict(keep_vars=True).items():
        if key.startswith(prefix) or key not in handle.layout:
            continue  # a block tensor (read later), or a tied weight / unused head: stays meta (guard_top_level)
        state[key] = handle.layout.read(key, handle.files.get).to(device=handle.device, dtype=current.dtype)
    handle.layout.forget()
    model.load_state_dict(state, strict=False, assign=True)
    if handle.device.type != "cpu":
        for name, buf in model.named_buffers():
            if not name.startswith(prefix) and not buf.is_meta:
                owner, _, leaf = name.rpartition(".")
                sub = model.get_submodule(owner)
                sub.register_buffer(leaf, buf.to(handle.device), persistent=leaf not in sub._non_persistent_buffers_set)


def _computed_buffers(layers: nn.ModuleList, prefix: str, layout: CheckpointLayout) -> dict:
    """Each block's buffers that the checkpoint does not hold (non-persistent ones, and persistent ones
    it omits), as built from the config; kept aside while the block is on meta."""
    out = {}
    for index, block in enumerate(layers):
        persistent = set(block.state_dict(keep_vars=True))
        out[index] = {n: (b, n in persistent) for n, b in block.named_buffers()
                      if n not in persistent or f"{prefix}.{index}.{n}" not in layout}
    return out


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
    if not lazy:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        layers_prefix, layers = decoder_layers(model)
        return ModelHandle(model=model, model_dir=model_dir, dtype=dtype, device=device, lazy=False,
                           layers_prefix=layers_prefix, layers=layers)
    from accelerate import init_empty_weights

    config = AutoConfig.from_pretrained(model_dir)
    # Parameters on meta, buffers real: computed buffers come out as from_pretrained computes them.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    files = WeightFiles(model_dir)
    layers_prefix, layers = decoder_layers(model)
    layout = CheckpointLayout(model, files.keys())
    handle = ModelHandle(model=model, model_dir=model_dir, dtype=dtype, device=device, lazy=True, files=files,
                         layers_prefix=layers_prefix, layers=layers, layout=layout,
                         computed=_computed_buffers(layers, layers_prefix, layout))
    layers.to("meta")  # blocks hold nothing until materialised
    _load_top_level(handle)
    return handle
