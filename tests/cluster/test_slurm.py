"""launchers/slurm/train.sbatch on a real one-node SLURM cluster (slurmctld, slurmd, munge; CPUs only).

1 node x 2 tasks, no GPUs, set by sbatch options on the command line as a user would. Jobs are
followed with ``scontrol show job`` (no slurmdbd, so no sacct). Both jobs must end with the logits
of the session's uninterrupted torchrun run, bit for bit; the second is preempted mid-run the way
``#SBATCH --signal=B:USR1@300`` does ahead of a time limit, requeues itself and resumes.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests.cluster.conftest import STEPS, run_args
from tests.cluster.runs import assert_same_logits, latest_step, logged_steps, wait_for_step
from tests.distributed.launch import REPO, base_env

pytestmark = [pytest.mark.cluster, pytest.mark.distributed]
SBATCH = REPO / "launchers" / "slurm" / "train.sbatch"
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def submit(slurm, tiny_run: dict, run_dir: Path, output: Path) -> str:
    env = base_env(PYTHON=sys.executable, **slurm.env)
    env.pop("DS_ACCELERATOR")  # the script must pick the CPU accelerator itself for --gpus-per-node 0
    cmd = ["sbatch", "--parsable", "--nodes", "1", "--ntasks-per-node", "2", "--gpus-per-node", "0",
           "--cpus-per-task", "1", "--time", "15", "--job-name", "maskpro-test", "--output", str(output),
           str(SBATCH), *run_args(tiny_run, run_dir)]
    job = slurm.command(*cmd, env=env).strip().split(";")[0]
    assert job.isdigit(), job
    return job


def job_log(output: Path) -> str:
    return output.read_text(errors="replace") if output.is_file() else "(no output file)"


def test_sbatch_job_completes_with_the_torchrun_logits(tiny_run, slurm, tmp_path):
    run_dir, output = tmp_path / "run", tmp_path / "job.out"
    job = submit(slurm, tiny_run, run_dir, output)
    info = slurm.wait_for(job, FINISHED, timeout=300)
    log = job_log(output)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), log[-6000:]
    assert "maskpro: 2 tasks on 1 nodes" in log and "accelerator cpu, restart 0" in log
    assert_same_logits(run_dir, tiny_run["reference"], STEPS)
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))


def test_sbatch_job_preempted_mid_run_requeues_and_resumes_bit_identical(tiny_run, slurm, tmp_path):
    run_dir, output = tmp_path / "run", tmp_path / "job.out"
    job = submit(slurm, tiny_run, run_dir, output)
    wait_for_step(run_dir, 2, timeout=300)
    # USR1 to the batch script only: what SLURM does at --signal=B:USR1@N before the time limit.
    slurm.command("scancel", "--signal=USR1", "--batch", job)
    info = slurm.wait_for(job, FINISHED, timeout=400)
    log = job_log(output)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-6000:]

    found = re.findall(r"stop requested \(SIGUSR1 on ranks 0,1\): finished step (\d+), checkpoint written", log)
    assert len(found) == 2 and found[0] == found[1], log[-6000:]  # both ranks, the same step
    stopped = int(found[0])
    assert 2 <= stopped < STEPS, f"stopped at {stopped}, not mid-run"
    assert f"requeueing job {job}" in log and "restart 1" in log
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{stopped:06d}'}" in log
    assert latest_step(run_dir) == STEPS
    assert_same_logits(run_dir, tiny_run["reference"], STEPS)
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))  # every step once: nothing lost, nothing redone
