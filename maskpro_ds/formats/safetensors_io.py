"""Raw safetensors I/O for streaming: header parsing, positional reads, planned sharded writes.

The safetensors library maps whole files into memory; on a 5 GB shard every page it touches counts
in the process's resident set until the file is closed. The exporter instead reads row ranges with
``preadv`` into its own buffers and writes each output file with ``pwrite`` at offsets planned up
front, so its memory is one chunk whatever the model size.

Files written here follow the layout of the reference writer (safetensors ``serialize``): an 8-byte
little-endian header length, a compact JSON header with ``__metadata__`` first and the tensors in
data order, padded with spaces to a multiple of 8, then the tensor bytes back to back. Metadata keys
are sorted, so the same tensors always give the same bytes.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from maskpro_ds.formats.dtypes import ITEM_SIZES, ST_TO_TORCH

_COPY_CHUNK = 64 << 20

assert sys.byteorder == "little", "safetensors stores little-endian bytes; this host is big-endian"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: absolute byte range ``[start, end)`` in ``path``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else 0


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict]:
    """Parse a safetensors header; errors name the file. Returns (tensors in data order, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: {size} bytes, too short for a safetensors file; it is truncated")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 << 20:
            raise ValueError(f"{path}: header length {n} does not fit in {size} bytes; the file is truncated or not safetensors")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: unreadable safetensors header ({e}); the file is corrupt") from e
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    tensors = []
    for name, entry in header.items():
        start, end = entry["data_offsets"]
        tensors.append(TensorInfo(name, entry["dtype"], tuple(entry["shape"]), path, base + start, base + end))
    tensors.sort(key=lambda t: t.start)
    data_end = max((t.end for t in tensors), default=base)
    if data_end > size:
        raise ValueError(f"{path}: header describes {data_end} bytes but the file has {size}; the file is truncated")
    return {t.name: t for t in tensors}, metadata


def _pread_into(fd: int, view: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise ValueError(f"{path}: unexpected end of file at byte {offset + done}; the file is truncated")
        done += got


class Reader:
    """Positional reads from safetensors files, one open descriptor per file (opened on first use,
    so a copy sent to another process opens its own)."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def __getstate__(self) -> dict:
        return {"_fds": {}}

    def fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def read_bytes(self, path: Path, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        _pread_into(self.fd(path), memoryview(buf), offset, path)
        return buf

    def read_into(self, path: Path, offset: int, out) -> None:
        """Fill the writable buffer ``out`` (e.g. a numpy array) with the bytes at ``offset``."""
        view = memoryview(out).cast("B")
        if len(view):
            _pread_into(self.fd(path), view, offset, path)

    def read_rows(self, info: TensorInfo, r0: int, r1: int) -> torch.Tensor:
        """Rows ``[r0, r1)`` of a tensor as a fresh (writable) torch tensor of its dtype."""
        if info.dtype not in ST_TO_TORCH:
            raise ValueError(f"{info.path}: tensor {info.name} has dtype {info.dtype}, which cannot be read as a tensor here")
        rb = info.row_bytes
        buf = self.read_bytes(info.path, info.start + r0 * rb, (r1 - r0) * rb)
        shape = (r1 - r0, *info.shape[1:])
        if not buf:
            return torch.empty(shape, dtype=ST_TO_TORCH[info.dtype])
        return torch.frombuffer(buf, dtype=ST_TO_TORCH[info.dtype]).reshape(shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, without a copy when it is already contiguous."""
    t = t.detach().contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, length: int) -> None:
    """Copy bytes file to file in the kernel (copy_file_range), falling back to read/write."""
    done = 0
    while done < length:
        n = min(_COPY_CHUNK, length - done)
        try:
            got = os.copy_file_range(src_fd, dst_fd, n, src_offset + done, dst_offset + done)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                raise
            got = 0
        if got == 0:  # unsupported here, or an unexpected end of the source: copy by hand
            buf = bytearray(n)
            view = memoryview(buf)
            got = os.preadv(src_fd, [view], src_offset + done)
            if got == 0:
                raise ValueError(f"source file ended at byte {src_offset + done}; it is truncated")
            _pwrite_all(dst_fd, view[:got], dst_offset + done)
        done += got


@dataclass
class PlannedTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for d in self.shape:
            count *= d
        return count * ITEM_SIZES[self.dtype]


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int | None) -> list[list[PlannedTensor]]:
    """Greedy split in the given order: a shard takes tensors until the next would pass the limit.

    A tensor larger than the limit gets a shard of its own (as transformers does).
    """
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if max_shard_bytes is not None and shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def encode_header(tensors: list[PlannedTensor], metadata: dict[str, str] | None) -> tuple[bytes, dict[str, int]]:
    """The header bytes (length prefix included) and each tensor's absolute start offset."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    offsets: dict[str, int] = {}
    cursor = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [cursor, cursor + t.nbytes]}
        offsets[t.name] = cursor
        cursor += t.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * ((-len(raw)) % 8)
    prefix = struct.pack("<Q", len(raw)) + raw
    return prefix, {name: off + len(prefix) for name, off in offsets.items()}


class ShardedWriter:
    """Write planned safetensors files whose tensors are filled piecewise, in any order.

    ``files`` maps file name -> its tensors in data order. Every byte of every tensor must be written
    exactly once before :meth:`close`, which checks it and fsyncs. Several processes may write into
    the same planned files (positional writes never overlap): a copy of the writer sent to another
    process re-opens the files by path, and what each process wrote comes back to the original
    through :meth:`take_written` / :meth:`add_written` so that the completeness check covers it.

    The file system's free space is checked against the planned bytes first: a full disk is an
    error before the pass, not after it.
    """

    def __init__(self, directory: Path, files: dict[str, list[PlannedTensor]], metadata: dict[str, str] | None):
        self.directory = directory
        self._where: dict[str, tuple[int, int, int]] = {}  # name -> (file index, start, nbytes)
        self._written: dict[str, int] = {}  # bytes accounted for, per tensor
        self._pending: dict[str, int] = {}  # bytes this process wrote since the last take_written()
        self._paths: list[Path] = []
        self._fds: list[int] = []
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        planned = sum(t.nbytes for tensors in files.values() for t in tensors)
        check_free_space(directory, planned)
        for file_name, tensors in files.items():
            prefix, starts = encode_header(tensors, metadata)
            fd = os.open(directory / file_name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._paths.append(directory / file_name)
            self._fds.append(fd)
            _pwrite_all(fd, memoryview(prefix), 0)
            os.ftruncate(fd, len(prefix) + sum(t.nbytes for t in tensors))
            for t in tensors:
                assert t.name not in self._where, f"tensor {t.name} planned twice"
                self._where[t.name] = (len(self._fds) - 1, starts[t.name], t.nbytes)
                self._written[t.name] = 0
                self.weight_map[t.name] = file_name
                self.total_size += t.nbytes

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": []}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._fds = [os.open(path, os.O_WRONLY) for path in self._paths]  # planned and sized already

    def _count(self, name: str, nbytes: int) -> None:
        self._pending[name] = self._pending.get(name, 0) + nbytes

    def write(self, name: str, offset: int, data: memoryview) -> None:
        """Write ``data`` at byte ``offset`` inside tensor ``name``."""
        index, start, nbytes = self._where[name]
        assert offset + len(data) <= nbytes, f"{name}: write past the end of the tensor"
        _pwrite_all(self._fds[index], data, start + offset)
        self._count(name, len(data))

    def copy(self, name: str, src_fd: int, src_offset: int) -> None:
        """Fill tensor ``name`` entirely with bytes copied from another file."""
        index, start, nbytes = self._where[name]
        copy_range(src_fd, src_offset, self._fds[index], start, nbytes)
        self._count(name, nbytes)

    def take_written(self) -> dict[str, int]:
        """Bytes per tensor this process wrote since the last call (and forget them here)."""
        pending, self._pending = self._pending, {}
        return pending

    def add_written(self, counts: dict[str, int]) -> None:
        """Account for bytes written (by this process or another one) towards :meth:`close`'s check."""
        for name, nbytes in counts.items():
            self._written[name] += nbytes

    def close(self) -> None:
        try:
            self.add_written(self.take_written())
            for name, (_, _, nbytes) in self._where.items():
                assert self._written[name] == nbytes, f"{name}: wrote {self._written[name]} of {nbytes} bytes"
            for fd in self._fds:
                os.fsync(fd)
        finally:
            self.abort()

    def abort(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


def check_free_space(directory: Path, nbytes: int) -> None:
    """Raise OSError if the file system of ``directory`` has less than ``nbytes`` free."""
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if free < nbytes:
        raise OSError(errno.ENOSPC, f"{directory}: {nbytes / 1e9:.2f} GB to write but {free / 1e9:.2f} GB free on its "
                      "file system; free space or write elsewhere")


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5e9 bytes (decimal units, as transformers' max_shard_size); ``"5GiB"`` binary."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper()
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    unit = next((u for u in units if s.endswith(u)), "")
    number, factor = s[: len(s) - len(unit)].strip(), units.get(unit, 1)
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"--max-shard-size: cannot read {text!r}; write e.g. 5GB, 500MB or 1GiB") from None
    if value <= 0:
        raise ValueError(f"--max-shard-size must be positive; got {text!r}")
    return int(value * factor)


def iter_row_chunks(reader: Reader, info: TensorInfo, max_bytes: int = _COPY_CHUNK):
    """Yield a tensor in row blocks of at most ``max_bytes`` (scalars and empty tensors whole)."""
    if not info.shape or info.shape[0] == 0 or info.row_bytes == 0:
        buf = reader.read_bytes(info.path, info.start, info.nbytes)
        dtype = ST_TO_TORCH[info.dtype]
        yield torch.frombuffer(buf, dtype=dtype).reshape(info.shape) if buf else torch.empty(info.shape, dtype=dtype)
        return
    rows = max(1, max_bytes // info.row_bytes)
    for r0 in range(0, info.shape[0], rows):
        yield reader.read_rows(info, r0, min(info.shape[0], r0 + rows))
