"""Which Linears a prior masks, and where the decoder blocks are.

Layer names are module names (``model.layers.0.self_attn.q_proj``), the same keys the mask artifact
uses. The rule is training's (:func:`maskpro_ds.targets.match_targets`, driven by ``model.targets`` /
``include`` / ``exclude`` there and by ``--include``/``--exclude`` here; by default every Linear
inside a decoder block, so never ``lm_head``). A layer whose input dim does not divide into groups
of M is skipped with a warning, or is an error when an include regex names it explicitly.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from maskpro_ds.targets import match_targets

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
    shapes = {
        name: (module.out_features, module.in_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    }
    chosen, skipped = match_targets(shapes.items(), m, targets, include, exclude)
    if skipped and include:
        name = skipped[0]
        raise ValueError(
            f"--include names {name}, whose in_features={shapes[name][1]} is not divisible by "
            f"M={m}; exclude it (--exclude) or choose another pattern"
        )
    for name in skipped:
        log.warning("skipping %s: in_features=%d is not divisible by M=%d", name, shapes[name][1], m)
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
