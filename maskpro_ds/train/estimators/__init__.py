"""The estimator registry: ``train.estimator`` names one of these (protocol in ``base.py``).

Adding an estimator: one new file with its class, one line below, and its name added to the
``train.estimator`` Literal in config.py (a test checks the two agree).
"""

from __future__ import annotations

from maskpro_ds.config import TrainConfig
from maskpro_ds.train.estimators.adaptive import AdaptiveEstimator
from maskpro_ds.train.estimators.base import Estimator, StepLosses
from maskpro_ds.train.estimators.loo import LeaveOneOutEstimator
from maskpro_ds.train.estimators.residual import ResidualEstimator, ResidualTrackerEstimator, VanillaEstimator

ESTIMATORS: dict[str, type[Estimator]] = {
    "residual_tracker": ResidualTrackerEstimator,
    "residual": ResidualEstimator,
    "vanilla": VanillaEstimator,
    "loo": LeaveOneOutEstimator,
    "adaptive": AdaptiveEstimator,
}


def make_estimator(train: TrainConfig) -> Estimator:
    return ESTIMATORS[train.estimator](train)


__all__ = ["ESTIMATORS", "Estimator", "StepLosses", "make_estimator"]
