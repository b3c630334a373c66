"""The prior methods ``maskpro-prior --method`` knows; adding one is a new file and one line here."""

from __future__ import annotations

from maskpro_ds.priors.base import PriorMethod
from maskpro_ds.priors.from_checkpoint import FromCheckpointPrior
from maskpro_ds.priors.magnitude import MagnitudePrior
from maskpro_ds.priors.sparsegpt import SparseGPTPrior
from maskpro_ds.priors.swap import SwapPrior
from maskpro_ds.priors.wanda import WandaPrior

PRIOR_METHODS: dict[str, type[PriorMethod]] = {cls.name: cls for cls in (
    MagnitudePrior,
    WandaPrior,
    SparseGPTPrior,
    FromCheckpointPrior,
    SwapPrior,
)}
METHODS = tuple(PRIOR_METHODS)
