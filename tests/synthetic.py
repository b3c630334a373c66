"""Synthetic inputs for the exporter's tests and benchmark: a random base and a matching checkpoint.

The base is written straight to safetensors a row block at a time (a 70B-shaped layer never sits in
memory), with an index and a minimal config.json. Checkpoint logits are a pure function of
(layer, group range): each block of ``LOGIT_BLOCK`` groups has its own seed, so any world size's
shards hold the same consolidated logits and any range can be regenerated to check an export.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import torch

from maskpro_ds.export.sinks.hf_dense import open_model_writer, write_index
from maskpro_ds.formats.checkpoint_format import (
    LayerEntry,
    split_groups,
    step_dir_name,
    write_manifest,
    write_shard,
)
from maskpro_ds.formats.dtypes import TORCH_TO_ST
from maskpro_ds.formats.safetensors_io import PlannedTensor, tensor_bytes

LOGIT_BLOCK = 1 << 16


def write_random_base(model_dir: Path, tensors: list[tuple[str, tuple[int, ...], torch.dtype]], config: dict,
                      max_shard_bytes: int | None = None, seed: int = 0, block_elements: int = 1 << 22) -> Path:
    """Random N(0, 0.02) weights in sharded safetensors + index + config.json."""
    model_dir.mkdir(parents=True, exist_ok=True)
    planned = [PlannedTensor(name, TORCH_TO_ST[dtype], tuple(shape)) for name, shape, dtype in tensors]
    writer = open_model_writer(model_dir, planned, max_shard_bytes)
    gen = torch.Generator().manual_seed(seed)
    for name, shape, dtype in tensors:
        rows = shape[0] if shape else 1
        step = max(1, block_elements // max(1, math.prod(shape[1:])))
        offset = 0
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            block = (torch.randn((r1 - r0, *shape[1:]) if shape else (), generator=gen) * 0.02).to(dtype)
            data = tensor_bytes(block)
            writer.write(name, offset, data)
            offset += len(data)
    writer.close()
    write_index(model_dir, writer)
    (model_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return model_dir


def synthetic_logits(name: str, g0: int, g1: int, m: int, ties: bool = False) -> torch.Tensor:
    """Logits ``[g1 - g0, m]`` of groups ``[g0, g1)`` of layer ``name``; ``ties`` rounds to halves."""
    out = torch.empty((g1 - g0, m), dtype=torch.float32)
    blocks = range(g0 // LOGIT_BLOCK, (g1 - 1) // LOGIT_BLOCK + 1) if g1 > g0 else range(0)
    for b in blocks:
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) * 100003 + b)
        block = torch.randn((LOGIT_BLOCK, m), generator=gen)
        lo, hi = max(g0, b * LOGIT_BLOCK), min(g1, (b + 1) * LOGIT_BLOCK)
        out[lo - g0 : hi - g0] = block[lo - b * LOGIT_BLOCK : hi - b * LOGIT_BLOCK]
    return torch.round(out * 2) / 2 if ties else out


def write_synthetic_checkpoint(run_dir: Path, shapes: dict[str, tuple[int, int]], n: int, m: int, world_size: int,
                               base_model: dict, step: int = 100, run_id: str = "synthetic",
                               ties: bool = False) -> Path:
    """A checkpoint as the trainer writes it (``checkpoints/step-XXXXXX`` + ``latest``); returns the step dir."""
    ckpt_dir = run_dir / "checkpoints"
    step_dir = ckpt_dir / step_dir_name(step)
    step_dir.mkdir(parents=True, exist_ok=True)
    layers = [LayerEntry(name, shape, shape[0] * shape[1] // m) for name, shape in shapes.items()]
    align = 8 // math.gcd(8, m)  # rank boundaries on whole bytes of packed bits
    ranges = {layer.name: split_groups(layer.num_groups, world_size, align) for layer in layers}
    shards = []
    for rank in range(world_size):
        mine = {name: r[rank] for name, r in ranges.items()}
        slices = {name: synthetic_logits(name, g0, g1, m, ties) for name, (g0, g1) in mine.items()}
        shards.append(write_shard(step_dir, rank, world_size, slices, mine, step))
        del slices
    write_manifest(step_dir, step=step, n=n, m=m, layers=layers, shards=shards, state={"step": step},
                   config={}, base_model=base_model, run_id=run_id)
    (ckpt_dir / "latest").write_text(step_dir.name + "\n")
    return step_dir
