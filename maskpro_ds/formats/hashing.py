"""The file hasher and the base-model fingerprint.

``sha256_file`` is the one file hasher: model fingerprints, data-source identities, the demo cache
and the content checksums of checkpoint shards and mask artifacts use it (``sha256_files`` hashes
several files on threads: hashlib releases the GIL). The fingerprint is sha256 over config.json's canonical JSON and each weight file's
sha256, so a mask, a checkpoint or an export can refuse a base model it was not made from.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from maskpro_ds.formats.atomic import atomic_write_text

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


def sha256_files(paths: list[Path], workers: int | None = None) -> list[str]:
    """Hex sha256 of each file, in order, several at a time (hashlib releases the GIL while it hashes)."""
    if len(paths) <= 1:
        return [sha256_file(p) for p in paths]
    workers = workers or min(8, len(paths), os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(sha256_file, paths))


def _cache_key(model_dir: Path) -> dict:
    stamp = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(model_dir.iterdir())
             if p.name.endswith(WEIGHT_SUFFIXES) or p.name == "config.json"}
    return {"dir": str(model_dir.resolve()), "files": stamp}


def model_fingerprint(model_dir: str | os.PathLike, cache_file: str | os.PathLike | None = None,
                      write_cache: bool = True) -> str:
    """sha256 of the model's config.json (canonical JSON) and the sha256 of every weight file.

    Hashing a 70B model reads ~140 GB (about 2 minutes). With ``cache_file`` the result is reused
    while every weight file keeps its name, size and modification time (the run directory keeps one,
    so a resume does not hash the model again). ``write_cache=False`` only reads the cache: the
    trainer writes it (:func:`save_fingerprint_cache`) once the run has passed its checks, so a
    refused run leaves the run directory as it was.
    """
    model_dir = Path(model_dir)
    key = _cache_key(model_dir)
    if cache_file is not None and Path(cache_file).is_file():
        try:
            cached = json.loads(Path(cache_file).read_text())
            if cached.get("key") == key:
                return cached["fingerprint"]
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # unreadable cache: recompute and overwrite it
    fingerprint = _compute_fingerprint(model_dir)
    if cache_file is not None and write_cache:
        save_fingerprint_cache(model_dir, cache_file, fingerprint)
    return fingerprint


def save_fingerprint_cache(model_dir: str | os.PathLike, cache_file: str | os.PathLike, fingerprint: str) -> None:
    """Record ``fingerprint`` for the model's current files (names, sizes, modification times)."""
    key = _cache_key(Path(model_dir))
    atomic_write_text(cache_file, json.dumps({"key": key, "fingerprint": fingerprint}) + "\n")


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
