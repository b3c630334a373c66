"""Saving and resuming training state: atomic step directories, ``latest``/``best`` pointers, keep-last-k.

Save (collective): rank 0 makes ``checkpoints/.tmp-step-NNNNNN``; every rank writes its shard
(logit slices of all layers); rank 0 gathers the shard entries, writes ``manifest.json`` last,
renames the directory into place, then moves the ``latest`` pointer and prunes old steps. A crash at
any point leaves either the previous checkpoint set or the new one, never a half-written one that
looks finished. Checkpoints live on a filesystem every rank sees (one directory per run).

Resume: the newest step directory that passes :func:`checkpoint_format.read_manifest` (sizes,
headers, tiling); a corrupt newest one is reported and the previous good one is used. Logit slices
are re-cut from the stored ranges, so the world size may change. Frozen base weights are never saved.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from maskpro_ds import distributed
from maskpro_ds.formats.atomic import TMP_PREFIX, atomic_write_text
from maskpro_ds.formats.checkpoint_format import (
    LATEST,
    MANIFEST,
    LayerEntry,
    Manifest,
    load_group_range,
    load_layer_logits,
    read_manifest,
    step_dir_name,
    write_manifest,
    write_shard,
)
from maskpro_ds.train.logit_store import LogitStore

logger = logging.getLogger(__name__)
BEST = "best"


def save_checkpoint(root: Path, store: LogitStore, *, step: int, state: dict, config: dict, base_model: dict,
                    run_id: str, keep_last: int, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Collective: every rank calls it with its own store. Returns the final step directory.

    ``extra``: per-logit tensors of this rank's slices keyed ``"<layer>/<name>"`` (an estimator's
    slice state), stored in the shard beside the logits with the layer's group range.
    """
    final = root / step_dir_name(step)
    tmp = root / f"{TMP_PREFIX}{final.name}"
    if store.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    distributed.barrier()
    slices, ranges = store.state_tensors(), store.group_ranges()
    for key, tensor in (extra or {}).items():
        slices[key], ranges[key] = tensor, ranges[key.split("/", 1)[0]]
    entry = write_shard(tmp, store.rank, store.world_size, slices, ranges, step)
    entries = _gather_objects(entry, store.world_size)
    if store.rank == 0:
        layers = [LayerEntry(name, shape, shape[0] * shape[1] // store.m) for name, shape in zip(store.names, store.shapes, strict=True)]
        write_manifest(tmp, step=step, n=store.n, m=store.m, layers=layers, shards=entries, state=state,
                       config=config, base_model=base_model, run_id=run_id)
        if final.exists():  # re-saving a step after resuming from an earlier one: the new set wins
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(root / LATEST, final.name + "\n")
        prune(root, keep_last)
    distributed.barrier()
    return final


def _gather_objects(obj: object, world_size: int) -> list:
    if world_size == 1:
        return [obj]
    import torch.distributed

    out: list = [None] * world_size
    torch.distributed.all_gather_object(out, obj)  # our own dataclasses between our own ranks
    return out


def step_dirs(root: Path) -> list[Path]:
    """Finished step directories (with a manifest), oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / MANIFEST).is_file())


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` step directories, never the one ``best`` points to."""
    best = (root / BEST).read_text().strip() if (root / BEST).is_file() else None
    dirs = step_dirs(root)
    for old in dirs[:-keep_last]:
        if old.name != best:
            shutil.rmtree(old, ignore_errors=True)


def mark_best(root: Path, step: int) -> None:
    atomic_write_text(root / BEST, step_dir_name(step) + "\n")


def find_resumable(root: Path) -> Manifest | None:
    """The newest checkpoint that passes every check, newest first; corrupt ones are reported, not deleted."""
    candidates = step_dirs(root)
    if (root / LATEST).is_file():
        pointed = root / (root / LATEST).read_text().strip()
        if pointed in candidates:  # try the pointer's target first, then everything older
            candidates = [p for p in candidates if p.name <= pointed.name]
    for step_dir in reversed(candidates):
        try:
            return read_manifest(step_dir)
        except (ValueError, FileNotFoundError, KeyError) as e:
            logger.error("checkpoint %s is unusable (%s); trying the previous one", step_dir, e)
    return None


def check_compatible(manifest: Manifest, store: LogitStore, base_fingerprint: str | None) -> None:
    """Refuse a checkpoint from another pattern, layer set or base model."""
    where = manifest.path / MANIFEST
    if (manifest.n, manifest.m) != (store.n, store.m):
        raise ValueError(f"{where}: pattern {manifest.n}:{manifest.m}, but mask.pattern is {store.n}:{store.m}")
    ours = dict(zip(store.names, store.shapes, strict=True))
    theirs = {layer.name: layer.shape for layer in manifest.layers}
    if ours != theirs:
        missing = sorted(set(ours) ^ set(theirs))[:5]
        raise ValueError(f"{where}: its masked layers differ from this run's (e.g. {missing}); "
                         "same model.path/targets/include/exclude are needed to resume")
    if base_fingerprint and manifest.base_fingerprint and manifest.base_fingerprint != base_fingerprint:
        raise ValueError(f"{where}: made for another base model (fingerprint mismatch); check model.path")


def load_logits_into(manifest: Manifest, store: LogitStore) -> None:
    """Fill this rank's slices from a checkpoint of any world size."""
    for index, name in enumerate(store.names):
        store.logits[index] = load_layer_logits(manifest, name, store.local_range(index)).to(store.device, torch.float32)


def load_extra_slices(manifest: Manifest, store: LogitStore) -> dict[str, torch.Tensor]:
    """This rank's slices of every extra per-logit tensor a checkpoint holds (see ``save_checkpoint``)."""
    first = manifest.shards[0].group_ranges if manifest.shards else {}
    out = {}
    for key in first:
        layer = key.split("/", 1)[0]
        if key != layer and layer in store.names:
            out[key] = load_group_range(manifest, key, store.local_range(store.names.index(layer)))
    return out
