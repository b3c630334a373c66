"""The on-disk checkpoint format: a manifest plus one logit shard per rank (docs/formats.md §5).

```
<run>/checkpoints/step-000100/manifest.json
<run>/checkpoints/step-000100/shard-00000-of-00002.safetensors   # rank 0's group slices, fp32 [g, M]
<run>/checkpoints/latest                                         # text: "step-000100"
```
Each shard holds, for every masked layer, the logits of the rank's contiguous group range
``[g0, g1)`` under the layer's name. The manifest lists layers (name, shape, groups), shards (file,
rank, byte size, sha256 of the content, ranges per layer), the trainer state and the resolved
config. This module only reads and checks that format; the trainer (checkpoint.py) and the exporter
build on it, and any world size can be read back because ranges are stored, not recomputed.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from maskpro_ds.formats.hashing import sha256_file, sha256_files

CHECKPOINT_FORMAT = "maskpro_ds.checkpoint"
FORMAT_VERSION = 2  # 2: every shard entry carries the sha256 of its file
MANIFEST = "manifest.json"
LATEST = "latest"
# What a pointer file (latest, best) holds: one line naming a sibling step directory.
_POINTER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_POINTER_MAX_BYTES = 256


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def shard_file_name(rank: int, world_size: int) -> str:
    return f"shard-{rank:05d}-of-{world_size:05d}.safetensors"


def split_groups(num_groups: int, world_size: int, align: int = 1) -> list[tuple[int, int]]:
    """Contiguous, near-equal group ranges for each rank; boundaries are multiples of ``align``.

    ``align`` keeps every boundary on a whole byte of packed bits (align = 8 / gcd(8, M) groups),
    so a rank's slice of a layer packs to bytes without straddling a neighbour's.
    """
    units = -(-num_groups // align)  # ceil
    ranges = []
    for r in range(world_size):
        start = min(num_groups, (units * r // world_size) * align)
        end = min(num_groups, (units * (r + 1) // world_size) * align)
        ranges.append((start, end))
    return ranges


@dataclass
class LayerEntry:
    name: str
    shape: tuple[int, int]
    num_groups: int


@dataclass
class ShardEntry:
    rank: int
    file: str
    bytes: int
    group_ranges: dict[str, tuple[int, int]]
    sha256: str | None = None  # None only in version-1 checkpoints


@dataclass
class Manifest:
    """A parsed, checked checkpoint manifest."""

    path: Path  # the step directory
    step: int
    world_size: int
    n: int
    m: int
    layers: list[LayerEntry]
    shards: list[ShardEntry]
    state: dict
    config: dict
    base_fingerprint: str | None
    run_id: str
    version: int = FORMAT_VERSION

    def layer(self, name: str) -> LayerEntry:
        for entry in self.layers:
            if entry.name == name:
                return entry
        raise KeyError(f"{self.path / MANIFEST}: no layer {name!r}")


def read_pointer(pointer: Path) -> Path:
    """The step directory a pointer file (``latest``, ``best``) names; any other file is refused.

    A pointer is one short line naming a sibling directory. Anything else (a config.json, a shard,
    a text file) is not read as a path: the error says what was expected instead.
    """
    def not_a_pointer(why: str) -> ValueError:
        return ValueError(f"{pointer} is a file but not a checkpoint pointer ({why}); pass a step directory "
                          f"(step-NNNNNN), a checkpoints/ or run directory, or a `{LATEST}`/`best` file "
                          "holding one line that names a step directory")

    if pointer.stat().st_size > _POINTER_MAX_BYTES:
        raise not_a_pointer(f"{pointer.stat().st_size} bytes; a pointer is one short line")
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        raise not_a_pointer("not UTF-8 text") from None
    if not _POINTER.fullmatch(name):
        raise not_a_pointer("its content is not the name of a step directory")
    target = pointer.parent / name
    if not (target / MANIFEST).is_file():
        raise FileNotFoundError(f"{pointer} points to {target}, which has no {MANIFEST}")
    return target


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Accept a step directory, a pointer file (``latest``, ``best``), or a checkpoints/ or run directory."""
    path = Path(path)
    if path.is_file():
        return read_pointer(path)
    if (path / MANIFEST).is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    for pointer in (path / LATEST, path / "checkpoints" / LATEST):
        if pointer.is_file():
            return read_pointer(pointer)
    raise FileNotFoundError(f"{path}: no checkpoint here (expected {MANIFEST}, or a {LATEST} pointer)")


def read_manifest(path: str | os.PathLike, check_files: bool = True) -> Manifest:
    """Parse and check a manifest; with ``check_files`` every shard must exist with its recorded size
    and its safetensors header must list exactly the manifest's layers with the recorded shapes."""
    step_dir = resolve_checkpoint(path)
    manifest_path = step_dir / MANIFEST
    try:
        raw = json.loads(manifest_path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{manifest_path}: not valid JSON ({e}); use an earlier checkpoint") from e
    if raw.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{manifest_path}: format {raw.get('format')!r} is not {CHECKPOINT_FORMAT!r}")
    from maskpro_ds.masks.nm import parse_pattern

    n, m = parse_pattern(raw["pattern"])
    layers = [LayerEntry(e["name"], (int(e["shape"][0]), int(e["shape"][1])), int(e["num_groups"])) for e in raw["layers"]]
    shards = [
        ShardEntry(int(s["rank"]), s["file"], int(s["bytes"]), {k: (int(v[0]), int(v[1])) for k, v in s["group_ranges"].items()},
                   s.get("sha256"))
        for s in raw["shards"]
    ]
    manifest = Manifest(
        path=step_dir, step=int(raw["step"]), world_size=int(raw["world_size"]), n=n, m=m, layers=layers,
        shards=sorted(shards, key=lambda s: s.rank), state=raw.get("state", {}), config=raw.get("config", {}),
        base_fingerprint=raw.get("base_model", {}).get("fingerprint"), run_id=raw.get("run_id", ""),
        version=int(raw.get("version", 1)),
    )
    _check_tiling(manifest, manifest_path)
    if manifest.version >= 2 and any(not s.sha256 for s in manifest.shards):
        raise ValueError(f"{manifest_path}: a shard entry has no sha256 (format version {manifest.version} "
                         "records one for every shard); the manifest is damaged, use an earlier checkpoint")
    if check_files:
        for shard in manifest.shards:
            _check_shard_file(manifest, shard)
    return manifest


def verify_checksums(manifest: Manifest, ranks: list[int] | None = None, workers: int | None = None) -> bool:
    """Hash the shards of ``ranks`` (all when None) and compare with the manifest; raise naming the
    first shard whose content changed. Returns False when the checkpoint predates checksums."""
    shards = [s for s in manifest.shards if ranks is None or s.rank in ranks]
    if manifest.version < 2:
        return False
    digests = sha256_files([manifest.path / s.file for s in shards], workers)
    for shard, digest in zip(shards, digests, strict=True):
        if digest != shard.sha256:
            raise ValueError(f"{manifest.path / shard.file}: content changed since it was written (sha256 "
                             f"{digest[:16]}…, {MANIFEST} records {shard.sha256[:16]}…); the shard is corrupt, "
                             "use an earlier checkpoint")
    return True


def _check_tiling(manifest: Manifest, manifest_path: Path) -> None:
    if len(manifest.shards) != manifest.world_size:
        raise ValueError(f"{manifest_path}: lists {len(manifest.shards)} shards for world size {manifest.world_size}")
    for layer in manifest.layers:
        ranges = sorted(s.group_ranges[layer.name] for s in manifest.shards)
        cursor = 0
        for g0, g1 in ranges:
            if g0 != cursor or g1 < g0:
                raise ValueError(f"{manifest_path}: group ranges of {layer.name} do not tile [0, {layer.num_groups})")
            cursor = g1
        if cursor != layer.num_groups:
            raise ValueError(f"{manifest_path}: group ranges of {layer.name} cover {cursor} of {layer.num_groups} groups")


def _check_shard_file(manifest: Manifest, shard: ShardEntry) -> None:
    file = manifest.path / shard.file
    if not file.is_file():
        raise FileNotFoundError(f"{file}: shard of rank {shard.rank} is missing; the checkpoint is incomplete, use an earlier one")
    size = file.stat().st_size
    if size != shard.bytes:
        raise ValueError(f"{file}: {size} bytes, manifest records {shard.bytes}; the shard is truncated or corrupt")
    try:
        with safe_open(str(file), framework="pt") as f:
            keys = set(f.keys())
            for layer in manifest.layers:
                if layer.name not in keys:
                    raise ValueError(f"{file}: no tensor for layer {layer.name}; the shard does not match the manifest")
                g0, g1 = shard.group_ranges[layer.name]
                shape = tuple(f.get_slice(layer.name).get_shape())
                if shape != (g1 - g0, manifest.m):
                    raise ValueError(f"{file}: {layer.name} has shape {shape}, manifest says ({g1 - g0}, {manifest.m})")
    except SafetensorError as e:
        raise ValueError(f"{file}: unreadable safetensors ({e}); the shard is corrupt, use an earlier checkpoint") from e


def load_layer_logits(manifest: Manifest, name: str, groups: tuple[int, int] | None = None) -> torch.Tensor:
    """Logits ``[g1 - g0, M]`` (fp32) of one layer over a group range, read from whichever shards hold it.

    Reads only the overlapping slices (safetensors ``get_slice``), so consolidating a layer, or
    re-cutting it for another world size, never loads more than that range.
    """
    layer = manifest.layer(name)
    g0, g1 = groups if groups is not None else (0, layer.num_groups)
    out = torch.empty((g1 - g0, manifest.m), dtype=torch.float32)
    for shard in manifest.shards:
        s0, s1 = shard.group_ranges[name]
        lo, hi = max(s0, g0), min(s1, g1)
        if lo >= hi:
            continue
        with safe_open(str(manifest.path / shard.file), framework="pt") as f:
            out[lo - g0 : hi - g0] = f.get_slice(name)[lo - s0 : hi - s0].to(torch.float32)
    return out


def load_group_range(manifest: Manifest, key: str, groups: tuple[int, int]) -> torch.Tensor:
    """An extra per-logit tensor ``"<layer>/<name>"`` over groups ``[g0, g1)`` (stored with the layer's
    ranges, any trailing shape and dtype), read from whichever shards hold it."""
    g0, g1 = groups
    pieces = []
    for shard in sorted(manifest.shards, key=lambda sh: sh.group_ranges[key][0]):
        s0, s1 = shard.group_ranges[key]
        lo, hi = max(s0, g0), min(s1, g1)
        if lo < hi:
            with safe_open(str(manifest.path / shard.file), framework="pt") as f:
                pieces.append(f.get_slice(key)[lo - s0 : hi - s0])
    if not pieces:
        raise ValueError(f"{manifest.path / MANIFEST}: no shard holds groups {g0}..{g1} of {key}")
    return torch.cat(pieces)


def write_shard(step_dir: Path, rank: int, world_size: int, slices: dict[str, torch.Tensor],
                group_ranges: dict[str, tuple[int, int]], step: int) -> ShardEntry:
    """Write one rank's logit slices (``name -> [g1 - g0, M]``) into ``step_dir``; returns its entry.

    The tensors are written one at a time (a strided view, e.g. the logit store's ``[g, M]`` view of
    its column storage, is made contiguous one layer at a time, never the whole shard at once), and
    the file is fsynced. The sha256 is taken by reading the file back once (from the page cache,
    right after the write): it costs one pass over the shard, and never a second copy of it in memory.
    """
    from maskpro_ds.formats.dtypes import TORCH_TO_ST
    from maskpro_ds.formats.safetensors_io import PlannedTensor, ShardedWriter, tensor_bytes

    file = shard_file_name(rank, world_size)
    planned = [PlannedTensor(name, TORCH_TO_ST[t.dtype], tuple(t.shape)) for name, t in slices.items()]
    writer = ShardedWriter(step_dir, {file: planned}, {"format": CHECKPOINT_FORMAT, "rank": str(rank),
                                                       "world_size": str(world_size), "step": str(step)})
    try:
        for name, t in slices.items():
            writer.write(name, 0, tensor_bytes(t.detach().cpu()))
        writer.close()  # checks every byte was written, then fsyncs
    except BaseException:
        writer.abort()
        raise
    return ShardEntry(rank=rank, file=file, bytes=(step_dir / file).stat().st_size, group_ranges=dict(group_ranges),
                      sha256=sha256_file(step_dir / file))


def write_manifest(step_dir: Path, *, step: int, n: int, m: int, layers: list[LayerEntry], shards: list[ShardEntry],
                   state: dict, config: dict, base_model: dict, run_id: str) -> None:
    """Write ``manifest.json`` last: a step directory without it is never treated as a checkpoint."""
    raw = {
        "format": CHECKPOINT_FORMAT,
        "version": FORMAT_VERSION,
        "step": step,
        "world_size": len(shards),
        "pattern": f"{n}:{m}",
        "run_id": run_id,
        "base_model": base_model,
        "layers": [{"name": e.name, "shape": list(e.shape), "num_groups": e.num_groups} for e in layers],
        "shards": [{"rank": s.rank, "file": s.file, "bytes": s.bytes, "sha256": s.sha256,
                    "group_ranges": {k: list(v) for k, v in s.group_ranges.items()}}
                   for s in sorted(shards, key=lambda s: s.rank)],
        "state": state,
        "config": config,
    }
    (step_dir / MANIFEST).write_text(json.dumps(raw, indent=1) + "\n")
