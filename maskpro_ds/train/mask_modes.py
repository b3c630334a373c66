"""Which mask a masked forward uses: a typed mode, set for the duration of one forward.

* :class:`SampleMode` (step t, draw d): every rank draws its own mask m_{r,d} ~ p(·|π) with the
  counter-based sampler keyed by (seed, t, slot, layer), slot = r·K + d for K draws per rank and
  step (K = 1: slot = rank); the update later regenerates the same R·K masks.
* :data:`PRIOR`: the prior mask m0 (the baseline forward f(m0, ξ)).
* :data:`FINAL`: the final top-N mask of the current logits (held-out evaluation, export).

The logit store's ``LogitStore.drawing(mode)`` context manager makes a mode active for the masked
Linears' forward; outside it a masked forward is an error, so no code path inherits a stale mode.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SampleMode:
    step: int
    draw: int = 0
    """Which of the rank's K draws of this step (several masks on the same batch)."""


@dataclass(frozen=True)
class PriorMode:
    pass


@dataclass(frozen=True)
class FinalMode:
    pass


MaskMode = SampleMode | PriorMode | FinalMode
PRIOR = PriorMode()
FINAL = FinalMode()
