"""Which file tensors make each model tensor: the same name, or a conversion transformers applies at load.

Most checkpoints store every tensor under its ``state_dict`` name. Some do not: transformers 5
keeps the experts of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE (and the many models that share their
tables) as fused 3-D parameters (``mlp.experts.gate_up_proj [E, 2I, H]``) while their checkpoints
hold one 2-D tensor per expert and projection (``mlp.experts.3.gate_proj.weight``), and Mixtral
also renames ``block_sparse_moe`` to ``mlp``. ``from_pretrained`` applies those conversions; our own
loaders (the lazy block loader of the priors, the ZeRO-3 partition loader of training) read the
files directly, so they read them through this map.

The map is built from transformers' own conversion table for the model
(``get_model_conversion_mapping``) with the same key matching ``from_pretrained`` uses: a file key
is renamed, then at most one converter claims it; a converter's file tensors are taken in natural
key order (expert 2 before expert 10) and its operations run as transformers runs them. So a model
loads the same tensors whichever loader reads it (tested against ``from_pretrained``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Converted:
    """Model tensors built from several file tensors by one transformers converter (e.g. a fused expert stack)."""

    converter: object  # a transformers WeightConverter
    first_target: str  # the model key the file keys were renamed to (the converter's first target)
    sources: dict[str, list[str]] = field(default_factory=dict)  # source pattern -> file keys, natural order

    def file_keys(self) -> list[str]:
        return [key for keys in self.sources.values() for key in keys]


class CheckpointLayout:
    """Model ``state_dict`` key -> the file key that holds it, or the conversion that builds it.

    ``direct[model_key] = file_key`` (usually the same string); ``converted[model_key]`` is shared by
    every model key one converter produces. ``unused`` lists file keys no model tensor reads.
    """

    def __init__(self, model: torch.nn.Module, file_keys: list[str]):
        self.model = model
        model_keys = set(model.state_dict(keep_vars=True))
        self.direct: dict[str, str] = {}
        self.converted: dict[str, Converted] = {}
        self.unused: list[str] = []
        self._last: tuple[int, dict[str, torch.Tensor]] | None = None  # one converter's output, for its siblings
        transforms = _conversions(model)
        if not transforms:
            for key in file_keys:
                if key in model_keys:
                    self.direct[key] = key
                else:
                    self.unused.append(key)
            return
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )

        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        prefix = getattr(model, "base_model_prefix", None)
        meta = dict.fromkeys(model_keys, True)  # rename_source_key only asks whether a key exists
        groups: dict[str, Converted] = {}
        for key in sorted(file_keys, key=dot_natural_key):
            target, pattern = rename_source_key(key, renamings, converters, prefix, meta)
            if target not in model_keys and key in model_keys:  # as from_pretrained: keep a name that already fits
                target, pattern = key, None
            if target not in model_keys:
                self.unused.append(key)
            elif pattern is None:
                self.direct[target] = key
            else:
                converter = next(c for c in converters if pattern in c.source_patterns)
                group = groups.setdefault(target, Converted(converter=converter, first_target=target))
                group.sources.setdefault(pattern, []).append(key)
        for group in groups.values():
            for name in _produced_names(group):
                if name in model_keys:
                    self.converted[name] = group

    def __contains__(self, model_key: str) -> bool:
        return model_key in self.direct or model_key in self.converted

    def used_file_keys(self) -> set[str]:
        used = set(self.direct.values())
        for group in self.converted.values():
            used.update(group.file_keys())
        return used

    def read(self, model_key: str, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """The full model tensor ``model_key``, read with ``get(file_key)``."""
        if model_key in self.direct:
            return get(self.direct[model_key])
        group = self.converted.get(model_key)
        if group is None:
            raise KeyError(f"no tensor in the checkpoint makes {model_key}")
        if self._last is None or self._last[0] != id(group):
            self._last = (id(group), _run(group, self.model, get))
        return self._last[1][model_key]

    def forget(self) -> None:
        """Drop the cached output of the last conversion (call when a block is done)."""
        self._last = None


def _conversions(model: torch.nn.Module) -> list:
    """transformers' conversion transforms for ``model`` (empty for a plain layout or a non-transformers module)."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return []
    from transformers.conversion_mapping import get_model_conversion_mapping

    return list(get_model_conversion_mapping(model) or [])


def _produced_names(group: Converted) -> list[str]:
    """Every model key the converter makes: each target pattern in place of the first one in ``first_target``."""
    targets = list(group.converter.target_patterns)
    head, sep, tail = group.first_target.partition(targets[0])
    if not sep:
        return [group.first_target]
    return [head + t + tail for t in targets]


def _run(group: Converted, model: torch.nn.Module, get: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply the converter's operations to its file tensors, as transformers' loader does."""
    converter = group.converter
    tensors: dict = {pattern: [get(k) for k in keys] for pattern, keys in group.sources.items()}
    for op in converter.operations:
        tensors = op.convert(tensors, source_patterns=converter.source_patterns,
                             target_patterns=converter.target_patterns, full_layer_name=group.first_target,
                             model=model, config=getattr(model, "config", None), missing_keys=None)
    head, sep, tail = "", "", ""
    for produced in tensors:
        head, sep, tail = group.first_target.partition(produced)
        if sep:
            break
    if not sep:
        raise ValueError(f"{group.first_target}: the checkpoint conversion {type(converter).__name__}"
                         f"({converter.source_patterns} -> {converter.target_patterns}) produced {list(tensors)}, "
                         "which this loader cannot place; use --load eager")
    return {head + k + tail: v for k, v in tensors.items()}


def layout_for(model: torch.nn.Module, files: dict[str, os.PathLike | Path]) -> CheckpointLayout:
    """The layout of ``model`` over the tensor names of a directory's files (``hf_dir.weight_map``)."""
    return CheckpointLayout(model, list(files))
