"""Which compute dtype is fast on this machine: what ``auto`` means for the demo and the benches
(beside dtypes.py, the dtype table it resolves into).

On a GPU, bf16. On a CPU it depends on the instruction set: with AVX-512 BF16 or AMX (Intel Cooper
Lake / Sapphire Rapids and later, AMD Zen 4 and later) oneDNN runs bf16 matmuls natively, about
4x faster than fp32 on this project's reference machine; without them (AVX2 only: older Xeons,
AMD Zen 2/3) bf16 is emulated and about 9x *slower* than fp32 (measured: 6 against 52 GFLOP/s on one
AVX2 thread for a 4096 x 576 x 1536 matmul). The demo's 20-minute budget holds only with the fast
dtype, so the demo and the benches resolve ``auto`` here.

The choice is a property of the machine, never of a measurement, so the same machine always makes
the same choice (a timing probe could flip between runs and change the masks). Perplexities in bf16
and fp32 differ in the second or third digit; every result records the dtype it used.
"""

from __future__ import annotations

import torch

from maskpro_ds.formats.dtypes import TORCH_DTYPES, parse_dtype


def cpu_has_native_bf16() -> bool:
    """True where the CPU executes bf16 matmuls natively (AVX-512 BF16 or AMX tiles)."""
    # torch.cpu's probes read cpuinfo; they are underscored but have been in every release since 2.3.
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def fast_dtype(device: str = "cpu") -> str:
    """``bf16`` on CUDA and on CPUs with native bf16, otherwise ``fp32``."""
    if str(device).startswith("cuda"):
        return "bf16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def resolve_dtype(name: str, device: str = "cpu", option: str = "--dtype") -> str:
    """``auto`` -> :func:`fast_dtype`; any other name is checked and returned in its short form."""
    if name == "auto":
        return fast_dtype(device)
    torch_dtype = parse_dtype(name, option)
    return next(short for short, dtype in TORCH_DTYPES.items() if dtype == torch_dtype)
