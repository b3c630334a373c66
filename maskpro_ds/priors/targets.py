"""Which Linears a prior masks, and where the decoder blocks are.

Layer names are module names (``model.layers.0.self_attn.q_proj``), the same keys the mask artifact
uses. The rule matches the training config (``model.targets`` / ``include`` / ``exclude``): an
``nn.Linear`` whose name matches ``targets`` (default: inside a decoder block, so never ``lm_head``),
matches one of ``include`` when that list is non-empty, and matches none of ``exclude``. A layer
whose input dim does not divide into groups of M is skipped with a warning, or is an error when an
include regex names it explicitly.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

log = logging.getLogger(__name__)

DEFAULT_TARGETS = r"\.layers\.\d+\."
DEFAULT_EXCLUDE = (r"lm_head",)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder block list and its module-name prefix (``model.layers`` for Llama-family models)."""
    inner = getattr(model, "model", None)
    if inner is not None and isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return "model.layers", inner.layers
    # Other families: the first ModuleList whose name ends in "layers" or "h" (GPT-2 style).
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks"):
            return name, module
    raise ValueError(f"{type(model).__name__}: cannot find the decoder block list (model.layers); unsupported model")


def select_targets(
    model: nn.Module,
    m: int,
    include: list[str] | tuple[str, ...] = (),
    exclude: list[str] | tuple[str, ...] = DEFAULT_EXCLUDE,
    targets: str = DEFAULT_TARGETS,
) -> list[str]:
    """Names of the Linears to mask, in module order. Works on a meta-device model (no weights read)."""
    target_re = re.compile(targets)
    include_res = [re.compile(p) for p in include]
    exclude_res = [re.compile(p) for p in exclude]
    chosen: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if not target_re.search("." + name):  # leading dot so "^model.layers" style names match too
            continue
        if include_res and not any(r.search(name) for r in include_res):
            continue
        if any(r.search(name) for r in exclude_res):
            continue
        if module.in_features % m != 0:
            if include_res:
                raise ValueError(
                    f"--include names {name}, whose in_features={module.in_features} is not divisible by "
                    f"M={m}; exclude it (--exclude) or choose another pattern"
                )
            log.warning("skipping %s: in_features=%d is not divisible by M=%d", name, module.in_features, m)
            continue
        chosen.append(name)
    if not chosen:
        raise ValueError(
            f"no nn.Linear matched targets={targets!r} include={list(include)} exclude={list(exclude)}; "
            "check --include/--exclude"
        )
    return chosen


def targets_in_block(targets: list[str], block_prefix: str) -> list[str]:
    """The targets that live inside one decoder block (``block_prefix`` like ``model.layers.3``)."""
    return [t for t in targets if t.startswith(block_prefix + ".")]


def parse_dtype(text: str) -> torch.dtype:
    """``fp32``/``bf16``/``fp16`` (also ``float32``...) -> torch dtype; the CLI's ``--dtype``."""
    table = {
        "fp32": torch.float32, "float32": torch.float32,
        "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
        "fp16": torch.float16, "float16": torch.float16,
    }
    if text not in table:
        raise ValueError(f"--dtype must be one of fp32, bf16, fp16; got {text!r}")
    return table[text]
