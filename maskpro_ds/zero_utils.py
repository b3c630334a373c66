"""Every touch of ZeRO-3 internals lives here (``ds_tensor``, ``ds_shape``, ``GatheredParameters``).

The rest of the code asks these helpers for a parameter's full shape, its local partition size, or
a short-lived gathered view; so a DeepSpeed upgrade that renames an attribute changes one file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def is_zero3_param(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


def full_shape(param: torch.nn.Parameter) -> tuple[int, ...]:
    """Logical shape of a parameter, partitioned or not (a partitioned one has an empty ``.shape``)."""
    return tuple(param.ds_shape) if is_zero3_param(param) else tuple(param.shape)


def full_numel(param: torch.nn.Parameter) -> int:
    return int(param.ds_numel) if is_zero3_param(param) else param.numel()


def local_numel(param: torch.nn.Parameter) -> int:
    """Elements this rank stores for the parameter outside a gather (its ZeRO-3 partition)."""
    return int(param.ds_tensor.numel()) if is_zero3_param(param) else param.numel()


def zero_partition(param: torch.nn.Parameter) -> torch.Tensor:
    """This rank's stored slice of a parameter (the whole tensor when it is not partitioned)."""
    return param.ds_tensor.data if is_zero3_param(param) else param.data


def is_released(param: torch.nn.Parameter) -> bool:
    """True when a ZeRO-3 parameter currently holds no full copy on this rank (``.data`` is empty)."""
    return is_zero3_param(param) and param.data.numel() == 0


@contextlib.contextmanager
def gathered(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Temporarily materialise full parameters (read-only); a no-op for plain tensors.

    Only used outside the forward (prior init, inspection): one layer at a time, so no rank ever
    holds more than one layer's weights beyond its own partition.
    """
    zero_params = [p for p in params if is_zero3_param(p)]
    if not zero_params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(zero_params, modifier_rank=None):
        yield
