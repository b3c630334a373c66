"""Stopping cleanly when a scheduler asks: stop signals, the all-ranks agreement, the exit code, auto-resume.

Clusters end jobs with a signal: SLURM sends SIGTERM at the time limit, on ``scancel`` and on
preemption (then SIGKILL after ``KillWait``/``GraceTime``), and SIGUSR1 ahead of the limit when the
job asks for it (``--signal=B:USR1@300``); torchrun forwards its own SIGTERM to every rank. Without
a handler the ranks die at once and every step since the last periodic checkpoint is lost.

Here SIGTERM and SIGUSR1 only set a flag. At each step boundary every rank all-gathers its flag
(one float per rank), so all ranks see the same answer and stop after the same step even when only
one of them got the signal. The trainer then writes a checkpoint of that step and the process
exits with :data:`EXIT_PREEMPTED` (75, ``EX_TEMPFAIL``: "try again later"), which
launchers/slurm/train.sbatch recognises and answers with ``scontrol requeue``. The requeued job
passes ``--auto-resume``: resume when the run directory holds a usable checkpoint, start from the
prior when it holds none (a job stopped before its first checkpoint).

Only the step in flight is finished; nothing is interrupted mid-step, so a resumed run is bit for bit
the uninterrupted one. A rank stuck in a collective (a dead peer) is not helped by the flag: the
launcher's SIGKILL after its grace period ends it, as before.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import torch

from maskpro_ds import distributed
from maskpro_ds.train import checkpoint

logger = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL; launchers/slurm/train.sbatch requeues on it
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received: list[int] = []  # signal numbers, in arrival order (set from the handler: append only)
_previous: dict[int, object] = {}


class Preempted(RuntimeError):
    """Raised by the trainer after it checkpointed the last finished step because a stop was requested."""

    def __init__(self, step: int, why: str):
        super().__init__(f"stop requested ({why}): finished step {step}, checkpoint written; "
                         f"exiting with {EXIT_PREEMPTED} so the job can be requeued and resumed")
        self.step = step


def _on_signal(signum: int, frame: object) -> None:
    # Only record: the main thread may be inside a collective or a file write; the trainer acts at
    # the next step boundary, where every rank is at the same point.
    _received.append(signum)


def install_handlers() -> None:
    """Catch SIGTERM and SIGUSR1 from now on (main thread only; idempotent)."""
    for sig in STOP_SIGNALS:
        if sig not in _previous:
            _previous[sig] = signal.signal(sig, _on_signal)


def uninstall_handlers() -> None:
    """Restore the handlers that were there before :func:`install_handlers` and forget received signals."""
    for sig, handler in list(_previous.items()):
        signal.signal(sig, handler)
        del _previous[sig]
    _received.clear()


def stop_requested() -> bool:
    """Whether this process received a stop signal (local view; see :func:`stop_agreed`)."""
    return bool(_received)


def stop_agreed(device: torch.device) -> str | None:
    """Collective: a description of the stop request if any rank received a stop signal, else None.

    Every rank must call it at the same step boundary; all of them get the same answer.
    """
    mine = float(_received[0]) if _received else 0.0
    every = distributed.all_gather_floats(torch.tensor([mine], dtype=torch.float64, device=device)).cpu()
    ranks = [(rank, int(sig)) for rank, sig in enumerate(every[:, 0].tolist()) if sig]
    if not ranks:
        return None
    names = sorted({signal.Signals(sig).name for _, sig in ranks})
    return f"{'/'.join(names)} on rank{'s' if len(ranks) > 1 else ''} {','.join(str(r) for r, _ in ranks)}"


def has_checkpoint(run_dir: str | Path) -> bool:
    """The ``--auto-resume`` rule: true when ``<run_dir>/checkpoints`` holds a usable checkpoint.

    Every rank asks, before the process group exists, so only the structure is checked here; the
    resume itself then checks the content hashes, shared by the ranks."""
    return checkpoint.find_resumable(Path(run_dir) / "checkpoints", checksums=False) is not None
