"""What every prior method shares: the common spec, the inputs a method receives, the method protocol.

A method is a class with a ``name``, whether it ``needs_calibration``, an ``Options`` dataclass of
its own options (empty for most; each field's ``metadata["help"]`` becomes a ``--flag`` of
``maskpro-prior``), and ``masks(inputs, options)`` returning ``name -> bool [out, in]`` masks plus the
provenance it adds to the artifact's meta. The registry (``registry.py``) maps names to classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch

from maskpro_ds.models.lazy import ModelHandle
from maskpro_ds.models.targets import DEFAULT_EXCLUDE


@dataclass
class PriorSpec:
    """Everything a prior run shares across methods; ``options`` holds the method's own (its ``Options``)."""

    model: str
    method: str
    out: str
    pattern: str = "2:4"
    calib: str | None = None
    calib_split: str = "train"
    text_field: str = "text"
    nsamples: int = 32
    seqlen: int = 128
    add_bos: str = "auto"  # the tokenisation policy of maskpro_ds.data.windows
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    dtype: str = "fp32"
    load: str = "lazy"
    device: str = "cpu"
    batch_size: int = 8
    force: bool = False
    options: object | None = None  # an instance of the method's Options; None = its defaults


@dataclass
class PriorInputs:
    """What a method works on: the opened model, the target names, the pattern, calibration tokens."""

    handle: ModelHandle
    targets: list[str]
    n: int
    m: int
    tokens: torch.Tensor | None  # [nsamples, seqlen] when the method needs calibration, else None
    batch_size: int


@dataclass
class NoOptions:
    """A method without options of its own."""


class PriorMethod(Protocol):
    name: ClassVar[str]
    needs_calibration: ClassVar[bool]
    Options: ClassVar[type]

    def masks(self, inputs: PriorInputs, options) -> tuple[dict[str, torch.Tensor], dict]:
        """``name -> bool [out, in]`` strict N:M masks for every target, and meta entries to record."""
