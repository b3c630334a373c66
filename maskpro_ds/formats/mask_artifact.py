"""The mask artifact (docs/formats.md §2): read it, and write it in one go or row block by row block.

A mask artifact is a directory holding ``masks.safetensors`` (per masked layer a uint8
``[out, ceil(in/8)]`` tensor, 1 = kept, packed little-endian along the input dim) and
``mask_manifest.json`` (pattern, layer shapes, base fingerprint, provenance, and the sha256 of
``masks.safetensors`` under ``checksums``). Priors, the trainer's prior input, ``export --format
mask`` and ``apply`` all read and write it through this module; :meth:`MaskArtifact.verify` compares
the content with its checksum.

:class:`MaskArtifactWriter` is the one writer: rows are packed and written as they come, so a 70B
mask (8.8 GB packed) never sits in memory, and the safetensors metadata keys are written sorted (the
reference writer orders them at random), so the same masks always give the same bytes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from maskpro_ds.formats.atomic import atomic_directory
from maskpro_ds.formats.hashing import sha256_file
from maskpro_ds.formats.safetensors_io import PlannedTensor, ShardedWriter, tensor_bytes
from maskpro_ds.masks.nm import pack_bits, parse_pattern, unpack_bits, validate_nm

MASK_FILE = "masks.safetensors"
MASK_MANIFEST = "mask_manifest.json"
MASK_FORMAT = "maskpro_ds.mask"
FORMAT_VERSION = 2  # 2: checksums {file: sha256}
_RESERVED = ("format", "version", "pattern", "layers", "base_fingerprint", "checksums")


@dataclass
class MaskArtifact:
    """A loaded mask manifest; masks themselves are read lazily, one layer at a time."""

    path: Path
    n: int
    m: int
    shapes: dict[str, tuple[int, int]]
    base_fingerprint: str | None
    meta: dict = field(default_factory=dict)
    checksums: dict[str, str] = field(default_factory=dict)  # empty for artifacts written before version 2

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}"

    def layer_mask(self, name: str) -> torch.Tensor:
        """The bool ``[out, in]`` mask of one layer."""
        if name not in self.shapes:
            raise KeyError(f"{self.path}: no mask for layer {name!r}")
        out_f, in_f = self.shapes[name]
        with safe_open(str(self.path / MASK_FILE), framework="pt") as f:
            packed = f.get_tensor(name)
        if tuple(packed.shape) != (out_f, (in_f + 7) // 8):
            raise ValueError(
                f"{self.path / MASK_FILE}: layer {name} has packed shape {tuple(packed.shape)}, "
                f"manifest says [{out_f}, {in_f}]; the artifact is corrupt, re-create it"
            )
        return unpack_bits(packed, in_f)

    def verify(self) -> bool:
        """Hash every file the manifest lists and compare; raise naming the file whose content changed.
        Returns False when the artifact predates checksums (nothing to compare with)."""
        for name, want in self.checksums.items():
            got = sha256_file(self.path / name)
            if got != want:
                raise ValueError(f"{self.path / name}: content changed since it was written (sha256 {got[:16]}…, "
                                 f"{MASK_MANIFEST} records {want[:16]}…); the mask artifact is corrupt, re-create it")
        return bool(self.checksums)

    def check_base(self, fingerprint: str) -> None:
        """Refuse a base model other than the one the mask was made for."""
        if self.base_fingerprint and self.base_fingerprint != fingerprint:
            raise ValueError(
                f"{self.path}: mask was made for base model fingerprint {self.base_fingerprint[:16]}…, "
                f"but the given base has {fingerprint[:16]}…; pass the base model the mask was made from"
            )


def write_mask_artifact(
    out_dir: str | os.PathLike,
    masks: dict[str, torch.Tensor],
    n: int,
    m: int,
    base_fingerprint: str | None,
    meta: dict | None = None,
    force: bool = False,
) -> Path:
    """Validate strict N:M, then write the artifact atomically. ``masks``: name -> bool [out, in]."""
    report = validate_nm(masks, n, m)
    if not report.ok:
        raise ValueError(f"refusing to write a mask artifact that is not strict N:M\n{report.summary()}")
    shapes = {name: (int(mask.shape[0]), int(mask.shape[1])) for name, mask in masks.items()}
    with atomic_directory(out_dir, force=force) as tmp:
        writer = MaskArtifactWriter(tmp, shapes, n, m, base_fingerprint, meta)
        try:
            for name, mask in masks.items():
                writer.write_rows(name, 0, mask.cpu())
            writer.finish()
        except BaseException:
            writer.abort()
            raise
    return Path(out_dir)


def read_mask_artifact(path: str | os.PathLike) -> MaskArtifact:
    """Open a mask artifact directory; errors name the file and what is wrong with it."""
    path = Path(path)
    manifest_path = path / MASK_MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{path}: not a mask artifact (no {MASK_MANIFEST}); make one with maskpro-prior (tools/make_prior.py)")
    if not (path / MASK_FILE).is_file():
        raise FileNotFoundError(f"{path / MASK_FILE}: missing; the mask artifact is incomplete, re-create it")
    try:
        manifest = json.loads(manifest_path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{manifest_path}: not valid JSON ({e}); re-create the artifact") from e
    if manifest.get("format") != MASK_FORMAT:
        raise ValueError(f"{manifest_path}: format is {manifest.get('format')!r}, expected {MASK_FORMAT!r}")
    n, m = parse_pattern(manifest["pattern"])
    shapes = {name: (int(s[0]), int(s[1])) for name, s in manifest["layers"].items()}
    meta = {k: v for k, v in manifest.items() if k not in _RESERVED}
    checksums = manifest.get("checksums") or {}
    if int(manifest.get("version", 1)) >= 2 and MASK_FILE not in checksums:
        raise ValueError(f"{manifest_path}: no checksum for {MASK_FILE} (format version {manifest.get('version')} "
                         "records one); the manifest is damaged, re-create the artifact")
    return MaskArtifact(path=path, n=n, m=m, shapes=shapes, base_fingerprint=manifest.get("base_fingerprint"),
                        meta=meta, checksums=dict(checksums))


def mask_manifest(shapes: dict[str, tuple[int, int]], n: int, m: int, base_fingerprint: str | None,
                  meta: dict | None) -> dict:
    """The content of ``mask_manifest.json``."""
    return {
        "format": MASK_FORMAT,
        "version": FORMAT_VERSION,
        "pattern": f"{n}:{m}",
        "layers": {name: list(shape) for name, shape in shapes.items()},
        "base_fingerprint": base_fingerprint,
        "kept_fraction": n / m,
        **{k: v for k, v in (meta or {}).items() if k not in _RESERVED},
    }


class MaskArtifactWriter:
    """Streams packed mask rows into ``directory/masks.safetensors``; the manifest comes last.

    ``directory`` is a fresh (temporary) directory; the caller renames it into place when done.
    """

    def __init__(self, directory: Path, shapes: dict[str, tuple[int, int]], n: int, m: int,
                 base_fingerprint: str | None, meta: dict | None):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.manifest = mask_manifest(shapes, n, m, base_fingerprint, meta)
        self._row_bytes = {name: (in_f + 7) // 8 for name, (_, in_f) in shapes.items()}
        planned = [PlannedTensor(name, "U8", (shapes[name][0], self._row_bytes[name])) for name in sorted(shapes)]
        self.writer = ShardedWriter(directory, {MASK_FILE: planned}, {"format": MASK_FORMAT, "pattern": f"{n}:{m}"})

    def write_rows(self, layer: str, r0: int, mask: torch.Tensor) -> None:
        """Rows ``[r0, r0 + len(mask))`` of ``layer``'s bool mask."""
        self.write_packed_rows(layer, r0, tensor_bytes(pack_bits(mask)))

    def write_packed_rows(self, layer: str, r0: int, packed: memoryview) -> None:
        """Whole rows of ``layer`` from row ``r0``, already packed (the bytes of nm.pack_bits rows)."""
        self.writer.write(layer, r0 * self._row_bytes[layer], packed)

    def finish(self) -> dict:
        self.writer.close()
        # One read of the finished file (rows arrive at planned offsets, in any order, so the hash
        # cannot be taken while streaming); the manifest still comes last.
        self.manifest["checksums"] = {MASK_FILE: sha256_file(self.directory / MASK_FILE)}
        (self.directory / MASK_MANIFEST).write_text(json.dumps(self.manifest, indent=2) + "\n")
        return {"bytes": self.writer.total_size}

    def abort(self) -> None:
        self.writer.abort()
