"""The compiled fused N:4 block pass (``nm4_block.c``): building it, caching it, and deciding whether
the export may use it.

The C file is compiled once per machine with the system C compiler into a shared library under
``$MASKPRO_KERNEL_CACHE`` (default ``~/.cache/maskpro_ds/kernels``), named by a hash of the source,
the flags and the CPU, and loaded with ctypes (a plain C ABI: no torch headers, a sub-second
build). It is used only if it gives exactly the reference bytes (``nm.topn_mask``,
``nm.pack_bits``, a select on raw bits) on a probe with the hard cases (ties, -0.0 against +0.0,
infinities, every N, odd row widths, every weight width); any
failure (no compiler, a build error, a different byte) leaves the export on the numpy kernel,
which is correct everywhere, and :func:`status` says why. ``MASKPRO_EXPORT_KERNEL=numpy`` forces
the numpy kernel; ``=native`` makes a failure an error instead of a fallback.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from maskpro_ds.masks.nm import pack_bits, topn_mask

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("nm4_block.c")
FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-std=c99"]  # integer ops only: flags cannot change a bit
ENV_CHOICE = "MASKPRO_EXPORT_KERNEL"  # auto (default) | native | numpy

_loaded: tuple[object | None, str] | None = None  # (the C function or None, why), once per process


class NativeNanLogits(ValueError):
    """The block's logits hold NaN."""


def _cpu_key() -> str:
    """What a -march=native build depends on: the machine and its CPU feature flags."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()} {flags}"


def cache_dir() -> Path:
    return Path(os.environ.get("MASKPRO_KERNEL_CACHE", Path.home() / ".cache" / "maskpro_ds" / "kernels"))


def _build() -> Path:
    """The shared library for this source, flags and CPU (built into the cache when missing)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + _cpu_key().encode()).hexdigest()[:16]
    target = cache_dir() / f"nm4_block-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target, then rename: concurrent processes (export workers, ranks) never load
    # a half-written library.
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)], check=True, capture_output=True, text=True)
        os.replace(tmp, target)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"{compiler} failed: {e.stderr.strip()[:500]}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load():
    lib = ctypes.CDLL(str(_build()))
    fn = lib.maskpro_nm4_block
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32]
    return fn


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


def run_block(fn, logits: np.ndarray, rows: int, in_f: int, n: int, keep: np.ndarray, packed: np.ndarray,
              weights: np.ndarray | None, pruned: np.ndarray | None, code: np.ndarray | None = None) -> None:
    """Call the C pass on C-contiguous arrays (the caller sizes them; ``code``: rows * in_f / 4 bytes
    of scratch, allocated when None); NaN -> NativeNanLogits."""
    if code is None:
        code = np.empty(rows * in_f // 4, np.uint8)
    if code.size < rows * in_f // 4 or keep.size < rows * in_f or packed.size < rows * ((in_f + 7) // 8):
        raise ValueError("run_block: an output buffer is too small")
    for a in (logits, keep, packed, weights, pruned, code):
        if a is not None and not a.flags.c_contiguous:
            raise ValueError("run_block needs C-contiguous arrays")
    wbytes = 0 if weights is None else weights.dtype.itemsize
    if fn(_ptr(logits), rows, in_f, n, _ptr(keep), _ptr(packed), _ptr(code), _ptr(weights), _ptr(pruned), wbytes):
        raise NativeNanLogits("logits hold NaN")


def _probe(fn) -> str | None:
    """None if the C pass gives the reference bytes (nm.topn_mask, nm.pack_bits, a select) on hard
    cases, else what differed."""
    rng = np.random.default_rng(0)
    for n in (1, 2, 3):
        for rows, in_f in ((3, 4), (5, 12), (7, 40), (16, 576)):
            count = rows * in_f
            x = rng.standard_normal(count).astype(np.float32)
            x[rng.random(count) < 0.3] = 0.5  # many ties
            x[rng.random(count) < 0.05] = -0.0
            x[rng.random(count) < 0.05] = 0.0
            x[rng.random(count) < 0.02] = np.inf
            x[rng.random(count) < 0.02] = -np.inf
            mask = topn_mask(torch.from_numpy(x).reshape(rows, in_f), n, 4)
            keep_ref = mask.numpy().view(np.uint8)
            packed_ref = pack_bits(mask).numpy()
            for lane in (np.uint8, np.uint16, np.uint32, np.uint64):
                w = rng.integers(0, np.iinfo(lane).max, count, dtype=lane, endpoint=True)
                pruned_ref = w * keep_ref.reshape(-1).astype(lane)
                keep, packed = np.empty((rows, in_f), np.uint8), np.empty_like(packed_ref)
                pruned = np.empty_like(w)
                run_block(fn, x, rows, in_f, n, keep, packed, w, pruned)
                for what, got, want in (("keep", keep, keep_ref), ("packed", packed, packed_ref),
                                        ("pruned", pruned, pruned_ref)):
                    if not np.array_equal(got, want):
                        return f"{what} bytes differ from the numpy kernel (N={n}, {rows}x{in_f}, {lane.__name__})"
            x[rows * in_f // 2] = np.nan
            try:
                run_block(fn, x, rows, in_f, n, keep, packed, None, None)
                return "NaN logits were not refused"
            except NativeNanLogits:
                pass
    return None


def native_kernel():
    """The probed C function, or None (then :func:`status` says why). Decided once per process."""
    global _loaded
    if _loaded is None:
        choice = os.environ.get(ENV_CHOICE, "auto")
        if choice not in ("auto", "native", "numpy"):
            raise ValueError(f"{ENV_CHOICE}={choice!r}: expected auto, native or numpy")
        if choice == "numpy":
            _loaded = (None, f"numpy ({ENV_CHOICE}=numpy)")
        else:
            try:
                fn = _load()
                problem = _probe(fn)
            except Exception as exc:  # noqa: BLE001 - any toolchain failure means: use the numpy kernel
                fn, problem = None, f"{type(exc).__name__}: {exc}"
            if problem is None:
                _loaded = (fn, "native")
            else:
                if choice == "native":
                    raise RuntimeError(f"{ENV_CHOICE}=native: the compiled export kernel is not usable: {problem}")
                logger.warning("export: the compiled kernel is not used (%s); using the numpy kernel", problem)
                _loaded = (None, f"numpy (compiled kernel not usable: {problem})")
    return _loaded[0]


def status() -> str:
    """Which kernel the export uses in this process, and why."""
    native_kernel()
    return _loaded[1]
