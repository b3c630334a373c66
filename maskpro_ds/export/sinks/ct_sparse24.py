"""``ct-sparse24`` (formats.md §3): compressed-tensors ``sparse-24-bitmask``, the legacy 2:4 layout.

For each masked layer P, ``P.weight`` becomes three tensors:
``P.compressed`` (base dtype ``[out, in/2]``: the kept values row-major, ascending column),
``P.bitmask`` (uint8 ``[out, ceil(in/8)]``, little-endian bits along the input dim) and
``P.shape`` (int64 ``[[out], [in]]``). Everything else is copied unchanged. config.json gains the
``quantization_config`` block below. Only strict 2:4 masks are accepted: the reference compressor
silently keeps the top-2 |w| of any group with more non-zeros, so anything else would load as a
different model. :func:`decompress` is an independent reader of this layout used by verification.
"""

from __future__ import annotations

import torch

from maskpro_ds.export.base_model import BaseModel
from maskpro_ds.export.sinks.base import (
    CheckContext,
    CheckFailed,
    ExportOptions,
    RowBlock,
    RowView,
    SinkContext,
    raw_bytes,
)
from maskpro_ds.export.sinks.hf_dense import (
    check_index,
    copy_side_files,
    dense_config,
    open_model_writer,
    write_index,
)
from maskpro_ds.formats.dtypes import FLOAT_DTYPES
from maskpro_ds.formats.safetensors_io import (
    PlannedTensor,
    Reader,
    TensorInfo,
    iter_row_chunks,
    tensor_bytes,
)
from maskpro_ds.masks.nm import nm_violations, unpack_bits

CT_VERSION = "0.14.0"
SUFFIXES = ("compressed", "bitmask", "shape")


def check_pattern(n: int, m: int) -> None:
    if (n, m) != (2, 4):
        raise ValueError(f"--format ct-sparse24 stores 2:4 masks only; this mask is {n}:{m}. "
                         "Use --format hf-dense or mask for other patterns")


def quantization_config(global_sparsity: float, targets: list[str], ignore: list[str]) -> dict:
    """The exact block compressed-tensors 0.14 reads (``config_groups`` must be present, even empty)."""
    return {
        "quant_method": "compressed-tensors",
        "version": CT_VERSION,
        "config_groups": {},
        "sparsity_config": {
            "format": "sparse-24-bitmask",
            "sparsity_structure": "2:4",
            "global_sparsity": global_sparsity,
            "targets": targets,
            "ignore": ignore,
            "registry_requires_subclass": False,
        },
    }


def ignored_modules(base: BaseModel, masked: set[str]) -> list[str]:
    """Unmasked modules with a 2-D weight (lm_head, skipped projections); embeddings are not Linear."""
    names = []
    for info in base.tensors.values():
        if info.name.endswith(".weight") and len(info.shape) == 2:
            module = info.name[: -len(".weight")]
            if module not in masked and "embed" not in module:
                names.append(module)
    return sorted(names)


def decompress(compressed: torch.Tensor, bitmask: torch.Tensor, in_features: int) -> torch.Tensor:
    """Dense ``[r, in]`` from a compressed row block: kept values at set bits, +0.0 elsewhere."""
    mask = unpack_bits(bitmask, in_features)
    if int(mask.sum()) != compressed.numel():
        raise ValueError(f"bitmask sets {int(mask.sum())} bits but {compressed.numel()} values are stored")
    dense = torch.zeros(mask.shape, dtype=compressed.dtype)
    dense[mask] = compressed.reshape(-1)
    return dense


class CtSparse24Check:
    """verify's view of ct-sparse24: our own decompressor's weights and the bitmask as a mask; the tensor
    set, ``P.shape`` and the quantization_config block (global sparsity recounted over the whole model)."""

    authority = 2

    def __init__(self, ctx: CheckContext):
        self.ctx = ctx
        self.model = BaseModel(ctx.directory)
        self.zeros = 0
        self.numel = 0

    def check_files(self, report) -> None:
        base = self.ctx.base
        if base is not None:
            masked_weights = {f"{layer}.weight" for layer in self.ctx.shapes}
            expected = {n for n in base.tensors if n not in masked_weights}
            for layer in self.ctx.shapes:
                expected |= {f"{layer}.{suffix}" for suffix in SUFFIXES}
            if set(self.model.tensors) != expected:
                report.fail(f"ct-sparse24: tensor set differs from the base with masked weights compressed "
                            f"(missing {sorted(expected - set(self.model.tensors))[:4]}, "
                            f"extra {sorted(set(self.model.tensors) - expected)[:4]})")
        check_index("ct-sparse24", self.model, report)

    def rows(self, layer: str, r0: int, r1: int) -> RowView:
        out_f, in_f = self.ctx.shapes[layer]
        read = self.ctx.reader.read_rows
        if r0 == 0:
            shape_t = read(self.model.tensors[f"{layer}.shape"], 0, 2)
            if shape_t.dtype != torch.int64 or shape_t.reshape(-1).tolist() != [out_f, in_f]:
                raise CheckFailed(f"ct-sparse24 {layer}.shape is {shape_t.tolist()}, expected [[{out_f}], [{in_f}]]")
        comp = read(self.model.tensors[f"{layer}.compressed"], r0, r1)
        bitmask = read(self.model.tensors[f"{layer}.bitmask"], r0, r1)
        mask = unpack_bits(bitmask, in_f)
        if nm_violations(mask, 2, 4).numel():
            raise CheckFailed("ct-sparse24 bitmask is not strict 2:4")
        dense = decompress(comp, bitmask, in_f)
        self.zeros += int((dense == 0).sum())
        self.numel += dense.numel()
        return RowView(mask=mask, mask_label="the ct-sparse24 bitmask", dense=dense, dense_label="ct-sparse24")

    def copied(self, name: str) -> TensorInfo | None:
        return self.model.tensors.get(name)

    def finish(self, report) -> None:
        base, masked = self.ctx.base, set(self.ctx.shapes)
        masked_weights = {f"{layer}.weight" for layer in masked}
        config = self.model.config().get("quantization_config")
        if base is None or not self.numel:
            if not config or config.get("config_groups") != {}:
                report.fail("ct-sparse24/config.json: quantization_config missing or without config_groups")
            return
        for info in base.tensors.values():  # the unmasked floats count towards global_sparsity too
            if info.name in masked_weights:
                continue
            if info.dtype in FLOAT_DTYPES:
                for block in iter_row_chunks(self.ctx.reader, info):
                    self.zeros += int((block == 0).sum())
                    self.numel += block.numel()
        expected = quantization_config(self.zeros / self.numel, sorted(masked), ignored_modules(base, masked))
        if config != expected:
            report.fail(f"ct-sparse24/config.json quantization_config is {config}, expected {expected}")


class CtSparse24Sink:
    """Streams the compressed-tensors layout into the format directory."""

    format = "ct-sparse24"
    needs_weights = True
    Check = CtSparse24Check

    @classmethod
    def check(cls, source, options: ExportOptions) -> None:
        check_pattern(source.n, source.m)

    def __init__(self, ctx: SinkContext):
        check_pattern(ctx.source.n, ctx.source.m)
        directory, base, masked = ctx.directory, ctx.base, ctx.masked
        self.directory = directory
        self.base = base
        self.masked = masked
        weight_names = {f"{layer}.weight": layer for layer in masked}
        planned = []
        for t in base.ordered():
            layer = weight_names.get(t.name)
            if layer is None:
                planned.append(PlannedTensor(t.name, t.dtype, t.shape))
                continue
            out_f, in_f = t.shape
            planned += [PlannedTensor(f"{layer}.compressed", t.dtype, (out_f, in_f // 2)),
                        PlannedTensor(f"{layer}.bitmask", "U8", (out_f, (in_f + 7) // 8)),
                        PlannedTensor(f"{layer}.shape", "I64", (2, 1))]
        self.writer = open_model_writer(directory, planned, ctx.options.max_shard_bytes)
        for layer, info in masked.items():
            self.writer.write(f"{layer}.shape", 0, tensor_bytes(torch.tensor(list(info.shape), dtype=torch.int64).reshape(-1, 1)))
        # global_sparsity: the share of exactly-zero values over all floating tensors of the dense
        # model, the quantity llm-compressor records (parameters that are == 0 / all parameters).
        self.zeros = 0  # this process's counts since its last tally()
        self.numel = 0
        self._zeros_total = 0  # absorbed from every process
        self._numel_total = 0

    def masked_rows(self, layer: str, block: RowBlock) -> None:
        pruned, r0 = block.pruned, block.r0
        in_f = pruned.shape[1]
        compressed = pruned[block.mask].reshape(pruned.shape[0], in_f // 2)
        self.writer.write(f"{layer}.compressed", r0 * (in_f // 2) * pruned.element_size(), tensor_bytes(compressed))
        self.writer.write(f"{layer}.bitmask", r0 * ((in_f + 7) // 8), raw_bytes(block.packed_bits))
        self.zeros += int((pruned == 0).sum())
        self.numel += pruned.numel()

    def passthrough(self, info: TensorInfo, reader: Reader) -> None:
        self.writer.copy(info.name, reader.fd(info.path), info.start)
        if info.dtype in FLOAT_DTYPES:
            for block in iter_row_chunks(reader, info):
                self.zeros += int((block == 0).sum())
                self.numel += block.numel()

    def tally(self) -> dict:
        counts = {"written": self.writer.take_written(), "zeros": self.zeros, "numel": self.numel}
        self.zeros = self.numel = 0
        return counts

    def absorb(self, tally: dict) -> None:
        self.writer.add_written(tally["written"])
        self._zeros_total += tally["zeros"]
        self._numel_total += tally["numel"]

    def finish(self) -> dict:
        self.absorb(self.tally())
        self.zeros, self.numel = self._zeros_total, self._numel_total
        self.writer.close()
        write_index(self.directory, self.writer)
        config = dense_config(self.base) or self.base.config()
        global_sparsity = self.zeros / self.numel if self.numel else 0.0
        config["quantization_config"] = quantization_config(
            global_sparsity, sorted(self.masked), ignored_modules(self.base, set(self.masked)))
        copy_side_files(self.base, self.directory, config)
        return {"files": len(set(self.writer.weight_map.values())), "bytes": self.writer.total_size,
                "global_sparsity": global_sparsity}

    def abort(self) -> None:
        self.writer.abort()
