"""The step-size guard: halve lr when a step looks unstable, stop the run when halving does not help.

Two optional trips (off at 0), both checked once a step's update is applied: an advantage before
conditioning with ``|r - δ| > train.max_abs_advantage`` (loss units, whatever ``train.advantage_norm``
does to it afterwards), and a deviating-group fraction above ``train.max_deviation``. Each trip
halves lr from the next step on, for the rest of the run (the step that tripped has already used
its lr: a trip never changes a step after the fact). Once lr falls below ``train.lr / 1000`` (ten
halvings) the guard raises :class:`GuardStop`; the trainer then saves a checkpoint of the finished
step and stops, so a resume continues with the next step and nothing is counted twice. Its state
(the current lr) is saved in checkpoints as an exact hex string.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


class GuardStop(RuntimeError):
    """lr fell below train.lr/1000 after repeated trips; the message says which trip."""


class LrGuard:
    def __init__(self, lr: float, max_abs_advantage: float = 0.0, max_deviation: float = 0.0):
        self.config_lr = float(lr)
        self.lr = float(lr)
        self.max_abs_advantage = max_abs_advantage
        self.max_deviation = max_deviation

    def check_advantages(self, raw_advantages: list[float], step: int) -> None:
        """After the update: halve lr if some |r - δ| (loss units, before conditioning) exceeds
        train.max_abs_advantage."""
        limit = self.max_abs_advantage
        worst = max(abs(a) for a in raw_advantages)
        if limit and worst > limit:
            self._halve(f"|r - delta| = {worst:.4g} > train.max_abs_advantage={limit}", step)

    def check_deviation(self, deviating: float, step: int) -> None:
        """After the update: halve lr if the deviating-group fraction exceeds train.max_deviation."""
        limit = self.max_deviation
        if limit and deviating > limit:
            self._halve(f"deviating fraction {deviating:.3g} > train.max_deviation={limit}", step)

    def _halve(self, why: str, step: int) -> None:
        self.lr /= 2
        logger.warning("step %d: %s; halving lr to %.4g from the next step on", step, why, self.lr)
        if self.lr < self.config_lr / 1000:  # 10 halvings
            raise GuardStop(f"lr fell below train.lr/1000 after repeated guard trips ({why})")

    def state_dict(self) -> dict:
        return {"lr": self.lr.hex(), "config_lr": self.config_lr.hex()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a halved lr, unless the user changed train.lr for the resumed run (a deliberate new step size)."""
        saved_config_lr = float.fromhex(state["config_lr"]) if "config_lr" in state else self.config_lr
        if saved_config_lr != self.config_lr:
            logger.warning("resume: train.lr changed from %g to %g; using the new value", saved_config_lr, self.config_lr)
            self.lr = self.config_lr
        else:
            self.lr = float.fromhex(state["lr"])
