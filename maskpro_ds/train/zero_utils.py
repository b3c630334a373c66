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


def stored_chunks(param: torch.nn.Parameter) -> list[tuple[torch.Tensor, int]]:
    """Every flat slice of ``param`` this rank stores, as ``(destination, first flat index)``.

    A ZeRO-3 parameter stores ``ds_tensor``: its partition rank's contiguous chunk of the flattened
    parameter (``ds_numel_aligned / world`` elements, the last chunk padded), plus, with hpZ, the same
    layout over the hpZ group in ``ds_secondary_tensor``. Writing these slices directly fills the
    parameter without ever materialising it. A plain tensor is one chunk starting at 0.
    """
    if not is_zero3_param(param):
        return [(param.data.view(-1), 0)]
    from deepspeed import comm as dist
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if param.ds_status is not ZeroParamStatus.NOT_AVAILABLE:
        raise RuntimeError(f"parameter {param.ds_id} is gathered; fill partitions only while released")
    if getattr(param.ds_tensor, "final_location", None) is not None or hasattr(param.ds_tensor, "ds_quant_scale"):
        raise ValueError("loading weights into NVMe-offloaded or quantized ZeRO-3 partitions is not supported; "
                         "disable zero offload_param / zero_quantized_nontrainable_weights")
    chunks = []
    primary = param.ds_tensor.data
    chunks.append((primary, primary.numel() * dist.get_rank(group=param.ds_process_group)))
    secondary = getattr(param, "ds_secondary_tensor", None)
    if secondary is not None:
        group = param.ds_zero_param_process_group
        chunks.append((secondary.data, secondary.numel() * dist.get_rank(group=group)))
    return chunks
