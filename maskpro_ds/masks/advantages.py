"""The advantages of a MaskPro step: the smoothed residual baseline and optional conditioning.

:class:`ResidualTracker` turns the per-rank loss residuals r_k = f(m_k) - f(m0) into advantages
a_k = r_k - delta (docs/method.md §3); :class:`AdvantageScaler` optionally conditions them so the
per-event logit change lr |a| stays in range over long runs (docs/method.md §5). Plain floats: both
states are saved in checkpoints as exact hex strings.
"""

from __future__ import annotations

import math
import typing

TrackerOrder = typing.Literal["use_then_refresh", "refresh_then_use"]
"""``train.tracker_order``: when δ is refreshed relative to its use (see :class:`ResidualTracker`)."""
AdvantageNorm = typing.Literal["none", "rms", "clip"]
"""``train.advantage_norm``: the conditioning of :class:`AdvantageScaler`."""


def _finite_list(values, name: str) -> list[float]:
    out = [float(v) for v in values]
    if not out:
        raise ValueError(f"{name}: need at least one value")
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name}: non-finite value in {out}; a loss overflowed (check dtype and lr)")
    return out


class ResidualTracker:
    """The smoothed baseline delta of docs/method.md §3 and the advantages a_k = r_k - delta.

    With K residuals per step (one per rank), delta moves with their mean:
    delta <- alpha delta + (1 - alpha) mean(r). Orders:

    * ``"use_then_refresh"`` (default): a_k = r_k - delta_prev. delta_prev depends only on earlier
      steps, so the estimate is exactly unbiased.
    * ``"refresh_then_use"``: delta is refreshed first (the reference script's order), so
      a_k = r_k - alpha delta_prev - (1 - alpha) mean(r); with K = 1 that is alpha (r - delta_prev),
      i.e. the default update scaled by alpha. Its own r_k enters with weight (1 - alpha)/K, which
      scales the expected update by 1 - (1 - alpha)/K: unbiased in direction.

    ``alpha = 1`` keeps delta fixed at its initial value (0): the advantages are the plain residuals.
    The math allows it (the tests use it to check that identity), but a training run selects the
    plain-residual ablation with ``train.estimator = residual``, so ``train.alpha`` is kept in [0, 1)
    where the tracker actually tracks.
    """

    ORDERS = typing.get_args(TrackerOrder)

    def __init__(self, alpha: float = 0.99, order: TrackerOrder = "use_then_refresh", delta: float = 0.0):
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"ResidualTracker: alpha must be in [0, 1], got {alpha}")
        if order not in self.ORDERS:
            raise ValueError(f"ResidualTracker: order must be one of {self.ORDERS}, got {order!r}")
        self.alpha = float(alpha)
        self.order = order
        self.delta = float(delta)
        self.steps = 0

    def _refreshed(self, residuals: list[float]) -> float:
        return self.alpha * self.delta + (1.0 - self.alpha) * (sum(residuals) / len(residuals))

    def advantages(self, residuals) -> list[float]:
        """a_k for this step's residuals; does not change the state (call :meth:`update` after)."""
        rs = _finite_list(residuals, "ResidualTracker.advantages")
        base = self.delta if self.order == "use_then_refresh" else self._refreshed(rs)
        return [r - base for r in rs]

    def update(self, residuals) -> None:
        """delta <- alpha delta + (1 - alpha) mean(residuals)."""
        self.delta = self._refreshed(_finite_list(residuals, "ResidualTracker.update"))
        self.steps += 1

    def step(self, residuals) -> list[float]:
        """:meth:`advantages` then :meth:`update`."""
        out = self.advantages(residuals)
        self.update(residuals)
        return out

    def state_dict(self) -> dict:
        return {"alpha": self.alpha.hex(), "order": self.order, "delta": self.delta.hex(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        """Restore delta and the step count exactly; alpha and order stay as configured."""
        self.delta = float.fromhex(state["delta"])
        self.steps = int(state["steps"])


class AdvantageScaler:
    """Advantage conditioning for long runs (docs/method.md §5); not part of the paper.

    * ``"none"``: a unchanged (the paper's plain update).
    * ``"rms"``: a / max(rms, eps), rms = sqrt of a bias-corrected running mean of mean(a^2) over
      PAST steps (beta), so the per-event logit change lr |a| / rms stays near lr; the divisor
      does not depend on this step's samples, so the step direction stays unbiased. The first
      step has no past and uses its own RMS. ``clip`` (optional) then bounds |a / rms| (in units
      of the RMS, e.g. 3).
    * ``"clip"``: a clipped to [-clip, clip] (``clip`` required, loss units).

    :meth:`conditioned` is pure; :meth:`observe` moves the running RMS. A trainer calls the second
    only once the step's update is applied, so a step that is redone (a stop, a resume) is counted
    once. :meth:`scale` does both.
    """

    MODES = typing.get_args(AdvantageNorm)

    def __init__(self, mode: AdvantageNorm = "none", beta: float = 0.99, clip: float | None = None, eps: float = 1e-8):
        if mode not in self.MODES:
            raise ValueError(f"AdvantageScaler: mode must be one of {self.MODES}, got {mode!r}")
        if not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"AdvantageScaler: beta must be in [0, 1), got {beta}")
        if mode == "clip" and (clip is None or clip <= 0):
            raise ValueError(f"AdvantageScaler: mode 'clip' needs clip > 0, got {clip}")
        if clip is not None and clip <= 0:
            raise ValueError(f"AdvantageScaler: clip must be > 0 when given, got {clip}")
        if mode == "none" and clip is not None:
            raise ValueError("AdvantageScaler: mode 'none' leaves advantages unchanged; a clip would have no effect")
        self.mode, self.beta, self.eps = mode, float(beta), float(eps)
        self.clip = None if clip is None else float(clip)
        self.mean_square = 0.0
        self.steps = 0

    def rms(self) -> float:
        """The bias-corrected running RMS of past advantages (0.0 before the first step)."""
        if self.steps == 0:
            return 0.0
        return math.sqrt(self.mean_square / (1.0 - self.beta**self.steps))

    def conditioned(self, advantages) -> list[float]:
        """This step's conditioned advantages; the state is not changed (see :meth:`observe`)."""
        adv = _finite_list(advantages, "AdvantageScaler.conditioned")
        if self.mode == "none":
            return adv
        out = adv
        if self.mode == "rms":
            denom = self.rms() if self.steps else math.sqrt(sum(a * a for a in adv) / len(adv))
            out = [a / max(denom, self.eps) for a in adv]
        if self.clip is not None:
            out = [min(max(a, -self.clip), self.clip) for a in out]
        return out

    def observe(self, advantages) -> None:
        """Fold this step's raw advantages into the running RMS (once the step is applied)."""
        adv = _finite_list(advantages, "AdvantageScaler.observe")
        if self.mode == "none":
            return
        self.mean_square = self.beta * self.mean_square + (1.0 - self.beta) * (sum(a * a for a in adv) / len(adv))
        self.steps += 1

    def scale(self, advantages) -> list[float]:
        """:meth:`conditioned`, then :meth:`observe`."""
        out = self.conditioned(advantages)
        self.observe(advantages)
        return out

    def state_dict(self) -> dict:
        return {
            "mode": self.mode,
            "beta": self.beta.hex(),
            "clip": None if self.clip is None else self.clip.hex(),
            "eps": self.eps.hex(),
            "mean_square": self.mean_square.hex(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the running statistics exactly; mode, beta, clip and eps stay as configured."""
        self.mean_square = float.fromhex(state["mean_square"])
        self.steps = int(state["steps"])
