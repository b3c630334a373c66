"""The model side of training: the DeepSpeed config, the frozen HF causal LM partitioned by ZeRO-3,
and the masked Linear forward.

The base is built partitioned from the start (``zero.Init`` via ``HfDeepSpeedConfig``), filled
from its safetensors files one tensor at a time (random init for config-only directories), frozen, and wrapped by
``deepspeed.initialize`` without an optimizer: ZeRO-3's gather/release hooks are all we use. A
masked Linear computes ``x @ where(m, W, 0)ᵀ`` right after ZeRO-3 gathered W, with the mask given
by a provider (the logit store) for the current step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from maskpro_ds.config import Config
from maskpro_ds.formats.dtypes import TORCH_DTYPES
from maskpro_ds.models.hf_dir import check_model_dir, has_weights
from maskpro_ds.models.targets import Target

logger = logging.getLogger(__name__)


def build_ds_config(cfg: Config, world_size: int) -> dict:
    """The one place our config becomes a DeepSpeed config (ZeRO-3, no optimizer, frozen weights)."""
    z = cfg.zero
    zero = {
        "stage": 3,
        "stage3_param_persistence_threshold": z.param_persistence_threshold,
        "stage3_prefetch_bucket_size": z.prefetch_bucket_size,
        "stage3_max_live_parameters": z.max_live_parameters,
        "stage3_max_reuse_distance": z.max_live_parameters,
    }
    if z.hpz_partition_size > 1:
        if world_size % z.hpz_partition_size:
            raise ValueError(f"zero.hpz_partition_size={z.hpz_partition_size} must divide the world size {world_size}")
        zero["zero_hpz_partition_size"] = z.hpz_partition_size
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.data.batch_size * world_size,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.model.dtype == "bf16"},
        "fp16": {"enabled": cfg.model.dtype == "fp16", "auto_cast": False},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def load_partitioned_model(cfg: Config, ds_config: dict) -> tuple[object, torch.nn.Module]:
    """Load (or build) the frozen model partitioned by ZeRO-3; returns (deepspeed engine, module).

    The model is built from its config.json inside ``zero.Init`` (each module partitioned as soon as
    it is constructed), then each rank copies its own slice of every parameter straight from the
    safetensors files (:mod:`maskpro_ds.weights_loader`). Host memory per process: its partitions
    plus one parameter's rows in flight, never the whole model (transformers' ``from_pretrained``
    under ZeRO-3 reads the full state dict on rank 0).
    """
    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from maskpro_ds.train.weights_loader import load_weights

    model_dir = check_model_dir(cfg.model.path, "model.path")
    dtype = TORCH_DTYPES[cfg.model.dtype]
    # HfDeepSpeedConfig must stay alive while the model is built: it is how transformers knows to
    # construct it inside zero.Init (with RoPE buffers kept in their own dtype).
    hf_ds_config = HfDeepSpeedConfig(ds_config)
    hf_config = AutoConfig.from_pretrained(str(model_dir))
    weights = has_weights(model_dir)
    if not weights:
        logger.warning("%s has no weight files: building a randomly initialised model (seed %d)",
                       model_dir, cfg.model.init_seed)
    torch.manual_seed(cfg.model.init_seed)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    if weights:
        load_weights(model, model_dir)
    model.eval()
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    del hf_ds_config
    return engine, model


# Raw-bit integer dtype of a weight by element size: the select below works on bits, not values.
_RAW_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_select_tables: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _select_table(raw_dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[256, 8]`` of ``raw_dtype``: row b holds all ones (-1) at column j where bit j of b is set, else 0.

    Indexing it with packed mask bytes (nm.pack_bits order: bit j of byte k is weight 8k + j) gives
    one AND-mask element per weight, in the weight's own raw-bit dtype."""
    key = (raw_dtype, device)
    if key not in _select_tables:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        _select_tables[key] = (-bits).to(raw_dtype).to(device)
    return _select_tables[key]


def masked_weight(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``where(mask, W, +0.0)`` for a bool ``[out, in]`` mask or its nm.pack_bits bytes.

    Packed bits: a 256-row table lookup turns each mask byte into eight all-ones-or-zero words of
    the weight's width, and a bitwise AND with the weight's raw bits keeps every kept value bit for
    bit (-0.0 and NaN included) and clears the pruned ones to +0.0: exactly the ``where``, in two
    vectorised passes with no float operation and no compile step (6x faster on CPU than a compiled
    bit-extract-and-select loop, which does not vectorise its byte gather).
    """
    if mask.dtype == torch.bool:
        return torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))
    numel = weight.numel()
    if mask.numel() != (numel + 7) // 8:
        raise ValueError(f"masked_weight: {mask.numel()} mask bytes for a weight of {numel} elements")
    raw_dtype = _RAW_BITS[weight.element_size()]
    keep = _select_table(raw_dtype, weight.device).index_select(0, mask.to(torch.int32)).reshape(-1)[:numel]
    raw = weight.contiguous().reshape(-1).view(raw_dtype)
    return torch.bitwise_and(raw, keep).view(weight.dtype).view(weight.shape)


class MaskedLinearForward:
    """Replacement ``forward`` for one Linear: ``F.linear(x, where(mask, W, 0), b)``.

    ZeRO-3's pre-forward hook has gathered ``W`` by the time this runs; the mask comes from
    ``mask_fn(layer_index)``: bool ``[out, in]`` or its packed bits (uint8, nm.pack_bits order).
    Pruned slots hold exactly +0.0 (:func:`masked_weight`). A plain attribute swap keeps the
    module, its parameters and DeepSpeed's hooks untouched.
    """

    def __init__(self, module: torch.nn.Linear, layer_index: int, mask_fn: Callable[[int], torch.Tensor],
                 credit=None):
        self.module = module
        self.layer_index = layer_index
        self.mask_fn = mask_fn
        self.credit = credit  # train/layer_credit.py: sees W, X and the mask while W is gathered

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.module.weight
        mask = self.mask_fn(self.layer_index)
        if self.credit is not None:
            self.credit.collect(self.layer_index, weight, x, mask)
        return F.linear(x, masked_weight(weight, mask), self.module.bias)


def install_masked_forward(targets: list[Target], mask_fn: Callable[[int], torch.Tensor], credit=None) -> None:
    for index, target in enumerate(targets):
        target.module.forward = MaskedLinearForward(target.module, index, mask_fn, credit)


def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-sample mean next-token cross-entropy, reduced in fp32 -> ``[batch]``."""
    shift_logits = logits[:, :-1].float()
    shift_labels = input_ids[:, 1:]
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), reduction="none")
    return loss.view(input_ids.shape[0], -1).mean(dim=1)
