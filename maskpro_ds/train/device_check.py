"""The pieces of the GPU self-check (``maskpro-gpu-check``): each runs one question on a device and
returns a JSON-able record with ``status`` "pass", "fail" or "skipped" (and a ``reason``).

* imports: the versions in use, whether ``torch.sparse.to_sparse_semi_structured`` exists, and which
  2:4 API the installed torchao offers (``SemiSparseWeightConfig``, the older ``semi_sparse_weight``,
  or none: its sparsity module was removed after 0.18);
* kernel probe: the N = 2 sampling and update kernels and the packed masked-weight select,
  torch.compile'd on the device, against the plain torch kernels on the same device, bit for bit;
* cross-device sampling: the same logits and keys drawn on the CPU and on the device must give the
  same mask codes (sampling is meant to be device-free); without a device only the CPU half runs
  (the plain kernel's codes, checked strict 2:4 and chunking-free, and the digest a device run is
  compared with);
* the memory model of docs/scaling.md, to set the measured peak of a ZeRO-3 run against;
* an exported 2:4 Linear (top-2 of random logits applied to a random weight, +0.0 where pruned)
  through ``to_sparse_semi_structured`` and torchao against the dense matmul.
The command (cli/gpu_check.py) runs them, starts the multi-rank ZeRO-3 run, and writes the report.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import time

import torch
import torch.nn.functional as F

from maskpro_ds.masks.nm import nm_violations, pack_bits, topn_mask
from maskpro_ds.masks.sampling import codes_to_masks, pair_code_block, sample_codes
from maskpro_ds.train.logit_store import select_kernels
from maskpro_ds.train.zero_model import masked_weight

SAMPLING_GROUPS = 300_007  # not a multiple of any chunk size: the ragged last chunk is exercised
SAMPLING_KEYS = (0x0123456789ABCDEF, 0xFEDCBA9876543210, 7, 1 << 63)
SAMPLING_OFFSET = 12345  # global index of the first group: draws depend on it, so it is not 0


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def torchao_sparsity_api() -> str | None:
    """Name of the 2:4 weight config the installed torchao offers, or None."""
    try:
        sparsity = importlib.import_module("torchao.sparsity")
    except Exception:  # noqa: BLE001 - absent, or present without (or with a broken) sparsity module
        return None
    for name in ("SemiSparseWeightConfig", "semi_sparse_weight"):
        if hasattr(sparsity, name) and hasattr(sparsity, "sparsify_"):
            return name
    return None


def check_imports(modules: tuple[str, ...] = ()) -> dict:
    """Versions, the 2:4 APIs on offer, and whether each of ``modules`` imports (fail if one does not)."""
    try:
        from torch.sparse import to_sparse_semi_structured  # noqa: F401

        semi = True
    except ImportError:
        semi = False
    imported = {}
    for name in modules:
        try:
            importlib.import_module(name)
            imported[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - a module that does not import is this check's finding
            imported[name] = f"{type(exc).__name__}: {exc}"
    broken = sorted(name for name, outcome in imported.items() if outcome != "ok")
    return {"status": "fail" if broken else "pass", "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
            "deepspeed": _version("deepspeed"), "transformers": _version("transformers"),
            "to_sparse_semi_structured": semi, "torchao": _version("torchao"),
            "torchao_sparsity": torchao_sparsity_api(), "modules": imported,
            **({"reason": f"cannot import {', '.join(broken)}"} if broken else {})}


def _skipped(reason: str, **extra) -> dict:
    return {"status": "skipped", "reason": reason, **extra}


def kernel_probe(device: torch.device, slots: int = 2) -> dict:
    """The compiled kernels against the plain ones on ``device``, bit for bit (the store's own probe),
    and the packed masked-weight select against ``torch.where`` on a bf16 weight holding -0.0 and NaN."""
    t0 = time.perf_counter()
    try:
        _, _, name = select_kernels("auto", device, slots)  # compiles, then probes against plain torch
        weight = torch.randn(257, 96, device=device).to(torch.bfloat16)
        weight[0, :4] = torch.tensor([-0.0, 0.0, float("nan"), -1.0])
        mask = topn_mask(torch.randn(257, 96, device=device), 2, 4)
        plain = torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=device))
        selected = masked_weight(weight, pack_bits(mask.reshape(-1)).to(device))
        where_same = torch.equal(plain.view(torch.int16), selected.view(torch.int16))
    except Exception as exc:  # noqa: BLE001 - a compiler failure is this check's finding
        return {"status": "fail", "reason": f"{type(exc).__name__}: {exc}", "device": device.type}
    ok = name == "compiled" and where_same
    return {"status": "pass" if ok else "fail", "device": device.type, "kernels": name,
            "sample_and_update_bits_equal": name == "compiled", "masked_weight_bits_equal": where_same,
            "seconds": round(time.perf_counter() - t0, 1),
            **({} if ok else {"reason": "compiled kernels unavailable or not bit-identical; training would fall back to "
                                        "the plain kernels (kernels=auto) or stop (kernels=compiled)"})}


def sampling_inputs() -> torch.Tensor:
    """Fixed hard logits ``[SAMPLING_GROUPS, 4]``: mixed scales, near-ties, exact ties, a dominant logit."""
    gen = torch.Generator().manual_seed(20260)
    scales = torch.tensor([0.1, 1.0, 3.0, 30.0, 300.0]).repeat(SAMPLING_GROUPS // 5 + 1)[:SAMPLING_GROUPS]
    x = torch.randn(SAMPLING_GROUPS, 4, generator=gen) * scales[:, None]
    x[::7] = 5.0
    x[::13, 2] = 1e4
    return x


def _codes(logits: torch.Tensor, kernel, device: torch.device) -> torch.Tensor:
    return sample_codes(logits.to(device), list(SAMPLING_KEYS), group_offset=SAMPLING_OFFSET, kernel=kernel).cpu()


def codes_digest(codes: torch.Tensor) -> str:
    """sha256 of mask codes ``[draws, groups]`` (uint8, row-major): what the CPU and a device must share."""
    return hashlib.sha256(codes.contiguous().numpy().tobytes()).hexdigest()


def cross_device_sampling(device: torch.device | None) -> dict:
    """Codes of the same logits and keys on the CPU and, given one, on ``device`` (plain and compiled).

    The CPU half: the plain kernel's codes and their digest, and the same codes again from chunks of
    another size (a draw depends on the group, never on how groups are cut).
    """
    logits = sampling_inputs()
    cpu_plain = _codes(logits, pair_code_block, torch.device("cpu"))
    rechunked = sample_codes(logits, list(SAMPLING_KEYS), group_offset=SAMPLING_OFFSET, chunk=4099)
    violations = sum(nm_violations(codes_to_masks(row, 4), 2, 4).numel() for row in cpu_plain)
    record = {"groups": SAMPLING_GROUPS, "draws": len(SAMPLING_KEYS), "keys": [hex(k) for k in SAMPLING_KEYS],
              "group_offset": SAMPLING_OFFSET, "cpu_sha256": codes_digest(cpu_plain),
              "cpu_strict_2_of_4": violations == 0, "cpu_chunking_free": torch.equal(rechunked, cpu_plain)}
    cpu_ok = record["cpu_strict_2_of_4"] and record["cpu_chunking_free"]
    if device is None:
        return {"status": "pass" if cpu_ok else "fail", **record, "reason": "no CUDA device: only the CPU half ran"}
    dev_plain = _codes(logits, pair_code_block, device)
    dev_kernel, _, dev_name = select_kernels("auto", device, len(SAMPLING_KEYS))
    record.update(device=device.type, device_sha256=codes_digest(dev_plain), device_kernels=dev_name,
                  device_equals_cpu=torch.equal(dev_plain, cpu_plain),
                  device_compiled_equals_plain=dev_name != "compiled"
                  or torch.equal(_codes(logits, dev_kernel, device), dev_plain))
    ok = cpu_ok and record["device_equals_cpu"] and record["device_compiled_equals_plain"]
    return {"status": "pass" if ok else "fail", **record,
            **({} if ok else {"reason": "the device's masks differ from the CPU's (or its compiled from its plain)"})}


def memory_model(*, params: int, masked: int, layer_weights: int, largest_linear: int, ranks: int, tokens: int,
                 hidden: int, intermediate: int, vocab: int, max_live: int, draws: int = 1,
                 weight_bytes: int = 2) -> dict:
    """Bytes per GPU of a MaskPro step, term by term, as docs/scaling.md ("Memory per GPU") states them.

    ``max_live`` is accepted for the record but not charged: it only caps what ZeRO-3 may keep
    gathered, and the steady state holds one layer's weights (the doc's "2·d_L for one layer").
    """
    terms = {
        "base_partition": weight_bytes * params / ranks,
        "logits": 4 * masked / ranks,
        "prior_bits": masked / (8 * ranks),
        "mask_cache": draws * masked / 8,  # R·K masks of the own slice: K·d/8 whatever R
        "gathered_layer": weight_bytes * max(layer_weights, 1),
        "linear_in_flight": weight_bytes * largest_linear + largest_linear / 8,
        "activations": tokens * (hidden * 10 + 3 * intermediate) * 2 + tokens * vocab * 10,
    }
    return {"terms": {k: int(v) for k, v in terms.items()}, "total": int(sum(terms.values()))}


def _time_ms(fn, repeats: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / repeats)
    return best * 1e3


def sparse_linear(device: torch.device | None, out_f: int = 11008, in_f: int = 4096, tokens: int = 4096,
                  dtype: torch.dtype = torch.bfloat16) -> dict:
    """An exported 2:4 Linear, dense vs ``to_sparse_semi_structured`` (and torchao when installed)."""
    shape = {"shape": [out_f, in_f], "tokens": tokens, "dtype": str(dtype).removeprefix("torch.")}
    if device is None or device.type != "cuda":
        return _skipped("needs a CUDA device", **shape)
    if torch.cuda.get_device_capability(device) < (8, 0):
        return _skipped(f"2:4 kernels need SM80+; this GPU is SM{''.join(map(str, torch.cuda.get_device_capability(device)))}",
                        **shape)
    gen = torch.Generator(device=device).manual_seed(0)
    weight = torch.randn(out_f, in_f, device=device, generator=gen, dtype=dtype) * 0.02
    mask = topn_mask(torch.randn(out_f, in_f, device=device, generator=gen), 2, 4)
    pruned = torch.where(mask, weight, torch.zeros((), dtype=dtype, device=device))  # what hf-dense holds
    x = torch.randn(tokens, in_f, device=device, generator=gen, dtype=dtype)
    record = dict(shape)
    with torch.no_grad():
        dense = F.linear(x, pruned)
        record["dense_ms"] = round(_time_ms(lambda: F.linear(x, pruned)), 4)
        try:
            from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

            sparse_w = to_sparse_semi_structured(pruned)
            record["backend"] = type(sparse_w).__name__.removeprefix("SparseSemiStructuredTensor") or "default"
            record["max_abs_diff"] = float((F.linear(x, sparse_w) - dense).abs().max())
            record["semi_structured_ms"] = round(_time_ms(lambda: F.linear(x, sparse_w)), 4)
            record["semi_structured_speedup"] = round(record["dense_ms"] / record["semi_structured_ms"], 3)
            record["force_cutlass"] = SparseSemiStructuredTensor._FORCE_CUTLASS
        except Exception as exc:  # noqa: BLE001 - unsupported build or GPU: the finding
            return {"status": "fail", **record, "reason": f"to_sparse_semi_structured: {type(exc).__name__}: {exc}"}
        api = torchao_sparsity_api()
        if api is None:
            record["torchao"] = "not installed, or without a 2:4 sparsity API"
        else:
            try:
                sparsity = importlib.import_module("torchao.sparsity")
                linear = torch.nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype)
                linear.weight.data.copy_(pruned)
                config = getattr(sparsity, api)()
                sparsity.sparsify_(linear, config)
                record["torchao"] = api
                record["torchao_max_abs_diff"] = float((linear(x) - dense).abs().max())
                record["torchao_ms"] = round(_time_ms(lambda: linear(x)), 4)
                record["torchao_speedup"] = round(record["dense_ms"] / record["torchao_ms"], 3)
            except Exception as exc:  # noqa: BLE001
                record["torchao"] = f"{api} failed: {type(exc).__name__}: {exc}"
    tolerance = 0.05 * float(dense.abs().max())
    ok = record["max_abs_diff"] <= tolerance
    return {"status": "pass" if ok else "fail", **record,
            **({} if ok else {"reason": f"sparse result differs from dense by {record['max_abs_diff']:.3g}"})}
