"""The streaming export: check everything, then one pass over the base feeding every format.

Order of work (each step can refuse, and nothing is written before the pass starts):
1. open the mask source (checkpoint manifest + shard headers, or mask artifact) and the base headers;
2. every masked layer must exist in the base with the recorded shape; the base fingerprint must
   equal the one the source records (unless the caller opts out);
3. inside ``atomic_directory(out)``: one pass over the base tensors, cut into tasks (row ranges of
   the masked weights, whole unmasked tensors) that ``workers`` processes share (workers.py); the
   bytes are the same for any worker count. An unmasked tensor is copied byte for byte (in the
   kernel when it can be); a masked weight is processed in row blocks of ``chunk_elements``: the
   block's mask (and logits) from the source, a strict N:M check, the pruned weights
   ``torch.where(mask, w, 0)`` and the packed bits (fused.py), then each format writes its slice at
   its planned offset. Memory is a few blocks per worker, whatever the model size.
4. each format finishes (index, configs, manifests), ``export.json`` records the run, and with
   ``verify`` the whole export is re-read and checked before it gets its final name.

Layout: ``out/<format>/`` for every requested format, plus ``out/export.json``. The formats are
the sinks of ``sinks/registry.py``; this module knows none of them by name.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from tqdm import tqdm

from maskpro_ds.export.base_model import BaseModel
from maskpro_ds.export.manifest import EXPORT_FORMAT, EXPORT_MANIFEST
from maskpro_ds.export.sinks.base import ExportOptions, SinkContext
from maskpro_ds.export.sinks.registry import SINKS, parse_formats
from maskpro_ds.export.sources import ArtifactMasks, CheckpointMasks
from maskpro_ds.export.verify import verify_export
from maskpro_ds.export.workers import ExportJob, default_workers, plan_tasks, run_tasks
from maskpro_ds.formats.atomic import atomic_directory
from maskpro_ds.formats.checkpoint_format import MANIFEST, resolve_checkpoint
from maskpro_ds.formats.hashing import model_fingerprint
from maskpro_ds.formats.safetensors_io import parse_size

log = logging.getLogger(__name__)

BLOCK_ELEMENTS = 1 << 18  # weights per block of the pass: its buffers (1 MB of logits) stay in cache


def check_fingerprint(base: BaseModel, recorded: str | None, source: str) -> bool:
    """Refuse a base other than the one the masks were made from; False when nothing was recorded."""
    if not recorded:
        log.warning("%s records no base fingerprint; cannot check that --base %s is the right model", source, base.dir)
        return False
    actual = model_fingerprint(base.dir)
    if actual != recorded:
        raise ValueError(
            f"--base {base.dir}: fingerprint {actual[:16]}… differs from {recorded[:16]}… recorded in {source}; "
            "pass the base model the masks were made from (or --no-fingerprint-check if only the file layout changed)")
    return True


def _stream(base: BaseModel, source, masked, sinks, chunk_elements: int, workers: int, progress: bool | None) -> dict:
    """The single pass, on ``workers`` processes; returns per-layer statistics for export.json."""
    needs_weights = any(s.needs_weights for s in sinks)
    layer_of = {info.name: layer for layer, info in masked.items()}
    tensors = base.ordered() if needs_weights else [masked[layer] for layer in source.shapes]
    tasks = plan_tasks(tensors, layer_of)
    bar = tqdm(total=sum(t.nbytes for t in tasks), unit="B", unit_scale=True, unit_divisor=1024,
               desc="export", disable=None if progress is None else not progress)
    try:
        run_tasks(ExportJob(source, sinks, chunk_elements), tasks, workers, lambda task: bar.update(task.nbytes))
    finally:
        bar.close()
    # strict N:M was checked block by block, so the kept count follows from the shape
    return {layer: {"shape": [out_f, in_f], "kept": out_f * in_f // source.m * source.n}
            for layer, (out_f, in_f) in ((layer_of[t.name], t.shape) for t in tensors if t.name in layer_of)}


def run_export(source, base_dir: str | os.PathLike, out: str | os.PathLike, formats, *, max_shard_size="5GB",
               force: bool = False, logits_dtype: str = "fp32", fingerprint_check: bool = True,
               verify: bool = False, chunk_elements: int = BLOCK_ELEMENTS, workers: int | None = None,
               progress: bool | None = None) -> Path:
    """Export the masks of ``source`` (CheckpointMasks or ArtifactMasks) applied to ``base_dir``.

    ``workers``: processes for the pass (default: every core this process may use); the output
    bytes are the same for any count. ``chunk_elements``: weights per block inside a task.
    """
    formats = parse_formats(formats)
    workers = default_workers() if workers is None else workers
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"--workers must be a positive integer; got {workers!r}")
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"--out {out} already exists; pass --force to overwrite it, or choose another --out")
    options = ExportOptions(max_shard_bytes=parse_size(max_shard_size) if max_shard_size is not None else None,
                            logits_dtype=logits_dtype)
    for fmt in formats:
        SINKS[fmt].check(source, options)
    base = BaseModel(base_dir)
    masked = base.check_masked_layers(source.shapes, str(source.path))
    checked = check_fingerprint(base, source.base_fingerprint, str(source.path)) if fingerprint_check else False

    with atomic_directory(out, force=force) as tmp:
        sinks: list = []
        try:
            for fmt in formats:  # appended as made, so a failure can close the ones already open
                sinks.append(SINKS[fmt](SinkContext(tmp / fmt, base, masked, source, options)))
            stats = _stream(base, source, masked, sinks, chunk_elements, workers, progress)
            results = {sink.format: sink.finish() for sink in sinks}
        except BaseException:
            for sink in sinks:
                sink.abort()
            raise
        manifest = {
            "format": EXPORT_FORMAT,
            "version": 1,
            "formats": formats,
            "pattern": f"{source.n}:{source.m}",
            "source": {"kind": source.kind, "path": str(Path(source.path).resolve()), **source.meta},
            "base": {"path": str(base.dir.resolve()), "fingerprint": source.base_fingerprint,
                     "fingerprint_checked": checked},
            "outputs": results,
            "layers": stats,
        }
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if verify:
            report = verify_export(tmp, base_dir=base.dir, fingerprint_check=False, chunk_elements=chunk_elements)
            if not report.ok:
                raise ValueError(f"--verify: the export failed its checks; nothing was written to {out}\n{report.summary()}")
    return out


def export_checkpoint(checkpoint: str | os.PathLike, base_dir: str | os.PathLike, out: str | os.PathLike,
                      formats="hf-dense", **options) -> Path:
    """Export a training checkpoint (step dir, ``latest`` file, checkpoints/ or run dir)."""
    source = CheckpointMasks(checkpoint)
    try:
        return run_export(source, base_dir, out, formats, **options)
    finally:
        source.close()


def apply_mask(mask_dir: str | os.PathLike, base_dir: str | os.PathLike, out: str | os.PathLike,
               formats="hf-dense", **options) -> Path:
    """``apply``: a mask artifact + the base model it was made from -> ``out/<format>/`` for each format.

    The same streaming pass as a checkpoint export, with the mask read from the artifact's packed
    bits instead of top-N of logits; the artifact's base fingerprint must match ``base_dir``.
    """
    source = ArtifactMasks(mask_dir)
    try:
        return run_export(source, base_dir, out, formats, **options)
    finally:
        source.close()


def default_base(checkpoint: str | os.PathLike) -> str:
    """The base path recorded in a checkpoint manifest, for when --base is not given."""
    step_dir = resolve_checkpoint(checkpoint)
    try:
        recorded = json.loads((step_dir / MANIFEST).read_bytes()).get("base_model", {}).get("path")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{step_dir / MANIFEST}: not a checkpoint manifest ({e}); use an earlier checkpoint") from e
    if not recorded:
        raise ValueError(f"{step_dir / MANIFEST} records no base model path; pass --base MODEL_DIR")
    return recorded
