"""Testing hooks read from the environment: kill a rank abruptly, or give it a NaN loss, at chosen steps.

The distributed failure tests use them to fault real runs the way an OOM kill, a node loss or a bad
batch would; both are no-ops unless their variables are set.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def kill_rank(step: int, rank: int) -> None:
    """Testing hook: MASKPRO_FAULT_STEP=k and MASKPRO_FAULT_RANK=r kill rank r (no cleanup) once step k
    is done, the way an OOM kill or a node loss would. Unset in normal runs."""
    fault_step = os.environ.get("MASKPRO_FAULT_STEP")
    if fault_step is not None and step == int(fault_step) and rank == int(os.environ.get("MASKPRO_FAULT_RANK", "0")):
        logger.error("MASKPRO_FAULT_STEP=%s: rank %d exits abruptly", fault_step, rank)
        os._exit(137)


def nan_loss(step: int, rank: int) -> bool:
    """Testing hook: MASKPRO_FAULT_NAN_STEPS=3,4 makes rank MASKPRO_FAULT_RANK see a NaN loss at those steps."""
    steps = os.environ.get("MASKPRO_FAULT_NAN_STEPS")
    return bool(steps) and rank == int(os.environ.get("MASKPRO_FAULT_RANK", "0")) and str(step) in steps.split(",")
