"""Saving and resuming training state: atomic step directories, ``latest``/``best`` pointers, keep-last-k.

Save (collective): rank 0 makes ``checkpoints/.tmp-step-NNNNNN``; every rank writes its shard
(logit slices of all layers, and their sha256); rank 0 gathers the shard entries, writes
``manifest.json`` last, renames the directory into place, then moves the ``latest`` pointer and
prunes old steps. A crash at any point leaves either the previous checkpoint set or the new one,
never a half-written one that looks finished. A write that fails on any rank (a full disk, a quota)
is agreed on by all ranks: the temp directory is removed, ``latest`` is left alone, and every rank
raises the same :class:`CheckpointWriteError`. Temp entries left by a killed run are removed at the
next start (:func:`clean_temporaries`). Checkpoints live on a filesystem every rank sees.

Resume: the newest step directory that passes :func:`checkpoint_format.read_manifest` (sizes,
headers, tiling) and whose shards still have their recorded sha256 (the ranks share the hashing);
a corrupt newest one is reported, naming the shard, and the previous good one is used. Logit slices
are re-cut from the stored ranges, so the world size may change. Frozen base weights are never saved.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError

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
    verify_checksums,
    write_manifest,
    write_shard,
)
from maskpro_ds.train.logit_store import LogitStore

logger = logging.getLogger(__name__)
BEST = "best"
WRITE_ERRORS = (OSError, SafetensorError)  # a full disk, a quota, a file-size limit, a vanished mount


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; raised on every rank with the same message."""


def save_checkpoint(root: Path, store: LogitStore, *, step: int, state: dict, config: dict, base_model: dict,
                    run_id: str, keep_last: int, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Collective: every rank calls it with its own store. Returns the final step directory.

    ``extra``: per-logit tensors of this rank's slices keyed ``"<layer>/<name>"`` (an estimator's
    slice state), stored in the shard beside the logits with the layer's group range.
    """
    final = root / step_dir_name(step)
    tmp = root / f"{TMP_PREFIX}{final.name}"
    world = store.world_size

    def agreed(error: str | None) -> None:
        """All ranks learn every rank's failure (the gather doubles as the barrier); all raise alike."""
        errors = [e for e in _gather_objects(error, world) if e]
        if errors:
            if store.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            pointer = root / LATEST
            kept = pointer.read_text().strip() if pointer.is_file() else "no checkpoint yet"
            raise CheckpointWriteError(
                f"checkpoint of step {step} could not be written under {root}: {'; '.join(errors)}. The partial "
                f"checkpoint was removed and {pointer} is unchanged ({kept}); free space (or lower "
                "checkpoint.keep_last), then rerun with --resume")

    error = None
    if store.rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except WRITE_ERRORS as e:
            error = f"rank 0: {e}"
    agreed(error)
    slices, ranges = store.state_tensors(), store.group_ranges()
    for key, tensor in (extra or {}).items():
        slices[key], ranges[key] = tensor, ranges[key.split("/", 1)[0]]
    entry, error = None, None
    try:
        entry = write_shard(tmp, store.rank, world, slices, ranges, step)
    except WRITE_ERRORS as e:
        error = f"rank {store.rank}: {e}"
    agreed(error)
    entries = _gather_objects(entry, world)
    error = None
    if store.rank == 0:
        try:
            layers = [LayerEntry(name, shape, shape[0] * shape[1] // store.m)
                      for name, shape in zip(store.names, store.shapes, strict=True)]
            write_manifest(tmp, step=step, n=store.n, m=store.m, layers=layers, shards=entries, state=state,
                           config=config, base_model=base_model, run_id=run_id)
            if final.exists():  # re-saving a step after resuming from an earlier one: the new set wins
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write_text(root / LATEST, final.name + "\n")
        except WRITE_ERRORS as e:
            error = f"rank 0: {e}"
    agreed(error)
    if store.rank == 0:
        prune(root, keep_last)
    distributed.barrier()
    return final


def _gather_objects(obj: object, world_size: int) -> list:
    return [obj] if world_size == 1 else distributed.all_gather_objects(obj)  # our own objects, our own ranks


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


def clean_temporaries(run_dir: Path) -> list[Path]:
    """Remove the ``.tmp-*`` entries a killed run left in the run directory, its checkpoints/ and
    ranks/ (half-written step directories, pointer and config temp files). Only the holder of the
    run directory's lock may call it: no other run can be writing them. Returns what was removed."""
    removed = []
    for folder in (run_dir, run_dir / "checkpoints", run_dir / "ranks"):
        for leftover in sorted(folder.glob(f"{TMP_PREFIX}*")) if folder.is_dir() else ():
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            removed.append(leftover)
    return removed


def _problem(step_dir: Path, rank: int, world_size: int, checksums: bool = True) -> str | None:
    """Why ``step_dir`` cannot be resumed from, as seen by this rank (None: usable). Every rank checks
    the structure; the hashing is shared, rank r taking shards r, r + R, ..."""
    try:
        manifest = read_manifest(step_dir)
        if checksums:
            verify_checksums(manifest, [s.rank for s in manifest.shards[rank::world_size]])
    except (ValueError, FileNotFoundError, KeyError, SafetensorError) as e:
        return str(e)
    return None


def find_resumable(root: Path, rank: int = 0, world_size: int = 1, checksums: bool = True) -> Manifest | None:
    """Collective: the newest checkpoint that passes every check on every rank, newest first; corrupt
    ones are reported (by rank 0, naming the file) and skipped, not deleted. ``checksums=False``
    checks the structure only (sizes, headers, tiling), without reading the shards' data."""
    candidates = step_dirs(root)
    if (root / LATEST).is_file():
        pointed = root / (root / LATEST).read_text(errors="replace").strip()
        if pointed in candidates:  # try the pointer's target first, then everything older
            candidates = [p for p in candidates if p.name <= pointed.name]
    for step_dir in reversed(candidates):
        problems = [p for p in _gather_objects(_problem(step_dir, rank, world_size, checksums), world_size) if p]
        if not problems:
            return read_manifest(step_dir)
        if rank == 0:
            logger.error("checkpoint %s is unusable (%s); trying the previous one", step_dir, "; ".join(problems))
    return None


def check_compatible(manifest: Manifest, store: LogitStore) -> None:
    """Refuse a checkpoint from another pattern or layer set (the base model, seed and data are
    compared earlier, in train/resume_checks.py, where a mismatch can be allowed explicitly)."""
    where = manifest.path / MANIFEST
    if (manifest.n, manifest.m) != (store.n, store.m):
        raise ValueError(f"{where}: pattern {manifest.n}:{manifest.m}, but mask.pattern is {store.n}:{store.m}")
    ours = dict(zip(store.names, store.shapes, strict=True))
    theirs = {layer.name: layer.shape for layer in manifest.layers}
    if ours != theirs:
        missing = sorted(set(ours) ^ set(theirs))[:5]
        raise ValueError(f"{where}: its masked layers differ from this run's (e.g. {missing}); "
                         "same model.path/targets/include/exclude are needed to resume")


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
