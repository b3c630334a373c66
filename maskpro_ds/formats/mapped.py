"""Read-only file maps for zero-copy block reads: a row block is a numpy view of the page cache.

The exporter's hot loop reads every base weight and every logit once. Copying them with ``preadv``
costs about as much CPU as the arithmetic on them, so it reads through whole-file read-only maps
instead, and gives the pages it touched back (``madvise(MADV_DONTNEED)``, which unmaps them from
this process and keeps them in the page cache) every few blocks: the resident set stays a few
blocks, not the file, which is why the rest of the package does not use safetensors' own maps. A file
truncated while mapped would fault (SIGBUS) instead of raising; inputs are checked against their
headers before the pass and are not expected to change during it.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

_PAGE = mmap.PAGESIZE


class MappedFiles:
    """One read-only map per file, opened on first use (a copy sent to another process maps its own)."""

    def __init__(self) -> None:
        self._maps: dict[Path, tuple[mmap.mmap, np.ndarray]] = {}
        self._touched: list[tuple[Path, int, int]] = []

    def __getstate__(self) -> dict:
        return {"_maps": {}, "_touched": []}

    def view(self, path: Path, offset: int, nbytes: int) -> np.ndarray:
        """Bytes ``[offset, offset + nbytes)`` of ``path`` as a read-only uint8 array (no copy)."""
        if path not in self._maps:
            fd = os.open(path, os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                mm = mmap.mmap(fd, size, prot=mmap.PROT_READ) if size else None
            finally:
                os.close(fd)  # the map keeps its own reference to the file
            if mm is not None:
                mm.madvise(mmap.MADV_SEQUENTIAL)
            self._maps[path] = (mm, np.frombuffer(mm, dtype=np.uint8) if mm is not None else np.empty(0, np.uint8))
        data = self._maps[path][1]
        if offset + nbytes > data.size:
            raise ValueError(f"{path}: bytes {offset}..{offset + nbytes} are past the end ({data.size} bytes); "
                             "the file was truncated during the export")
        self._touched.append((path, offset, nbytes))
        return data[offset:offset + nbytes]

    def release(self, min_bytes: int = 0) -> None:
        """Drop every page viewed since the last release from this process's resident set, once at
        least ``min_bytes`` were viewed (0: now). Adjacent views of one file go in one madvise call:
        a pass over consecutive row blocks makes one call per file and release, not one per block."""
        if sum(n for _, _, n in self._touched) < max(1, min_bytes):
            if not min_bytes:
                self._touched.clear()
            return
        ranges: dict[Path, list[list[int]]] = {}
        for path, offset, nbytes in sorted(self._touched):
            spans = ranges.setdefault(path, [])
            if spans and offset <= spans[-1][1]:
                spans[-1][1] = max(spans[-1][1], offset + nbytes)
            else:
                spans.append([offset, offset + nbytes])
        for path, spans in ranges.items():
            mm = self._maps[path][0]
            for offset, stop in spans:
                start = offset - offset % _PAGE
                end = min(len(mm), -(-stop // _PAGE) * _PAGE)
                if end > start:
                    mm.madvise(mmap.MADV_DONTNEED, start, end - start)
        self._touched.clear()

    def close(self) -> None:
        maps, self._maps = self._maps, {}
        self._touched.clear()
        for mm, data in maps.values():
            del data
            if mm is not None:
                try:
                    mm.close()
                except BufferError:  # a view is still alive somewhere: the map goes with it
                    pass
