"""One run per run directory: an exclusive lock rank 0 holds for the run's whole life.

``<run_dir>/run.lock`` is locked with ``flock`` and holds a JSON record of the holder (pid, host,
start time, command). A second run pointed at the same directory (a resubmitted job while the
first still runs, two users sharing a config) fails at once, before it reads or writes anything
else there, with an error naming the other run. The kernel drops the flock when the holder dies,
however it dies; the record is cleared on a clean exit, so a record found under a lock nobody
holds is a run that was killed, and it is taken over after a check:

- same host: the recorded pid must be gone (or reused by another process, told apart by its start
  time in /proc); a live holder means flock does not work on this filesystem, and we refuse;
- another host: flock is shared between nodes on NFSv4, GPFS and Lustre mounted with ``flock``, but
  node-local on some filesystems (BeeGFS by default, Lustre with ``localflock``). So the holder
  also touches the file every ``HEARTBEAT_S`` seconds, and a record from another host is taken
  over only if it stays untouched for ``watch_s`` seconds.

The file itself is never replaced or deleted (a rename or unlink would let two runs lock two
different files); the record is rewritten in place through the locked descriptor. A process forked
from the holder closes its copy of the descriptor, so a helper process that outlives a killed run
cannot keep the lock held in its name.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

from maskpro_ds import distributed

logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
HEARTBEAT_S = 10.0
WATCH_S = 3 * HEARTBEAT_S
_HELD: set[int] = set()  # descriptors of the locks this process holds


def _close_inherited() -> None:
    """In a forked child: drop the copies of our lock descriptors (closing a copy never unlocks)."""
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_inherited)


class RunLocked(RuntimeError):
    """The run directory belongs to another run that is still alive (or cannot be locked at all)."""


def _proc_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # fields after the command name, which may hold spaces


def _alive(pid: int, start_ticks: int | None) -> bool:
    """Whether the process of this host that wrote a record still runs (not a later one with its pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    now = _proc_start_ticks(pid)
    return start_ticks is None or now is None or now == start_ticks


def describe(record: dict) -> str:
    """'pid 123 on host gpu07, started 2025-01-01 12:00:00 UTC (command: ...)'."""
    command = " ".join(record.get("command", [])) or "?"
    return (f"pid {record.get('pid', '?')} on host {record.get('host', '?')}, started {record.get('started', '?')} "
            f"(command: {command[:300]})")


class RunLock:
    """``acquire()`` or raise :class:`RunLocked`; ``release()`` on exit (idempotent)."""

    def __init__(self, run_dir: str | os.PathLike, watch_s: float = WATCH_S, heartbeat_s: float = HEARTBEAT_S):
        self.path = Path(run_dir) / LOCK_NAME
        self.watch_s = watch_s
        self.heartbeat_s = heartbeat_s
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ reading the record
    def _read(self, fd: int) -> dict | None:
        """The record in the file (None when empty: released cleanly, or never used)."""
        size = os.fstat(fd).st_size
        raw = os.pread(fd, size, 0) if size else b""
        if not raw.strip():
            return None
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {"unreadable": raw[:200].decode("utf-8", "replace")}
        return record if isinstance(record, dict) else {"unreadable": str(record)[:200]}

    def _refuse(self, record: dict | None, why: str) -> RunLocked:
        holder = describe(record) if record and "unreadable" not in record else "a run whose record is unreadable"
        return RunLocked(
            f"train.run_dir {self.path.parent} is in use by another run: {holder}{why}. Wait for it to finish "
            f"or stop it, or pass another --train.run_dir; if that run is gone for sure, delete {self.path}")

    def _check_stale(self, fd: int, record: dict) -> str:
        """We hold the flock but a record is left: decide whether its writer is gone (-> a warning to
        log) or still runs (-> RunLocked)."""
        if "unreadable" in record:
            return f"{self.path}: unreadable record of an earlier run; taking the lock over"
        host, pid = record.get("host"), record.get("pid")
        if host == socket.gethostname():
            if isinstance(pid, int) and pid != os.getpid() and _alive(pid, record.get("proc_start")):
                raise self._refuse(record, "; it holds no flock on the file, so this filesystem's flock does not "
                                           "work: runs cannot be kept apart here")
        else:
            before = os.fstat(fd).st_mtime_ns
            deadline = time.monotonic() + self.watch_s
            while time.monotonic() < deadline:  # a live holder on another node touches the file
                time.sleep(min(1.0, self.watch_s))
                if os.fstat(fd).st_mtime_ns != before:
                    raise self._refuse(record, f"; it updated {self.path} within the last {self.watch_s:.0f} s")
        return (f"{self.path}: the run that held it ({describe(record)}) ended without releasing it; "
                "taking the lock over")

    # ------------------------------------------------------------------ acquire / release
    def acquire(self) -> str | None:
        """Lock the run directory (created if missing). Returns a warning when a stale lock was taken over."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # no truncation: a refused run changes nothing
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._refuse(self._read(fd), "") from None
            record = self._read(fd)
            warning = self._check_stale(fd, record) if record is not None else None
            self._write(fd, {
                "pid": os.getpid(), "host": socket.gethostname(), "proc_start": _proc_start_ticks(os.getpid()),
                "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                "command": [sys.executable, *sys.argv],
            })
        except BaseException:
            os.close(fd)  # closing drops a flock we may hold
            raise
        self._fd = fd
        _HELD.add(fd)
        self._thread = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()
        return warning

    @staticmethod
    def _write(fd: int, record: dict | None) -> None:
        payload = (json.dumps(record, indent=1) + "\n").encode() if record is not None else b""
        os.ftruncate(fd, 0)
        if payload:
            os.pwrite(fd, payload, 0)
        os.fsync(fd)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with contextlib.suppress(OSError):  # a hiccup of the filesystem must not end the run
                os.utime(self._fd)

    def release(self) -> None:
        """Clear the record, then drop the flock (in that order: a cleared file is never stale)."""
        if self._fd is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(OSError):
            self._write(self._fd, None)
        _HELD.discard(self._fd)
        os.close(self._fd)  # drops the flock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def lock_run_dir(run_dir: str | os.PathLike, is_main: bool) -> RunLock | None:
    """Collective: rank 0 takes the lock and every rank learns the outcome, so a refused run ends on
    every rank with the same :class:`RunLocked` before anything else is read or written."""
    lock, problem = None, None
    if is_main:
        lock = RunLock(run_dir)
        try:
            warning = lock.acquire()
            if warning:
                logger.warning("%s", warning)
        except RunLocked as e:
            lock, problem = None, str(e)
        except OSError as e:  # every rank must hear of it, or the others would wait for rank 0 forever
            lock, problem = None, f"train.run_dir {run_dir}: cannot lock {lock.path} ({e}); check that it is writable"
    problem = distributed.broadcast_object(problem)
    if problem:
        if lock is not None:
            lock.release()
        raise RunLocked(problem)
    return lock
