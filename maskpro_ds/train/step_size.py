"""The step-size schedule: the factor the configured lr is multiplied by at each step.

A pure function of (step, total steps) and the ``train.lr_*`` options, so a resumed run takes the
same steps as an uninterrupted one. The lr guard (lr_guard.py) still owns the base lr (a guard
halving scales the whole remaining schedule). The schedule is defined over ``train.steps``: a run
extended later with a larger ``train.steps`` follows the longer schedule from then on.
"""

from __future__ import annotations

import math

from maskpro_ds.config import TrainConfig


def lr_factor(train: TrainConfig, step: int) -> float:
    """Multiplier of ``train.lr`` at ``step`` (0-based): linear warmup, then constant, cosine or linear decay."""
    warmup = train.lr_warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if train.lr_schedule == "constant":
        return 1.0
    span = max(train.steps - warmup - 1, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)  # 0 at the first step after warmup, 1 at the last
    final = train.lr_final_ratio
    if train.lr_schedule == "cosine":
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if train.lr_schedule == "linear":
        return 1.0 - (1.0 - final) * progress
    raise ValueError(f"train.lr_schedule = {train.lr_schedule!r} is not a schedule (constant, cosine, linear)")
