"""Re-open an export and check it against its own parts and the base model, a row block at a time.

Checks (each failure is named; the report also lists what could not be checked and why):
- every mask is strict N:M; top-N of the exported logits gives the exported mask;
- hf-dense: every pruned slot is exactly +0.0 and every kept slot equals the base weight bit for bit
  (a kept weight may itself be 0.0 in the base, so "zero pattern == mask complement" would be wrong);
  without a mask to compare with: every slot is the base value or +0.0 and no group keeps more than
  N non-zeros; config.json carries no quantization/sparsity block;
- ct-sparse24: our own decompressor (formats.md §3 byte layout) gives exactly the hf-dense weights
  (or the masked base when hf-dense was not exported); bitmask == the mask; strict 2:4; ``P.shape``;
  the quantization_config block, global_sparsity included;
- every unmasked tensor is byte-identical to the base; indexes list exactly the tensors present;
- a per-layer sparsity table.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from maskpro_ds.artifacts import MASK_FILE, model_fingerprint, read_mask_artifact
from maskpro_ds.export.base_model import COMPRESSION_KEYS, BaseModel
from maskpro_ds.export.ct_sparse24 import decompress, ignored_modules, quantization_config
from maskpro_ds.export.logits_format import LOGITS_MANIFEST
from maskpro_ds.export.pipeline import DEFAULT_CHUNK_ELEMENTS, EXPORT_MANIFEST, FORMATS
from maskpro_ds.export.st_io import FLOAT_DTYPES, Reader, TensorInfo, iter_row_chunks, read_header
from maskpro_ds.masks.nm import nm_violations, pack_bits, parse_pattern, topn_mask, unpack_bits

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


class _Views:
    """Read access to every part of one export plus the base."""

    def __init__(self, root: Path, formats: list[str], base: BaseModel | None, report: VerifyReport):
        self.reader = Reader()
        self.base = base
        self.hf = BaseModel(root / "hf-dense") if "hf-dense" in formats else None
        self.ct = BaseModel(root / "ct-sparse24") if "ct-sparse24" in formats else None
        self.mask_tensors: dict[str, TensorInfo] | None = None
        self.logits_tensors: dict[str, TensorInfo] | None = None
        if "mask" in formats:
            self.mask_artifact = read_mask_artifact(root / "mask")
            self.mask_tensors, _ = read_header(root / "mask" / MASK_FILE)
        if "logits" in formats:
            manifest = json.loads((root / "logits" / LOGITS_MANIFEST).read_text())
            self.logits_tensors = {}
            for file_name in sorted(set(manifest["weight_map"].values())):
                infos, _ = read_header(root / "logits" / file_name)
                self.logits_tensors.update(infos)

    def rows(self, tensors: dict[str, TensorInfo] | None, name: str, r0: int, r1: int) -> torch.Tensor | None:
        return None if tensors is None else self.reader.read_rows(tensors[name], r0, r1)


def _check_tensor_sets(v: _Views, shapes: dict, report: VerifyReport) -> None:
    masked_weights = {f"{layer}.weight" for layer in shapes}
    if v.hf is not None and v.base is not None:
        expected = {n: (t.dtype, t.shape) for n, t in v.base.tensors.items()}
        got = {n: (t.dtype, t.shape) for n, t in v.hf.tensors.items()}
        if got != expected:
            report.fail(f"hf-dense: tensor set differs from the base (missing {sorted(set(expected) - set(got))[:4]}, "
                        f"extra {sorted(set(got) - set(expected))[:4]}, or dtype/shape changed)")
    if v.ct is not None and v.base is not None:
        expected = {n for n in v.base.tensors if n not in masked_weights}
        for layer in shapes:
            expected |= {f"{layer}.compressed", f"{layer}.bitmask", f"{layer}.shape"}
        if set(v.ct.tensors) != expected:
            report.fail(f"ct-sparse24: tensor set differs from the base with masked weights compressed "
                        f"(missing {sorted(expected - set(v.ct.tensors))[:4]}, extra {sorted(set(v.ct.tensors) - expected)[:4]})")
    for label, model in (("hf-dense", v.hf), ("ct-sparse24", v.ct)):
        if model is not None:
            index = json.loads((model.dir / "model.safetensors.index.json").read_text())
            total = sum(t.nbytes for t in model.tensors.values())
            if index["metadata"].get("total_size") != total or set(index["weight_map"]) != set(model.tensors):
                report.fail(f"{label}: model.safetensors.index.json does not match the shard files")
    if v.hf is not None:
        bad = [k for k in COMPRESSION_KEYS if k in v.hf.config()]
        if bad:
            report.fail(f"hf-dense/config.json carries {bad}; dense loaders would misread it")


def _check_layer(v: _Views, layer: str, shape, n: int, m: int, chunk: int, report: VerifyReport, ct_count: list) -> None:
    out_f, in_f = shape
    rows = max(1, chunk // in_f)
    kept = zeros = 0
    for r0 in range(0, out_f, rows):
        r1 = min(out_f, r0 + rows)
        where = f"{layer} rows {r0}..{r1}"
        mask = v.rows(v.mask_tensors, layer, r0, r1)
        mask = None if mask is None else unpack_bits(mask, in_f)
        logits = v.rows(v.logits_tensors, layer, r0 * in_f // m, r1 * in_f // m)
        if logits is not None:
            from_logits = topn_mask(logits.float().reshape(r1 - r0, in_f), n, m)
            if mask is not None and not torch.equal(from_logits, mask):
                return report.fail(f"{where}: top-{n} of the exported logits differs from the exported mask")
            mask = from_logits
        if mask is not None and nm_violations(mask, n, m).numel():
            return report.fail(f"{where}: mask is not strict {n}:{m}")
        base = None if v.base is None else v.reader.read_rows(v.base.tensors[f"{layer}.weight"], r0, r1)
        hf = None if v.hf is None else v.reader.read_rows(v.hf.tensors[f"{layer}.weight"], r0, r1)
        if hf is not None:
            if mask is not None:
                if bool((_bits(hf)[~mask] != 0).any()):
                    return report.fail(f"{where}: hf-dense has a pruned slot that is not +0.0")
                if base is not None and not torch.equal(_bits(hf)[mask], _bits(base)[mask]):
                    return report.fail(f"{where}: hf-dense has a kept slot that differs from the base")
            else:
                if base is not None and bool(((_bits(hf) != _bits(base)) & (_bits(hf) != 0)).any()):
                    return report.fail(f"{where}: hf-dense has a value that is neither the base weight nor +0.0")
                if bool(((hf != 0).reshape(-1, m).sum(-1) > n).any()):
                    return report.fail(f"{where}: hf-dense keeps more than {n} non-zeros in a group of {m}")
        if v.ct is not None:
            comp = v.reader.read_rows(v.ct.tensors[f"{layer}.compressed"], r0, r1)
            bitmask = v.reader.read_rows(v.ct.tensors[f"{layer}.bitmask"], r0, r1)
            if nm_violations(unpack_bits(bitmask, in_f), 2, 4).numel():
                return report.fail(f"{where}: ct-sparse24 bitmask is not strict 2:4")
            if mask is not None and not torch.equal(bitmask, pack_bits(mask)):
                return report.fail(f"{where}: ct-sparse24 bitmask differs from the mask")
            dense = decompress(comp, bitmask, in_f)
            reference = hf if hf is not None else (
                torch.where(mask, base, 0) if mask is not None and base is not None else None)
            if reference is not None and not torch.equal(_bits(dense), _bits(reference)):
                return report.fail(f"{where}: ct-sparse24 decompresses to weights other than the hf-dense ones")
            ct_count[0] += int((dense == 0).sum())
            ct_count[1] += dense.numel()
            hf = dense if hf is None else hf
        if mask is not None:
            kept += int(mask.sum())
        if hf is not None:
            zeros += int((hf == 0).sum())
    row = report.layers.setdefault(layer, {"shape": [out_f, in_f]})
    if v.mask_tensors is not None or v.logits_tensors is not None:
        row["kept_fraction"] = kept / (out_f * in_f)
    if v.hf is not None or v.ct is not None:
        row["zero_fraction"] = zeros / (out_f * in_f)
    if v.ct is not None:
        shape_t = v.reader.read_rows(v.ct.tensors[f"{layer}.shape"], 0, 2)
        if shape_t.dtype != torch.int64 or shape_t.reshape(-1).tolist() != [out_f, in_f]:
            report.fail(f"{layer}: ct-sparse24 {layer}.shape is {shape_t.tolist()}, expected [[{out_f}], [{in_f}]]")


def _check_unmasked(v: _Views, shapes: dict, report: VerifyReport, ct_count: list) -> None:
    masked_weights = {f"{layer}.weight" for layer in shapes}
    for name, info in v.base.tensors.items() if v.base is not None else ():
        if name in masked_weights:
            continue
        for label, model in (("hf-dense", v.hf), ("ct-sparse24", v.ct)):
            if model is None or name not in model.tensors:
                continue
            other = model.tensors[name]
            same = other.nbytes == info.nbytes
            for offset in range(0, info.nbytes, 64 << 20) if same else ():
                length = min(64 << 20, info.nbytes - offset)
                if v.reader.read_bytes(info.path, info.start + offset, length) != v.reader.read_bytes(
                        other.path, other.start + offset, length):
                    same = False
                    break
            if not same:
                report.fail(f"{label}: unmasked tensor {name} is not byte-identical to the base")
        if v.ct is not None and info.dtype in FLOAT_DTYPES:
            for block in iter_row_chunks(v.reader, info):
                ct_count[0] += int((block == 0).sum())
                ct_count[1] += block.numel()


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
    v = _Views(root, formats, base, report)
    try:
        if "mask" in formats:
            if v.mask_artifact.shapes != shapes or (v.mask_artifact.n, v.mask_artifact.m) != (n, m):
                report.fail("mask: mask_manifest.json layers or pattern differ from export.json")
        if v.mask_tensors is None and v.logits_tensors is None:
            report.skipped.append("exact mask comparison: neither mask nor logits exported; checked N:M pruning of the base instead")
        _check_tensor_sets(v, shapes, report)
        ct_count = [0, 0]
        for layer, shape in shapes.items():
            _check_layer(v, layer, shape, n, m, chunk_elements, report, ct_count)
            recorded_kept = manifest["layers"][layer].get("kept")
            got = report.layers.get(layer, {}).get("kept_fraction")
            if got is not None and recorded_kept is not None and round(got * shape[0] * shape[1]) != recorded_kept:
                report.fail(f"{layer}: export.json records {recorded_kept} kept weights, the mask keeps {got * shape[0] * shape[1]:.0f}")
        _check_unmasked(v, shapes, report, ct_count)
        if v.ct is not None:
            config = v.ct.config().get("quantization_config")
            if base is not None and ct_count[1]:
                expected = quantization_config(ct_count[0] / ct_count[1], sorted(shapes), ignored_modules(base, set(shapes)))
                if config != expected:
                    report.fail(f"ct-sparse24/config.json quantization_config is {config}, expected {expected}")
            elif not config or config.get("config_groups") != {}:
                report.fail("ct-sparse24/config.json: quantization_config missing or without config_groups")
        report.checked += [f"{fmt}: {len(shapes)} masked layers" for fmt in formats]
    finally:
        v.reader.close()
    return report
