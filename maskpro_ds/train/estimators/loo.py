"""``loo``: K masks per rank on the same batch, each scored against the other K − 1 (leave-one-out).

Rank r draws K masks m_{r,1..K} for its batch ξ_r (K forwards) and gets residuals
r_{r,k} = f(m_{r,k}, ξ_r) − f(m0, ξ_r). The advantage of draw k is

    a_{r,k} = r_{r,k} − b_{r,k},   b_{r,k} = (1 − w) · mean_{j≠k} r_{r,j} + w · δ

with δ the residual tracker (docs/method.md §3) and w = ``train.loo_tracker_weight`` (default 0).
b_{r,k} does not depend on draw k (the draws are independent given π, and δ comes from earlier
steps with the default tracker order), so the estimate is unbiased for any w. With w = 0, f(m0, ξ_r)
cancels (a_{r,k} = f(m_{r,k}) − mean_{j≠k} f(m_{r,j})): the batch's difficulty and the part of the
mask effect the draws share both drop out, which the scalar tracker cannot do. f(m0) still enters
through δ (w > 0), the K = 1 fall-back, the lr guard and the logged residuals, and it is free (the
cached pass). With K = 1 there is no other draw: a = r − δ, exactly ``residual_tracker``.

The leave-one-out stays within a rank: draws of other ranks saw other batches. The tracker is
refreshed with the mean residual of every draw either way, so switching w or K keeps δ meaningful.
"""

from __future__ import annotations

from maskpro_ds.config import TrainConfig
from maskpro_ds.train.estimators.base import PolicyGradientEstimator, StepLosses


def leave_one_out(residuals: list[float], k: int) -> list[float]:
    """mean_{j≠i} r_j within each consecutive block of ``k`` (one rank's draws), for every i."""
    if k < 2 or len(residuals) % k:
        raise ValueError(f"leave_one_out: need k >= 2 dividing {len(residuals)} residuals, got k={k}")
    out = []
    for start in range(0, len(residuals), k):
        block = residuals[start:start + k]
        for i in range(k):
            out.append(sum(r for j, r in enumerate(block) if j != i) / (k - 1))
    return out


class LeaveOneOutEstimator(PolicyGradientEstimator):
    uses_tracker = True

    def __init__(self, train: TrainConfig):
        super().__init__(train)
        self.tracker_weight = float(train.loo_tracker_weight)

    def raw_advantages(self, step: StepLosses) -> list[float]:
        residuals = step.residuals
        tracked = self.tracker.advantages(residuals)  # r − δ
        if self.draws_per_rank == 1:
            return tracked
        others = leave_one_out(residuals, self.draws_per_rank)
        loo = [r - b for r, b in zip(residuals, others, strict=True)]
        w = self.tracker_weight
        if w == 0.0:
            return loo
        return [(1.0 - w) * a + w * t for a, t in zip(loo, tracked, strict=True)]
