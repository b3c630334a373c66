"""maskpro_ds.train.preemption in one process: real signals set the stop flag and nothing else; handlers are
restored; the auto-resume rule follows the run directory. (All-rank agreement: tests/cluster/.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from maskpro_ds.train import preemption
from tests.distributed.launch import REPO


@pytest.fixture
def handlers():
    preemption.install_handlers()
    yield
    preemption.uninstall_handlers()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_only_sets_the_flag(handlers, sig):
    assert not preemption.stop_requested()
    os.kill(os.getpid(), sig)  # the process survives: the handler records it for the next step boundary
    assert preemption.stop_requested()


def test_uninstall_restores_previous_handlers_and_clears_the_flag():
    before = signal.getsignal(signal.SIGUSR1)
    preemption.install_handlers()
    preemption.install_handlers()  # idempotent: the second call must not record our own handler as "previous"
    os.kill(os.getpid(), signal.SIGUSR1)
    preemption.uninstall_handlers()
    assert signal.getsignal(signal.SIGUSR1) is before
    assert not preemption.stop_requested()


def test_without_handlers_sigterm_still_kills():
    """Only train.py installs the handlers; importing the module changes nothing."""
    code = textwrap.dedent("""
        import os, signal
        import maskpro_ds.train.preemption
        os.kill(os.getpid(), signal.SIGTERM)
        print("survived")
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGTERM and "survived" not in proc.stdout


def test_auto_resume_rule_follows_the_run_directory(tmp_path):
    assert not preemption.has_checkpoint(tmp_path / "nothing")
    ckpt = tmp_path / "run" / "checkpoints"
    (ckpt / ".tmp-step-000004").mkdir(parents=True)  # an interrupted save is not a checkpoint
    assert not preemption.has_checkpoint(tmp_path / "run")


def test_preempted_message_names_step_and_exit_code():
    e = preemption.Preempted(7, "SIGTERM on ranks 0,1")
    assert e.step == 7
    assert "finished step 7" in str(e) and str(preemption.EXIT_PREEMPTED) in str(e)
    assert preemption.EXIT_PREEMPTED == 75  # the batch script's EXIT_PREEMPTED must match
    assert "EXIT_PREEMPTED=75" in (REPO / "launchers" / "slurm" / "train.sbatch").read_text()
