"""Re-open an export and check it against its own parts and the base model, a row block at a time.

Each format's own checks live with its sink (the ``Check`` class of every sink in
``sinks/registry.py``: tensor sets, indexes, config blocks, internal consistency); this module runs
them and compares the formats with each other and with the base. Checks (each failure is named; the
report also lists what could not be checked and why):
- every mask a format holds (the mask artifact, top-N of the exported logits, the ct-sparse24
  bitmask) is the same mask, and it is strict N:M;
- every dense view (hf-dense, ct-sparse24 decompressed by our own reader) holds exactly the same
  weights: +0.0 in every pruned slot and the base weight, bit for bit, in every kept slot (a kept
  weight may itself be 0.0 in the base, so "zero pattern == mask complement" would be wrong);
  without a mask to compare with: every slot is the base value or +0.0 and no group keeps more than
  N non-zeros;
- every unmasked tensor a format copies is byte-identical to the base;
- a per-layer sparsity table.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from maskpro_ds.export.base_model import BaseModel
from maskpro_ds.export.manifest import DEFAULT_CHUNK_ELEMENTS, EXPORT_MANIFEST
from maskpro_ds.export.sinks.base import CheckContext, CheckFailed, RowView
from maskpro_ds.export.sinks.registry import FORMATS, SINKS
from maskpro_ds.formats.hashing import model_fingerprint
from maskpro_ds.formats.safetensors_io import Reader
from maskpro_ds.masks.nm import nm_violations, parse_pattern

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Reinterpret as integers so comparisons are bitwise (+0.0 != -0.0, NaN == same NaN)."""
    return t.view(_INT_OF_SIZE[t.element_size()])


@dataclass
class VerifyReport:
    root: Path
    failures: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    layers: dict[str, dict] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures

    def fail(self, message: str) -> None:
        self.failures.append(message)

    def summary(self) -> str:
        lines = [f"{'layer':<48} {'shape':>14} {'kept':>8} {'zeros':>8}"]
        for name, row in self.layers.items():
            shape = "x".join(str(d) for d in row["shape"])
            kept = f"{row['kept_fraction']:.4f}" if "kept_fraction" in row else "-"
            zeros = f"{row['zero_fraction']:.4f}" if "zero_fraction" in row else "-"
            lines.append(f"{name:<48} {shape:>14} {kept:>8} {zeros:>8}")
        lines += [f"checked: {c}" for c in self.checked]
        lines += [f"skipped: {s}" for s in self.skipped]
        lines += [f"FAILED: {f}" for f in self.failures]
        lines.append(f"{self.root}: {'OK' if self.ok else f'{len(self.failures)} check(s) failed'}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"root": str(self.root), "ok": self.ok, "failures": self.failures, "skipped": self.skipped,
                "checked": self.checked, "layers": self.layers}


def _locate(path: Path) -> tuple[Path, list[str] | None]:
    """An export root, or one format directory inside it (then only that format is checked)."""
    if (path / EXPORT_MANIFEST).is_file():
        return path, None
    if path.name in FORMATS and (path.parent / EXPORT_MANIFEST).is_file():
        return path.parent, [path.name]
    raise FileNotFoundError(f"{path}: not an export (no {EXPORT_MANIFEST}); pass the --out directory of an export")


def _block_failures(views: list[RowView], base: torch.Tensor | None, n: int, m: int) -> list[str]:
    """Cross-format checks of one row block; returns the failures (empty when the block is fine)."""
    masks = [v for v in views if v.mask is not None]
    mask = masks[0].mask if masks else None
    failures = [f"{v.mask_label} differs from {masks[0].mask_label}" for v in masks[1:] if not torch.equal(v.mask, mask)]
    if failures:
        return failures
    if mask is not None and nm_violations(mask, n, m).numel():
        return [f"mask is not strict {n}:{m}"]
    dense = [v for v in views if v.dense is not None]
    failures = [f"{v.dense_label} holds weights other than the {dense[0].dense_label} ones"
                for v in dense[1:] if not torch.equal(_bits(v.dense), _bits(dense[0].dense))]
    for v in dense:
        w, label = _bits(v.dense), v.dense_label
        if mask is not None:
            if bool((w[~mask] != 0).any()):
                failures.append(f"{label} has a pruned slot that is not +0.0")
            elif base is not None and not torch.equal(w[mask], _bits(base)[mask]):
                failures.append(f"{label} has a kept slot that differs from the base")
        else:
            if base is not None and bool(((w != _bits(base)) & (w != 0)).any()):
                failures.append(f"{label} has a value that is neither the base weight nor +0.0")
            elif bool(((v.dense != 0).reshape(-1, m).sum(-1) > n).any()):
                failures.append(f"{label} keeps more than {n} non-zeros in a group of {m}")
    return failures


def _check_layer(checks: dict, base: BaseModel | None, reader: Reader, layer: str, shape, n: int, m: int,
                 chunk: int, report: VerifyReport) -> None:
    out_f, in_f = shape
    rows = max(1, chunk // in_f)
    kept = zeros = 0
    any_mask = any_dense = False
    for r0 in range(0, out_f, rows):
        r1 = min(out_f, r0 + rows)
        where = f"{layer} rows {r0}..{r1}"
        try:
            views = [check.rows(layer, r0, r1) for check in checks.values()]
        except CheckFailed as e:
            return report.fail(f"{where}: {e}")
        base_rows = None if base is None else reader.read_rows(base.tensors[f"{layer}.weight"], r0, r1)
        failures = _block_failures(views, base_rows, n, m)
        if failures:
            for failure in failures:
                report.fail(f"{where}: {failure}")
            return None  # one failing block per layer is enough to name it
        mask = next((v.mask for v in views if v.mask is not None), None)
        dense = next((v.dense for v in views if v.dense is not None), None)
        if mask is not None:
            any_mask, kept = True, kept + int(mask.sum())
        if dense is not None:
            any_dense, zeros = True, zeros + int((dense == 0).sum())
    row = report.layers.setdefault(layer, {"shape": [out_f, in_f]})
    if any_mask:
        row["kept_fraction"] = kept / (out_f * in_f)
    if any_dense:
        row["zero_fraction"] = zeros / (out_f * in_f)
    return None


def _check_unmasked(checks: dict, base: BaseModel, reader: Reader, shapes: dict, report: VerifyReport) -> None:
    masked_weights = {f"{layer}.weight" for layer in shapes}
    for name, info in base.tensors.items():
        if name in masked_weights:
            continue
        for fmt, check in checks.items():
            other = check.copied(name)
            if other is None:
                continue
            same = other.nbytes == info.nbytes
            for offset in range(0, info.nbytes, 64 << 20) if same else ():
                length = min(64 << 20, info.nbytes - offset)
                if reader.read_bytes(info.path, info.start + offset, length) != reader.read_bytes(
                        other.path, other.start + offset, length):
                    same = False
                    break
            if not same:
                report.fail(f"{fmt}: unmasked tensor {name} is not byte-identical to the base")


def verify_export(path: str | os.PathLike, base_dir: str | os.PathLike | None = None, *,
                  fingerprint_check: bool = True, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> VerifyReport:
    """Check an export (``--out`` directory, or one format directory in it); see the module docstring."""
    root, only = _locate(Path(path))
    report = VerifyReport(root=root)
    manifest = json.loads((root / EXPORT_MANIFEST).read_text())
    formats = only or manifest["formats"]
    n, m = parse_pattern(manifest["pattern"])
    shapes = {name: tuple(row["shape"]) for name, row in manifest["layers"].items()}
    base_path = Path(base_dir) if base_dir is not None else Path(manifest["base"]["path"])
    base = None
    if base_path.is_dir():
        base = BaseModel(base_path)
        recorded = manifest["base"].get("fingerprint")
        if fingerprint_check and recorded:
            if model_fingerprint(base_path) != recorded:
                report.fail(f"base {base_path}: fingerprint differs from the one the export was made from")
            else:
                report.checked.append(f"base fingerprint of {base_path}")
    else:
        report.skipped.append(f"comparisons with the base: {base_path} not found (pass --base)")
    reader = Reader()
    try:
        # Formats that hold a mask go first: the first mask is the one the others are compared with.
        ordered = sorted(formats, key=lambda fmt: SINKS[fmt].Check.authority)
        checks = {fmt: SINKS[fmt].Check(CheckContext(root / fmt, shapes, n, m, base, reader)) for fmt in ordered}
        if not any(fmt in checks for fmt in ("mask", "logits")):
            report.skipped.append("exact mask comparison: neither mask nor logits exported; "
                                  "checked the N:M pruning of the dense views instead")
        for check in checks.values():
            check.check_files(report)
        for layer, shape in shapes.items():
            _check_layer(checks, base, reader, layer, shape, n, m, chunk_elements, report)
            recorded_kept = manifest["layers"][layer].get("kept")
            got = report.layers.get(layer, {}).get("kept_fraction")
            if got is not None and recorded_kept is not None and round(got * shape[0] * shape[1]) != recorded_kept:
                report.fail(f"{layer}: export.json records {recorded_kept} kept weights, the mask keeps {got * shape[0] * shape[1]:.0f}")
        if base is not None:
            _check_unmasked(checks, base, reader, shapes, report)
        for check in checks.values():
            check.finish(report)
        report.checked += [f"{fmt}: {len(shapes)} masked layers" for fmt in formats]
    finally:
        reader.close()
    return report
