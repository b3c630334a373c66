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
from maskpro_ds.masks import nm
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


def _where_packed(packed: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``where(bit i of packed, W.flat[i], +0.0)`` without a bool mask in memory (compiled below)."""
    i = torch.arange(weight.numel(), device=weight.device)
    bits = (packed[i >> 3].to(torch.int32) >> (i & 7).to(torch.int32)) & 1
    return torch.where(bits.view(weight.shape).to(torch.bool), weight, 0.0)


_compiled_where: dict[str, object] = {}  # device type -> compiled _where_packed, or None after a failure


def masked_weight(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``where(mask, W, +0.0)`` for a bool ``[out, in]`` mask or its nm.pack_bits bytes.

    Packed bits go through one compiled loop (bit lookup and select fused; a selection, so the
    result is exactly the plain one); if torch.compile is unavailable, unpack then torch.where.
    """
    zero = torch.zeros((), dtype=weight.dtype, device=weight.device)
    if mask.dtype == torch.bool:
        return torch.where(mask, weight, zero)
    kind = weight.device.type
    if kind not in _compiled_where:
        _compiled_where[kind] = torch.compile(_where_packed, dynamic=True)
    kernel = _compiled_where[kind]
    if kernel is not None:
        try:
            return kernel(mask, weight)
        except Exception as exc:  # noqa: BLE001 - any compiler/toolchain failure: use the plain path
            logger.warning("compiled masked weight failed (%s: %s); using unpack + torch.where", type(exc).__name__, exc)
            _compiled_where[kind] = None
    bits = nm.unpack_bits(mask, weight.numel()).view(weight.shape)
    return torch.where(bits, weight, zero)


class MaskedLinearForward:
    """Replacement ``forward`` for one Linear: ``F.linear(x, where(mask, W, 0), b)``.

    ZeRO-3's pre-forward hook has gathered ``W`` by the time this runs; the mask comes from
    ``mask_fn(layer_index)``: bool ``[out, in]`` or its packed bits (uint8, nm.pack_bits order).
    Pruned slots hold exactly +0.0 (:func:`masked_weight`). A plain attribute swap keeps the
    module, its parameters and DeepSpeed's hooks untouched.
    """

    def __init__(self, module: torch.nn.Linear, layer_index: int, mask_fn: Callable[[int], torch.Tensor]):
        self.module = module
        self.layer_index = layer_index
        self.mask_fn = mask_fn

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.module.weight
        return F.linear(x, masked_weight(weight, self.mask_fn(self.layer_index)), self.module.bias)


def install_masked_forward(targets: list[Target], mask_fn: Callable[[int], torch.Tensor]) -> None:
    for index, target in enumerate(targets):
        target.module.forward = MaskedLinearForward(target.module, index, mask_fn)


def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-sample mean next-token cross-entropy, reduced in fp32 -> ``[batch]``."""
    shift_logits = logits[:, :-1].float()
    shift_labels = input_ids[:, 1:]
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), reduction="none")
    return loss.view(input_ids.shape[0], -1).mean(dim=1)
