"""Prior N:M masks for MaskPro's initialisation: magnitude, Wanda, SparseGPT, a pruned checkpoint.

Every prior is a mask over the ORIGINAL weights (method.md §2), written as a mask artifact
(maskpro_ds.artifacts). Calibrated methods run block by block with one decoder block resident.
"""

from maskpro_ds.priors.make import METHODS, PriorSpec, compute_prior, make_prior

__all__ = ["METHODS", "PriorSpec", "compute_prior", "make_prior"]
