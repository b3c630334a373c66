"""``adaptive``: the ``loo`` advantages with per-logit adaptive steps (masks/second_moment.py).

Each logit's update is divided by sqrt of a running second moment of its own past updates (plus
``train.adaptive_eps``), decay ``train.adaptive_beta``. The state is one fp32 per weight, held for
this rank's slices only, saved in every checkpoint beside the logits (``<layer>/second_moment``) and
re-cut by group range on resume, like the logits; the number of updates so far (for the bias
correction) goes into the manifest. A layer's state is created on its first update (zeros), so a
checkpoint written before any update holds none and resumes to the same zeros.

Memory: 4 bytes per masked weight over all ranks together, on top of the logits' 4 (8 in all).
"""

from __future__ import annotations

import torch

from maskpro_ds.config import TrainConfig
from maskpro_ds.masks.second_moment import SecondMomentRule
from maskpro_ds.train.estimators.loo import LeaveOneOutEstimator

SUFFIX = "/second_moment"


class _LayerRule:
    """The store-facing rule of one layer: finds (or creates) the layer's state, then updates it."""

    def __init__(self, owner: AdaptiveEstimator, layer: str):
        self.owner, self.layer = owner, layer

    def _rule(self, logits: torch.Tensor) -> SecondMomentRule:
        state = self.owner.second.get(self.layer)
        if state is None:
            state = torch.zeros_like(logits, dtype=torch.float32)
        elif state.device != logits.device:
            state = state.to(logits.device)
        self.owner.second[self.layer] = state
        return SecondMomentRule(state, self.owner.beta, self.owner.eps, self.owner.updates)

    def apply_codes(self, logits, codes, advantages, lr):
        return self._rule(logits).apply_codes(logits, codes, advantages, lr)

    def apply_masks(self, logits, masks, advantages, lr, n):
        return self._rule(logits).apply_masks(logits, masks, advantages, lr, n)


class AdaptiveEstimator(LeaveOneOutEstimator):
    def __init__(self, train: TrainConfig):
        super().__init__(train)
        self.beta, self.eps = float(train.adaptive_beta), float(train.adaptive_eps)
        self.second: dict[str, torch.Tensor] = {}
        self.updates = 0

    def update_rule(self, layer: str) -> _LayerRule:
        return _LayerRule(self, layer)

    def commit(self, step) -> None:
        super().commit(step)
        self.updates += 1

    def state_dict(self) -> dict:
        return {**super().state_dict(), "second_moment_updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.updates = int(state.get("second_moment_updates", 0))

    def slice_state(self) -> dict[str, torch.Tensor]:
        return {layer + SUFFIX: v for layer, v in self.second.items()}

    def load_slice_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.second = {key[:-len(SUFFIX)]: t.to(torch.float32) for key, t in tensors.items() if key.endswith(SUFFIX)}
