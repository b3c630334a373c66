"""maskpro_ds: learn strict N:M sparsity masks for LLMs with MaskPro on DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
