"""Stop signals under torchrun: every rank finishes the step in flight, one checkpoint of that step is
written, the ranks exit with 75, and the resumed run is bit for bit the uninterrupted one.

Compared with the session's uninterrupted torchrun run (tests/cluster/conftest.py). The runs write
no periodic checkpoint before the last step, so a checkpoint mid-run can only come from the stop.
"""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import pytest

from tests.cluster.conftest import STEPS, run_args
from tests.cluster.runs import assert_same_logits, latest_step, logged_steps, wait_for_step
from tests.distributed.launch import BIN, REPO, TRAIN, base_env, free_port, torchrun

pytestmark = pytest.mark.distributed


def start_torchrun(args: list[str], log: Path) -> subprocess.Popen:
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), TRAIN, *args]
    with open(log, "w") as out:  # a file, not a pipe: nobody reads while the run goes on
        return subprocess.Popen(cmd, cwd=REPO, env=base_env(), stdout=out, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 120) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return log.read_text()


def rank_pids(torchrun_pid: int) -> dict[int, int]:
    """RANK -> pid of torchrun's worker processes (read from /proc)."""
    children = Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split()
    out = {}
    for pid in map(int, children):
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        ranks = [e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")]
        if ranks:
            out[int(ranks[0])] = pid
    return out


def assert_stopped_after_last_logged_step(run_dir: Path, out: str) -> int:
    """The checkpoint is the last step that completed (0 lost), mid-run, and the only one written."""
    stopped = latest_step(run_dir)
    assert 2 <= stopped < STEPS, f"stopped at step {stopped}, not mid-run\n{out[-4000:]}"
    assert logged_steps(run_dir) == list(range(1, stopped + 1))
    assert [p.name for p in sorted((run_dir / "checkpoints").glob("step-*"))] == [f"step-{stopped:06d}"]
    return stopped


def test_sigterm_to_torchrun_checkpoints_the_step_in_flight_and_resume_is_bit_identical(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    args = run_args(tiny_run, run_dir)
    log = tmp_path / "first.log"
    proc = start_torchrun(args, log)
    try:
        wait_for_step(run_dir, 2, timeout=240, proc=proc)
        proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
    finally:
        out = finish(proc, log)
    assert proc.returncode != 0, out[-4000:]  # torchrun reports its own SIGTERM as a failure
    stopped = assert_stopped_after_last_logged_step(run_dir, out)
    for rank in (0, 1):
        assert re.search(rf"\[rank{rank}\].*stop requested \(SIGTERM on ranks 0,1\): finished step {stopped}, "
                         r"checkpoint written; exiting with 75", out), out[-4000:]

    resumed = torchrun(2, [*args, "--auto-resume"])
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{stopped:06d}'}" in resumed.stdout + resumed.stderr
    assert_same_logits(run_dir, tiny_run["reference"], STEPS)
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))  # every step once, none lost or repeated


def test_sigusr1_to_one_rank_stops_every_rank_after_the_same_step(tiny_run, tmp_path):
    """Only rank 1 gets the signal (as when a scheduler's signal reaches one node first): the per-step
    agreement stops rank 0 after the same step, and both leave with 75, which torchrun reports."""
    run_dir = tmp_path / "run"
    log = tmp_path / "run.log"
    proc = start_torchrun(run_args(tiny_run, run_dir), log)
    try:
        wait_for_step(run_dir, 2, timeout=240, proc=proc)
        pids = rank_pids(proc.pid)
        assert sorted(pids) == [0, 1], pids
        subprocess.run(["kill", "-USR1", str(pids[1])], check=True)
    finally:
        out = finish(proc, log)
    stopped = assert_stopped_after_last_logged_step(run_dir, out)
    for rank in (0, 1):
        assert re.search(rf"\[rank{rank}\].*stop requested \(SIGUSR1 on rank 1\): finished step {stopped},", out), \
            out[-4000:]
    assert proc.returncode != 0
    assert re.search(r"exitcode\s*:\s*75", out), out[-4000:]  # torchrun's failure summary names the ranks' code
