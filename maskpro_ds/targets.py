"""Which Linear layers are masked: the one selection rule shared by training and the prior tools.

A layer is a target when its module name matches the ``targets`` regex (searched in the name and
in the name with a leading dot, so ``\\.layers\\.\\d+\\.`` also matches a top-level ``layers.0.``
and ``^model\\.layers`` still matches), matches one of ``include`` when that list is non-empty, and
matches none of ``exclude``. A target whose input dim does not divide into groups of M cannot be
masked: it is returned apart, and each caller decides whether that is a warning or an error.

Pure: it sees names and full ``[out, in]`` shapes, never modules, so a ZeRO-3 partitioned model
(shape from ``ds_shape``) and a meta-device model select the same layers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence


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
    target_re = re.compile(targets)
    include_res = [re.compile(p) for p in include]
    exclude_res = [re.compile(p) for p in exclude]
    selected: list[str] = []
    skipped: list[str] = []
    for name, shape in names_and_shapes:
        if not (target_re.search(name) or target_re.search("." + name)):
            continue
        if include_res and not any(r.search(name) for r in include_res):
            continue
        if any(r.search(name) for r in exclude_res):
            continue
        (skipped if int(shape[1]) % m else selected).append(name)
    return selected, skipped
