"""Load a whole Hugging Face causal LM and its tokenizer for evaluation (one process, eval mode)."""

from __future__ import annotations

import os

from maskpro_ds.formats.dtypes import parse_dtype
from maskpro_ds.models.hf_dir import check_model_dir


def load_causal_lm(model_dir: str | os.PathLike, dtype: str = "fp32", device: str = "cpu", option: str = "model"):
    """(model, tokenizer) from an HF directory, in eval mode; errors name ``option``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = check_model_dir(model_dir, option)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=parse_dtype(dtype)).to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer
