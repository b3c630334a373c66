"""The one dtype table: the short names configs and command lines use, torch dtypes, safetensors names.

``fp32``/``bf16``/``fp16`` (also ``float32``/``bfloat16``/``float16``) name a compute or weight dtype
(``model.dtype``, ``--dtype``); safetensors headers name dtypes ``F32``, ``BF16``, ``U8``...; both map
to torch dtypes here and nowhere else.
"""

from __future__ import annotations

import typing

import torch

DtypeName = typing.Literal["bf16", "fp16", "fp32"]
"""The weight/compute dtypes a user can choose (``model.dtype``, ``--dtype``)."""

TORCH_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

# safetensors dtype names <-> torch dtypes (those a masked weight or a logit can have, and the rest
# only need a size because they are copied as bytes).
ST_TO_TORCH: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_TO_TORCH.items()}
ITEM_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
              "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def parse_dtype(text: str, option: str = "--dtype") -> torch.dtype:
    """``fp32``/``bf16``/``fp16`` (also ``float32``...) -> torch dtype; errors name ``option``."""
    name = _ALIASES.get(text, text)
    if name not in TORCH_DTYPES:
        raise ValueError(f"{option} must be one of {', '.join(typing.get_args(DtypeName))}; got {text!r}")
    return TORCH_DTYPES[name]
