"""Filling an already partitioned model from its safetensors files, one tensor at a time.

Every rank reads, for each parameter, only the rows that cover the flat slice(s) it stores
(``zero_utils.stored_chunks``) with ``safe_open(...).get_slice(key)[r0:r1]``, converts them to the
model's dtype and copies them into its partition: no communication, and no process ever holds more
than one parameter's rows beyond its own partitions (at most ``numel/world + 2 rows`` at a time).
A file is opened per tensor and closed right after (mapped pages leave the RSS with the mapping).

Key matching: a parameter is looked up under each of its names (tied parameters have several, e.g.
``lm_head.weight`` and ``model.embed_tokens.weight``), first exactly, then without the model's
base-model prefix (``model.``), as base-model checkpoints store it. A parameter stored under
another layout (transformers' per-architecture conversion maps, e.g. per-expert MoE tensors that
the model fuses into one 3-D parameter) is built through :mod:`maskpro_ds.models.checkpoint_layout`
exactly as ``from_pretrained`` builds it; such a parameter is read whole (one parameter in memory)
and each rank copies its slice. A checkpoint that still does not fit fails with the missing and
unexpected keys named. Pickle (``.bin``) checkpoints are refused.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import torch

from maskpro_ds.models.checkpoint_layout import CheckpointLayout
from maskpro_ds.models.hf_dir import weight_map
from maskpro_ds.train.zero_utils import full_shape, stored_chunks

logger = logging.getLogger(__name__)


def _names_by_param(model: torch.nn.Module) -> list[tuple[torch.nn.Parameter, list[str]]]:
    """Each distinct parameter with all the names it is reachable by (tied weights share one)."""
    names: dict[int, tuple[torch.nn.Parameter, list[str]]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), (param, []))[1].append(name)
    return list(names.values())


def _candidates(name: str, prefix: str) -> list[str]:
    out = [name]
    if prefix and name.startswith(prefix + "."):
        out.append(name[len(prefix) + 1:])
    return out


def plan(model: torch.nn.Module, files: dict[str, Path], model_dir: Path,
         layout: CheckpointLayout | None = None) -> tuple[list[tuple[torch.nn.Parameter, str, Path]], list]:
    """Which file key fills which parameter, and which parameters are built by a layout conversion
    (``(param, model_key)``); raises naming every missing or unexpected key."""
    prefix = getattr(model, "base_model_prefix", "")
    jobs, converted, used, missing = [], [], set(), []
    for param, names in _names_by_param(model):
        found = [key for name in names for key in _candidates(name, prefix) if key in files]
        if not found:
            built = [name for name in names if layout is not None and name in layout]
            if built:
                converted.append((param, built[0]))
                continue
            missing.append(names[0])
            continue
        jobs.append((param, found[0], files[found[0]]))
        used.update(found)  # a tied alias saved as well is the same tensor: read one, accept the others
    if converted:
        used.update(layout.used_file_keys())
    buffers = {key for name, _ in model.named_buffers() for key in _candidates(name, prefix)}
    ignored = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    unexpected = [key for key in files if key not in used and key not in buffers
                  and not any(p.search(key) for p in ignored)]
    if missing or unexpected:
        lines = [f"{name} (a model parameter absent from the checkpoint)" for name in missing[:8]]
        lines += [f"{key} in {files[key].name} (not a parameter of this model)" for key in unexpected[:8]]
        raise ValueError(f"weights in {model_dir} do not match the model built from its config.json "
                         f"({len(missing)} missing, {len(unexpected)} unexpected; keys are matched by exact name "
                         f"or without the '{prefix}.' prefix):\n  " + "\n  ".join(lines))
    return jobs, converted


def _fill_chunk(handle, key: str, shape: tuple[int, ...], dest: torch.Tensor, start: int) -> None:
    """Copy flat elements ``[start, start + len(dest))`` of tensor ``key`` into ``dest`` (padding -> 0)."""
    numel = math.prod(shape)
    count = max(0, min(numel - start, dest.numel()))
    if count < dest.numel():
        dest[count:].zero_()
    if count == 0:
        return
    if len(shape) == 0:
        dest[:1].copy_(handle.get_tensor(key).reshape(1))
        return
    row = numel // shape[0] if shape[0] else 1
    first, last = start // row, -(-(start + count) // row)
    rows = handle.get_slice(key)[first:last].reshape(-1)
    offset = start - first * row
    dest[:count].copy_(rows[offset:offset + count])  # copy_ converts the file dtype to the model's


def load_weights(model: torch.nn.Module, model_dir: Path) -> int:
    """Fill every parameter (and any persistent buffer stored) of ``model`` from ``model_dir``.

    Works on ZeRO-3 partitioned and on plain models alike; returns the number of tensors read.
    """
    from safetensors import safe_open

    files = weight_map(model_dir)
    layout = CheckpointLayout(model, list(files))
    jobs, converted = plan(model, files, model_dir, layout)
    prefix = getattr(model, "base_model_prefix", "")
    buffer_jobs = []
    for name, buf in model.named_buffers():
        keys = [k for k in _candidates(name, prefix) if k in files]
        if keys:
            buffer_jobs.append((buf, keys[0], files[keys[0]]))
    with torch.no_grad():
        for tensor, key, path in jobs + buffer_jobs:
            # One open per tensor: the file is memory-mapped, and the pages a rank touched stay in its
            # RSS until the mapping closes, so a long-lived handle would count a shard's worth.
            with safe_open(str(path), framework="pt") as handle:
                shape = tuple(full_shape(tensor)) if isinstance(tensor, torch.nn.Parameter) else tuple(tensor.shape)
                stored = tuple(handle.get_slice(key).get_shape())
                if stored != shape:
                    raise ValueError(f"{path.name}: {key} has shape {list(stored)}, the model expects {list(shape)}")
                chunks = stored_chunks(tensor) if isinstance(tensor, torch.nn.Parameter) else [(tensor.view(-1), 0)]
                for dest, start in chunks:
                    _fill_chunk(handle, key, shape, dest, start)
        if converted:
            _fill_converted(layout, files, converted)
    logger.info("filled %d parameters and %d buffers from %s", len(jobs) + len(converted), len(buffer_jobs), model_dir)
    return len(jobs) + len(converted) + len(buffer_jobs)


def _fill_converted(layout: CheckpointLayout, files: dict[str, Path], converted: list) -> None:
    """Parameters the checkpoint stores in another layout: build each whole, copy this rank's slices."""
    from safetensors import safe_open

    def get(key: str) -> torch.Tensor:
        with safe_open(str(files[key]), framework="pt") as handle:
            return handle.get_tensor(key)

    for param, name in converted:
        full = layout.read(name, get)
        shape = tuple(full_shape(param))
        if tuple(full.shape) != shape:
            raise ValueError(f"{name}: the checkpoint builds shape {list(full.shape)}, the model expects {list(shape)}")
        flat = full.reshape(-1)
        for dest, start in stored_chunks(param):
            count = max(0, min(flat.numel() - start, dest.numel()))
            dest[count:].zero_()
            dest[:count].copy_(flat[start:start + count])
    layout.forget()
