"""MaskPro's estimator and its two ablations (docs/method.md §3): smoothed residual, residual, loss.

* ``residual_tracker`` (MaskPro): a_k = r_k − δ with δ the moving average of past residuals.
* ``residual``: a_k = r_k = f(m_k) − f(m0), no tracker (the plain-residual ablation).
* ``vanilla``: a_k = f(m_k), the loss alone (plain REINFORCE; the high-variance ablation).
"""

from __future__ import annotations

from maskpro_ds.train.estimators.base import PolicyGradientEstimator, StepLosses


class ResidualTrackerEstimator(PolicyGradientEstimator):
    uses_tracker = True


class ResidualEstimator(PolicyGradientEstimator):
    uses_tracker = False


class VanillaEstimator(PolicyGradientEstimator):
    uses_tracker = False

    def signal(self, step: StepLosses) -> list[float]:
        return list(step.losses)
