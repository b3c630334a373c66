"""Which Linear layers are masked: the one selection rule shared by training, the priors and export.

A layer is a target when its module name matches the ``targets`` regex (searched in the name and
in the name with a leading dot, so ``\\.layers\\.\\d+\\.`` also matches a top-level ``layers.0.``
and ``^model\\.layers`` still matches), matches one of ``include`` when that list is non-empty, and
matches none of ``exclude``. A target whose input dim does not divide into groups of M cannot be
masked: it is skipped with a warning, or is an error when an ``include`` regex names it explicitly.

Shapes come from ``out_features``/``in_features``, never from the weight tensor, so a ZeRO-3
partitioned model (whose weights are empty outside a gather) and a meta-device model select the
same layers. The same file knows where the decoder blocks are (the priors work block by block).

Fused MoE experts (transformers 5 keeps Mixtral's, Qwen-MoE's, OLMoE's experts as one 3-D
parameter such as ``mlp.experts.gate_up_proj [E, 2I, H]``, not as Linears) are refused: a fused
parameter the rule would pick is an error naming it and the ``exclude`` that leaves the experts
dense (docs/architectures.md says why).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

log = logging.getLogger(__name__)

DEFAULT_TARGETS = r"\.layers\.\d+\."
DEFAULT_EXCLUDE = (r"lm_head",)


@dataclass
class Target:
    """One masked Linear: its module name, module, and full ``[out, in]`` shape."""

    name: str
    module: nn.Linear
    shape: tuple[int, int]


def match_targets(
    names_and_shapes: Iterable[tuple[str, Sequence[int]]],
    m: int,
    targets: str,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> tuple[list[str], list[str]]:
    """``(selected, skipped)`` names, in input order, of the Linears the rule picks.

    ``names_and_shapes`` holds every candidate Linear's module name and full ``[out, in]`` weight
    shape. ``skipped`` are the layers the rule picks whose ``in`` is not divisible by ``m``.
    """
    picks = _rule(targets, include, exclude)
    selected: list[str] = []
    skipped: list[str] = []
    for name, shape in names_and_shapes:
        if picks(name):
            (skipped if int(shape[1]) % m else selected).append(name)
    return selected, skipped


def _rule(targets: str, include: Sequence[str], exclude: Sequence[str]):
    """``name -> bool``: the targets/include/exclude rule of the module docstring."""
    target_re = re.compile(targets)
    include_res = [re.compile(p) for p in include]
    exclude_res = [re.compile(p) for p in exclude]

    def picks(name: str) -> bool:
        if not (target_re.search(name) or target_re.search("." + name)):
            return False
        if include_res and not any(r.search(name) for r in include_res):
            return False
        return not any(r.search(name) for r in exclude_res)

    return picks


def refuse_fused_experts(model: nn.Module, targets: str, include: Sequence[str], exclude: Sequence[str]) -> None:
    """Raise if the rule picks a fused (3-D or more) weight parameter: masking those is not supported."""
    picks = _rule(targets, include, exclude)
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            continue
        for param_name, param in module.named_parameters(recurse=False):
            shape = tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3 keeps the full shape in ds_shape
            name = f"{module_name}.{param_name}" if module_name else param_name
            if len(shape) < 3 or not picks(name):
                continue
            leaf = re.escape("." + module_name.split(".")[-1] + ".")
            raise ValueError(
                f"{name} is a fused {len(shape)}-D weight {list(shape)} ({type(module).__name__}: the experts of an "
                "MoE layer stored as one tensor), and masking fused experts is not supported. Leave them dense by "
                f"adding '{leaf}' to model.exclude (CLIs: --exclude '{leaf}'); see docs/architectures.md")


def select_targets(
    model: nn.Module,
    m: int,
    targets: str = DEFAULT_TARGETS,
    include: Sequence[str] = (),
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> list[Target]:
    """The Linears to mask, in module order (config: ``model.targets/include/exclude``; CLIs: ``--include/--exclude``)."""
    refuse_fused_experts(model, targets, include, exclude)
    linears = {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    shapes = {name: (int(mod.out_features), int(mod.in_features)) for name, mod in linears.items()}
    chosen, skipped = match_targets(shapes.items(), m, targets, include, exclude)
    if skipped and include:
        name = skipped[0]
        raise ValueError(f"include names {name}, whose input dim {shapes[name][1]} is not divisible by M={m}; "
                         "exclude it or choose another pattern")
    if skipped:
        log.warning("skipping %d layers whose input dim is not divisible by M=%d: %s", len(skipped), m,
                    ", ".join(f"{n} (in={shapes[n][1]})" for n in skipped))
    if not chosen:
        raise ValueError(f"no nn.Linear matches targets={targets!r} include={list(include)} "
                         f"exclude={list(exclude)} with an input dim divisible by {m}")
    return [Target(name=n, module=linears[n], shape=shapes[n]) for n in chosen]


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


def targets_in_block(targets: list[str], block_prefix: str) -> list[str]:
    """The targets that live inside one decoder block (``block_prefix`` like ``model.layers.3``)."""
    return [t for t in targets if t.startswith(block_prefix + ".")]
