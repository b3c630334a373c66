"""The run directory's lock: one holder, a clear refusal naming it, stale records taken over safely.

flock conflicts between two open file descriptions even inside one process, so a second
:class:`RunLock` on the same directory here behaves as a second run would. A "run on another node
whose flock we cannot see" is a record written without holding the flock, touched by a thread as
that node's heartbeat would.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from maskpro_ds.train.run_lock import LOCK_NAME, RunLock, RunLocked


def record(run_dir, **fields):
    (run_dir / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "h", "started": "s", "command": ["c"], **fields}))


def test_second_lock_is_refused_naming_the_holder(tmp_path):
    first = RunLock(tmp_path)
    assert first.acquire() is None
    held = json.loads((tmp_path / LOCK_NAME).read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["command"]
    before = (tmp_path / LOCK_NAME).read_bytes()
    with pytest.raises(RunLocked) as info:
        RunLock(tmp_path).acquire()
    message = str(info.value)
    assert f"train.run_dir {tmp_path} is in use by another run: pid {os.getpid()} on host {socket.gethostname()}" in message
    assert f"started {held['started']}" in message and "--train.run_dir" in message
    assert (tmp_path / LOCK_NAME).read_bytes() == before  # the refused one changed nothing
    first.release()
    assert (tmp_path / LOCK_NAME).read_bytes() == b""  # released: no record left
    second = RunLock(tmp_path)
    assert second.acquire() is None  # a cleanly released lock is no stale lock
    second.release()
    second.release()  # idempotent


def test_lock_is_dropped_when_the_holder_is_killed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from maskpro_ds.train.run_lock import RunLock; "
        f"RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked, match=f"pid {holder.pid} on host"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    # Killed: the kernel dropped its flock, its record stays; this host can tell the pid is gone.
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == holder.pid
    lock = RunLock(tmp_path)
    warning = lock.acquire()
    assert f"pid {holder.pid} on host {socket.gethostname()}" in warning and "ended without releasing it" in warning
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_live_process_named_by_a_record_is_not_taken_over(tmp_path):
    """Same host, a live pid, no flock held: this filesystem's flock does not work, so refuse."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        record(tmp_path, pid=other.pid, host=socket.gethostname())
        with pytest.raises(RunLocked, match="this filesystem's flock does not work"):
            RunLock(tmp_path).acquire()
        # the same pid reused by a later process (another start time) is not the holder
        record(tmp_path, pid=other.pid, host=socket.gethostname(), proc_start=1)
        lock = RunLock(tmp_path)
        assert "ended without releasing it" in lock.acquire()
        lock.release()
    finally:
        other.kill()
        other.wait()


def test_record_from_another_host(tmp_path):
    """Taken over only if nobody touches it for the watch window; a heartbeat means a live run."""
    record(tmp_path, host="node-that-does-not-exist", pid=4242)
    lock = RunLock(tmp_path, watch_s=0.5)
    t0 = time.monotonic()
    assert "ended without releasing it" in lock.acquire()
    assert time.monotonic() - t0 >= 0.5
    lock.release()

    record(tmp_path, host="node-that-does-not-exist", pid=4242)
    stop = threading.Event()

    def heartbeat():
        while not stop.wait(0.1):
            os.utime(tmp_path / LOCK_NAME)

    beat = threading.Thread(target=heartbeat)
    beat.start()
    try:
        with pytest.raises(RunLocked, match="pid 4242 on host node-that-does-not-exist.*updated"):
            RunLock(tmp_path, watch_s=2.0).acquire()
    finally:
        stop.set()
        beat.join()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == 4242  # left as it was


def test_holder_heartbeat_touches_the_file(tmp_path):
    lock = RunLock(tmp_path, heartbeat_s=0.1)
    lock.acquire()
    first = os.stat(tmp_path / LOCK_NAME).st_mtime_ns
    time.sleep(0.5)
    assert os.stat(tmp_path / LOCK_NAME).st_mtime_ns != first
    lock.release()


def test_unreadable_record_is_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_bytes(b"\xff\x00garbage")
    lock = RunLock(tmp_path)
    assert "unreadable record" in lock.acquire()
    lock.release()


def test_a_forked_helper_does_not_keep_the_lock(tmp_path):
    """A process forked from the holder (a worker pool) outliving it must not keep the flock."""
    lock = RunLock(tmp_path)
    lock.acquire()
    read, write = os.pipe()
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: stays alive until the parent has "died"
        os.close(write)
        os.write(ready_write, b"r")  # the at-fork handlers have run by now
        os.read(read, 1)
        os._exit(0)
    os.close(read)
    os.close(ready_write)
    assert os.read(ready_read, 1) == b"r"  # wait until the child runs (its inherited copy is closed)
    os.close(ready_read)
    try:
        os.close(lock._fd)  # the holder dies (its descriptor closes, as at process exit) ...
        lock._fd = None
        lock._stop.set()
        again = RunLock(tmp_path)
        assert "ended without releasing it" in again.acquire()  # ... and the child holds nothing
        again.release()
    finally:
        os.write(write, b"x")
        os.close(write)
        os.waitpid(pid, 0)
