"""The estimator protocol: how one step's losses become the advantages of the logit update.

The trainer runs ``draws_per_rank`` (K) sampled forwards per rank on the rank's batch (one mask draw
each), all-gathers every draw's loss and its baseline f(m0, ξ) into a :class:`StepLosses`
(identical on every rank), and asks the estimator for one advantage per draw; the logit store then
applies π ← π − lr/(RK) Σ_k a_k ∇log P(m_k) over the R·K draws, or the estimator's own
``update_rule`` for a layer when it has per-logit state. ``advantages`` and ``raw_advantages`` are
pure; after the update the trainer calls ``commit`` so the estimator can refresh its running state (a
tracker, a scale). A step with a non-finite loss is skipped before the estimator is asked, and a
step stopped before its update never commits, so state only moves, once, on steps that update.

Two kinds of state are saved in checkpoints: ``state_dict()`` (small, identical on every rank,
JSON-able: trackers, running scales) goes into the manifest; ``slice_state()`` (per-logit tensors of
this rank's slices, e.g. a per-group baseline) goes into the rank's shard beside the logits and is
re-cut by group range on resume, like the logits. See docs/architecture.md ("How to add an estimator").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from maskpro_ds.config import TrainConfig
from maskpro_ds.masks.advantages import AdvantageScaler, ResidualTracker


@dataclass(frozen=True)
class StepLosses:
    """Every draw's mean loss and baseline loss this step, over all ranks (draw index k = rank · D + d)."""

    losses: list[float]
    baselines: list[float]

    @property
    def residuals(self) -> list[float]:
        """r_k = f(m_k, ξ_k) − f(m0, ξ_k)."""
        return [f - b for f, b in zip(self.losses, self.baselines, strict=True)]


class Estimator(Protocol):
    draws_per_rank: int
    """Sampled forwards (mask draws) each rank runs per step."""

    def bind(self, layers: dict[str, tuple[int, int]]) -> None:
        """Called once with this rank's group range per masked layer (to size per-logit state)."""

    def raw_advantages(self, step: StepLosses) -> list[float]:
        """One advantage per draw before any conditioning, in loss units (what train.max_abs_advantage
        bounds); pure."""

    def advantages(self, step: StepLosses) -> list[float]:
        """One advantage per draw as the update uses it, identical on every rank; pure."""

    def update_rule(self, layer: str):
        """The update of ``layer`` this step when it is not the plain one (an object with ``apply_codes``
        and ``apply_masks``, e.g. masks/second_moment.py::SecondMomentRule); None = the plain kernel."""

    def commit(self, step: StepLosses) -> None:
        """After the update: refresh running state (e.g. the residual tracker, the running RMS)."""

    def metrics(self) -> dict[str, float]:
        """Values logged every step (e.g. ``train/delta``)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def slice_state(self) -> dict[str, torch.Tensor]:
        """Per-logit tensors ``[g, ...]`` of this rank's slices, keyed ``"<layer>/<name>"``; {} if none."""

    def load_slice_state(self, tensors: dict[str, torch.Tensor]) -> None: ...


class PolicyGradientEstimator:
    """Shared by the estimators: K draws per rank, a signal per draw, optional tracker, the scaler.

    Subclasses choose the signal (the residual or the loss) and whether the smoothed baseline δ of
    the residual tracker is subtracted. ``train.advantage_norm`` then conditions the advantages
    (none: the paper's plain update; rms or clip: docs/method.md §5).
    """

    uses_tracker = False

    def __init__(self, train: TrainConfig):
        self.draws_per_rank = train.masks_per_step
        self.tracker = ResidualTracker(alpha=train.alpha, order=train.tracker_order)
        # advantage_clip bounds |a| (loss units) under "clip" and |a / rms| under "rms"; 0 = no clip.
        # Config.validate refuses a clip under "none", where it would do nothing.
        clip = train.advantage_clip if train.advantage_clip > 0 else None
        self.scaler = AdvantageScaler(mode=train.advantage_norm, clip=clip)

    def signal(self, step: StepLosses) -> list[float]:
        return step.residuals

    def bind(self, layers: dict[str, tuple[int, int]]) -> None:
        pass

    def raw_advantages(self, step: StepLosses) -> list[float]:
        signal = self.signal(step)
        return self.tracker.advantages(signal) if self.uses_tracker else list(signal)

    def advantages(self, step: StepLosses) -> list[float]:
        return self.scaler.conditioned(self.raw_advantages(step))

    def update_rule(self, layer: str):
        return None

    def commit(self, step: StepLosses) -> None:
        self.scaler.observe(self.raw_advantages(step))  # before the tracker moves: this step's advantages
        if self.uses_tracker:
            self.tracker.update(self.signal(step))

    def metrics(self) -> dict[str, float]:
        return {"train/delta": self.tracker.delta}

    def state_dict(self) -> dict:
        return {"tracker": self.tracker.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(state["tracker"])
        self.scaler.load_state_dict(state["scaler"])

    def slice_state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_slice_state(self, tensors: dict[str, torch.Tensor]) -> None:
        pass
