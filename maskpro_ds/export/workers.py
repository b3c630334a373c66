"""The export pass cut into tasks and run by a pool of worker processes.

Every output byte has its place planned before the pass starts (the sinks open their files with
every tensor's offset fixed), so a task, rows ``[r0, r1)`` of one masked weight or one unmasked
tensor to copy, can run in any process and in any order: it reads its inputs with positional reads
and writes its outputs with positional writes. The files come out byte for byte the same for any
worker count. Tasks are ~``TASK_BYTES`` of base weights, so workers stay evenly loaded to the end.

Workers are forked from the exporting process once the sinks have opened their files (elsewhere
they are spawned and the files re-opened by path); each keeps one :class:`ExportJob` with its own
reader and block buffers, so its memory is a few blocks whatever the model size. After every task
a worker returns the sinks' tallies (bytes written per tensor, a format's counts), which the parent
adds to its own sinks: their completeness checks and statistics cover every worker's writes.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from itertools import zip_longest

import torch

from maskpro_ds.export.fused import LANES, BlockKernel
from maskpro_ds.export.sinks.base import RowBlock
from maskpro_ds.formats.dtypes import ST_TO_TORCH
from maskpro_ds.formats.safetensors_io import Reader, TensorInfo

TASK_BYTES = 32 << 20  # base bytes per task: ~50 tasks per GB, balance within a few percent
RELEASE_BYTES = 16 << 20  # mapped input bytes viewed between releases: bounds a worker's resident set,
# and one madvise per file per 16 MB instead of per block (per-block calls cost ~7% of the pass)


def default_workers() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Task:
    """Rows ``[r0, r1)`` of base tensor ``info`` (``layer`` None: copy the whole tensor)."""

    info: TensorInfo
    layer: str | None
    r0: int
    r1: int

    @property
    def nbytes(self) -> int:
        return (self.r1 - self.r0) * self.info.row_bytes if self.layer else self.info.nbytes


def plan_tasks(tensors: list[TensorInfo], layer_of: dict[str, str], task_bytes: int | None = None) -> list[Task]:
    """Masked weights in row ranges of about ``task_bytes`` (default TASK_BYTES), other tensors whole,
    in base order."""
    task_bytes = task_bytes or TASK_BYTES
    tasks = []
    for info in tensors:
        layer = layer_of.get(info.name)
        if layer is None:
            tasks.append(Task(info, None, 0, 0))
            continue
        rows = max(1, task_bytes // max(1, info.row_bytes))
        tasks += [Task(info, layer, r0, min(info.shape[0], r0 + rows)) for r0 in range(0, info.shape[0], rows)]
    return tasks


class ExportJob:
    """What one process needs to run tasks: the mask source, the sinks, the block size."""

    def __init__(self, source, sinks: list, chunk_elements: int):
        self.source = source
        self.sinks = sinks
        self.chunk_elements = chunk_elements
        self.needs_weights = any(s.needs_weights for s in sinks)
        self._reader: Reader | None = None
        self._kernel: BlockKernel | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_reader": None, "_kernel": None}

    def run(self, task: Task) -> dict[str, dict]:
        """Do one task; returns every sink's tally of it."""
        if self._reader is None:
            self._reader = Reader()
            self._kernel = BlockKernel(self.source.n, self.source.m)
        if task.layer is None:
            for sink in self.sinks:
                sink.passthrough(task.info, self._reader)
        else:
            rows = max(1, self.chunk_elements // task.info.shape[1])
            for r0 in range(task.r0, task.r1, rows):
                self._block(task.info, task.layer, r0, min(task.r1, r0 + rows))
            self._kernel.files.release()
        return {sink.format: sink.tally() for sink in self.sinks}

    def _block(self, info: TensorInfo, layer: str, r0: int, r1: int) -> None:
        kernel = self._kernel
        weights = None
        if self.needs_weights:
            raw = kernel.files.view(info.path, info.start + r0 * info.row_bytes, (r1 - r0) * info.row_bytes)
            weights = raw.view(LANES[info.row_bytes // info.shape[1]])
        keep, packed, pruned, logits = self.source.block(layer, r0, r1, kernel, weights)
        block = RowBlock(r0, r1, keep, packed, pruned, ST_TO_TORCH[info.dtype], logits)
        for sink in self.sinks:
            sink.masked_rows(layer, block)
        kernel.files.release(min_bytes=RELEASE_BYTES)


_job: ExportJob | None = None  # the worker process's job


def _start_worker(job: ExportJob) -> None:
    global _job
    torch.set_num_threads(1)  # one core per worker: the pool is the parallelism
    for sink in job.sinks:  # counts the parent had not absorbed yet are the parent's, not this worker's
        sink.tally()
    _job = job


def _run_in_worker(task: Task) -> dict[str, dict]:
    return _job.run(task)


def _start_method() -> str:
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


def striped(tasks: list[Task], workers: int) -> list[Task]:
    """``tasks`` cut into ``workers`` contiguous stripes of the base order and interleaved (first of
    each stripe, then second of each, ...). Processes writing one file serialise on its inode lock,
    so workers should write different output shards; neighbours in base order share a shard, tasks
    a stripe apart rarely do, and an idle worker takes the next task in this order. Order changes
    no output byte."""
    stripes = [tasks[i * len(tasks) // workers:(i + 1) * len(tasks) // workers] for i in range(workers)]
    return [task for group in zip_longest(*stripes) for task in group if task is not None]


def run_tasks(job: ExportJob, tasks: list[Task], workers: int, done: Callable[[Task], None],
              start_method: str | None = None) -> None:
    """Run every task on ``workers`` processes (in this one for 1), absorbing the tallies as tasks
    finish and calling ``done(task)``. The first failure cancels the rest and is raised here."""
    absorb = {sink.format: sink.absorb for sink in job.sinks}
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            for fmt, tally in job.run(task).items():
                absorb[fmt](tally)
            done(task)
        return
    context = multiprocessing.get_context(start_method or _start_method())
    pool = ProcessPoolExecutor(min(workers, len(tasks)), mp_context=context, initializer=_start_worker,
                               initargs=(job,))
    try:
        pending = {pool.submit(_run_in_worker, task): task for task in striped(tasks, workers)}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_EXCEPTION)
            for future in finished:
                task = pending.pop(future)
                for fmt, tally in future.result().items():  # raises the worker's exception
                    absorb[fmt](tally)
                done(task)
    except BrokenProcessPool as e:
        raise RuntimeError("an export worker process died (killed, or out of memory?); nothing was written to "
                           "--out. Re-run with fewer --workers if memory is short") from e
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

