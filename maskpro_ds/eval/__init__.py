"""Evaluation: token perplexity (SparseGPT/Wanda protocol), zero-shot multiple choice, masks on the fly."""

from maskpro_ds.eval.masked_model import apply_mask_artifact
from maskpro_ds.eval.perplexity import PerplexityResult, perplexity
from maskpro_ds.eval.zeroshot import evaluate_multiple_choice, load_bigbench_task
from maskpro_ds.models.dense import load_causal_lm

__all__ = [
    "PerplexityResult", "apply_mask_artifact", "evaluate_multiple_choice", "load_bigbench_task",
    "load_causal_lm", "perplexity",
]
