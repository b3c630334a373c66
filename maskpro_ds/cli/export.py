"""``maskpro-export`` (tools/export_masks.py) and ``maskpro-inspect`` (tools/inspect_checkpoint.py).

```
maskpro-export CHECKPOINT --base MODEL_DIR --out DIR [--format hf-dense,mask,ct-sparse24,logits]
    [--max-shard-size 5GB] [--force] [--logits-dtype fp16|fp32] [--no-fingerprint-check] [--verify]
    [--workers N]
maskpro-export apply --mask MASK_DIR --base MODEL_DIR --out DIR [--format hf-dense,...] [--workers N]
maskpro-inspect EXPORT_DIR_OR_CHECKPOINT_OR_MASK_DIR [--base MODEL_DIR] [--json]
```
Every format goes to ``DIR/<format>/``. User errors print one line naming the file or option and
exit 2; a failed verification (including a shard whose content no longer matches the sha256 its
manifest records) exits 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from maskpro_ds.export.manifest import EXPORT_MANIFEST
from maskpro_ds.export.pipeline import apply_mask, default_base, export_checkpoint
from maskpro_ds.export.sinks.logits import LOGITS_DTYPES
from maskpro_ds.export.sinks.registry import FORMATS
from maskpro_ds.export.verify import verify_export
from maskpro_ds.export.workers import default_workers
from maskpro_ds.formats.checkpoint_format import read_manifest, verify_checksums
from maskpro_ds.formats.mask_artifact import MASK_MANIFEST, read_mask_artifact

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory; each format goes to OUT/<format>/")
    parser.add_argument("--format", default="hf-dense",
                        help=f"comma-separated formats among {', '.join(FORMATS)} (default hf-dense; "
                             "ct-sparse24 is a legacy format for compressed-tensors <= 0.14 stacks, "
                             "see docs/deploy.md)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file written (default 5GB)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists (only once the new export is complete)")
    parser.add_argument("--no-fingerprint-check", action="store_true",
                        help="skip hashing the base to check it is the model the masks were made from")
    parser.add_argument("--verify", action="store_true", help="re-read and check the export before giving it its final name")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes sharing the pass (default: the cores available, "
                             f"{default_workers()} here); the output is the same for any count")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _options(args) -> dict:
    return {"max_shard_size": args.max_shard_size, "force": args.force, "verify": args.verify,
            "fingerprint_check": not args.no_fingerprint_check, "workers": args.workers,
            "progress": False if args.no_progress else None}


def _export(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="maskpro-export",
        description="Export the masks of a training checkpoint applied to its base model. "
                    "Use `maskpro-export apply --mask ...` to apply a mask artifact instead.")
    parser.add_argument("checkpoint", help="step directory, `latest` file, checkpoints/ directory or run directory")
    parser.add_argument("--base", help="base model directory (default: the path recorded in the checkpoint)")
    parser.add_argument("--logits-dtype", default="fp32", choices=LOGITS_DTYPES, help="dtype of --format logits")
    _common(parser)
    args = parser.parse_args(argv)
    base = args.base or default_base(args.checkpoint)
    out = export_checkpoint(args.checkpoint, base, args.out, args.format, logits_dtype=args.logits_dtype, **_options(args))
    print(f"exported {args.format} to {out}")
    return 0


def _apply(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="maskpro-export apply",
                                     description="Apply a mask artifact to the base model it was made from.")
    parser.add_argument("--mask", required=True, help="mask artifact directory (masks.safetensors + mask_manifest.json)")
    parser.add_argument("--base", required=True, help="base model directory; its fingerprint must match the mask's")
    _common(parser)
    args = parser.parse_args(argv)
    out = apply_mask(args.mask, args.base, args.out, args.format, **_options(args))
    print(f"applied {args.mask} to {args.base}: {args.format} in {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if argv and argv[0] == "apply":
            return _apply(argv[1:])
        return _export(argv)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _checksum_result(check) -> tuple[str, str | None]:
    """("ok" | "not recorded" | "FAILED", the failure) of a checksum check."""
    try:
        return ("ok" if check() else "not recorded"), None
    except ValueError as e:
        return "FAILED", str(e)


def _inspect_checkpoint(path: Path, as_json: bool) -> int:
    manifest = read_manifest(path)  # checks every shard's size and header
    checksums, failure = _checksum_result(lambda: verify_checksums(manifest))
    summary = {"checkpoint": str(manifest.path), "step": manifest.step, "world_size": manifest.world_size,
               "pattern": f"{manifest.n}:{manifest.m}", "run_id": manifest.run_id,
               "base_fingerprint": manifest.base_fingerprint, "shards_ok": failure is None,
               "checksums": checksums, "failures": [failure] if failure else [],
               "layers": {layer.name: list(layer.shape) for layer in manifest.layers}}
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{manifest.path}: step {manifest.step}, {manifest.world_size} shard(s) present with recorded sizes, "
              f"sha256 {checksums}, pattern {manifest.n}:{manifest.m}, {len(manifest.layers)} masked layers, "
              f"run {manifest.run_id!r}")
        if failure:
            print(f"FAILED: {failure}")
    return 1 if failure else 0


def _inspect_mask(path: Path, as_json: bool) -> int:
    artifact = read_mask_artifact(path)
    checksums, failure = _checksum_result(artifact.verify)
    summary = {"mask": str(path), "pattern": artifact.pattern, "base_fingerprint": artifact.base_fingerprint,
               "checksums": checksums, "failures": [failure] if failure else [],
               "layers": {name: list(shape) for name, shape in artifact.shapes.items()}}
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{path}: mask artifact, pattern {artifact.pattern}, {len(artifact.shapes)} masked layers, "
              f"sha256 {checksums}")
        if failure:
            print(f"FAILED: {failure}")
    return 1 if failure else 0


def inspect_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="maskpro-inspect",
        description="Verify an export (strict N:M, mask vs weights, ct-sparse24 round trip, unmasked tensors "
                    "identical to the base, sparsity per layer), or check and summarise a training checkpoint or "
                    "a mask artifact (sizes, headers, sha256 of every shard).")
    parser.add_argument("path", help="export --out directory (or one format directory in it), a checkpoint, "
                                     "or a mask artifact directory")
    parser.add_argument("--base", help="base model directory (default: the path recorded in export.json)")
    parser.add_argument("--no-fingerprint-check", action="store_true", help="do not hash the base")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    path = Path(args.path)
    try:
        if (path / MASK_MANIFEST).is_file() and not (path.parent / EXPORT_MANIFEST).is_file():
            return _inspect_mask(path, args.json)
        if not (path / EXPORT_MANIFEST).is_file() and not (path.parent / EXPORT_MANIFEST).is_file():
            return _inspect_checkpoint(path, args.json)
        report = verify_export(path, args.base, fingerprint_check=not args.no_fingerprint_check)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":  # python -m maskpro_ds.cli.export (the demo runs it so); maskpro-inspect is inspect_main
    sys.exit(main())
