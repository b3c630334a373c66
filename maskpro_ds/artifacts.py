"""The mask artifact (docs/formats.md §2) and the base-model fingerprint.

A mask artifact is a directory holding ``masks.safetensors`` (per masked layer a uint8
``[out, ceil(in/8)]`` tensor, 1 = kept, packed little-endian along the input dim) and
``mask_manifest.json`` (pattern, layer shapes, base fingerprint, provenance). Priors, the trainer's
prior input, ``export --format mask`` and ``apply`` all read and write it through this module.

The fingerprint is sha256 over config.json's canonical JSON and each weight file's sha256, so a mask
or checkpoint can refuse a base model it was not made from.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from maskpro_ds.atomic import atomic_directory, atomic_write_text
from maskpro_ds.masks.nm import unpack_bits, validate_nm

MASK_FILE = "masks.safetensors"
MASK_MANIFEST = "mask_manifest.json"
MASK_FORMAT = "maskpro_ds.mask"
FORMAT_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def sha256_file(path: str | os.PathLike, progress: bool = False, chunk: int = 16 << 20) -> str:
    """Hex sha256 of a file, read in chunks (with a byte progress bar when ``progress``).

    The one file hasher: model fingerprints, data-source identities and the demo cache use it.
    """
    from tqdm import tqdm

    path = Path(path)
    h = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"sha256 {path.name}",
                                     disable=not progress, leave=False) as bar:
        while block := f.read(chunk):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def model_fingerprint(model_dir: str | os.PathLike, cache_file: str | os.PathLike | None = None) -> str:
    """sha256 of the model's config.json (canonical JSON) and the sha256 of every weight file.

    Hashing a 70B model reads ~140 GB (about 2 minutes). With ``cache_file`` the result is reused
    while every weight file keeps its name, size and modification time (the run directory keeps one,
    so a resume does not hash the model again).
    """
    model_dir = Path(model_dir)
    stamp = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(model_dir.iterdir())
             if p.name.endswith(WEIGHT_SUFFIXES) or p.name == "config.json"}
    key = {"dir": str(model_dir.resolve()), "files": stamp}
    if cache_file is not None and Path(cache_file).is_file():
        try:
            cached = json.loads(Path(cache_file).read_text())
            if cached.get("key") == key:
                return cached["fingerprint"]
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # unreadable cache: recompute and overwrite it
    fingerprint = _compute_fingerprint(model_dir)
    if cache_file is not None:
        atomic_write_text(cache_file, json.dumps({"key": key, "fingerprint": fingerprint}) + "\n")
    return fingerprint


def _compute_fingerprint(model_dir: Path) -> str:
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json; is this a Hugging Face model directory?")
    config = json.loads(config_path.read_text())
    # Keys that change with how the file was written, not with the weights' meaning.
    for volatile in ("_name_or_path", "transformers_version"):
        config.pop(volatile, None)
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for weight_file in sorted(p for p in model_dir.iterdir() if p.name.endswith(WEIGHT_SUFFIXES)):
        h.update(weight_file.name.encode())
        h.update(sha256_file(weight_file).encode())
    return h.hexdigest()


@dataclass
class MaskArtifact:
    """A loaded mask manifest; masks themselves are read lazily, one layer at a time."""

    path: Path
    n: int
    m: int
    shapes: dict[str, tuple[int, int]]
    base_fingerprint: str | None
    meta: dict = field(default_factory=dict)

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
    # One writer for every mask artifact: the exporter's streaming sink (sorted header metadata, so the
    # same masks always give the same bytes).
    from maskpro_ds.export.mask_format import MaskSink

    shapes = {name: (int(mask.shape[0]), int(mask.shape[1])) for name, mask in masks.items()}
    with atomic_directory(out_dir, force=force) as tmp:
        sink = MaskSink(tmp, shapes, n, m, base_fingerprint, meta)
        try:
            for name, mask in masks.items():
                sink.masked_rows(name, 0, None, mask.cpu(), None)
            sink.finish()
        except BaseException:
            sink.abort()
            raise
    return Path(out_dir)


def read_mask_artifact(path: str | os.PathLike) -> MaskArtifact:
    """Open a mask artifact directory; errors name the file and what is wrong with it."""
    path = Path(path)
    manifest_path = path / MASK_MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{path}: not a mask artifact (no {MASK_MANIFEST}); make one with tools/make_prior.py")
    if not (path / MASK_FILE).is_file():
        raise FileNotFoundError(f"{path / MASK_FILE}: missing; the mask artifact is incomplete, re-create it")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{manifest_path}: not valid JSON ({e}); re-create the artifact") from e
    if manifest.get("format") != MASK_FORMAT:
        raise ValueError(f"{manifest_path}: format is {manifest.get('format')!r}, expected {MASK_FORMAT!r}")
    from maskpro_ds.masks.nm import parse_pattern

    n, m = parse_pattern(manifest["pattern"])
    shapes = {name: (int(s[0]), int(s[1])) for name, s in manifest["layers"].items()}
    meta = {k: v for k, v in manifest.items() if k not in ("format", "version", "pattern", "layers", "base_fingerprint")}
    return MaskArtifact(path=path, n=n, m=m, shapes=shapes, base_fingerprint=manifest.get("base_fingerprint"), meta=meta)
