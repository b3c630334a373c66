"""Prior N:M masks for MaskPro's initialisation: magnitude, Wanda, SparseGPT, a pruned checkpoint.

Every prior is a mask over the ORIGINAL weights (docs/method.md §2), written as a mask artifact
(maskpro_ds.formats.mask_artifact). Methods are classes registered in ``registry.py`` (protocol in
``base.py``); calibrated methods run block by block with one decoder block resident (``calibration.py``).
"""
