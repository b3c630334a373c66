"""Checkpoints that transformers converts at load time, read by our own loaders, and fused experts refused.

Reference: ``from_pretrained``, which applies transformers' conversions (per-expert MoE tensors
stacked into fused 3-D parameters, Mixtral's ``block_sparse_moe`` renamed to ``mlp``). The lazy
block loader of the priors and the partition loader of training (run here on a plain model: it
fills any model, partitioned or not) must produce the same tensors, bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from maskpro_ds.models.checkpoint_layout import CheckpointLayout
from maskpro_ds.models.hf_dir import weight_map
from maskpro_ds.models.lazy import open_causal_lm
from maskpro_ds.models.targets import select_targets
from maskpro_ds.train.weights_loader import load_weights
from tests.archs import MOE_EXCLUDE, MOE_FAMILIES, make_arch


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {arch: make_arch(arch, root / arch) for arch in MOE_FAMILIES}


def reference_state(model_dir) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).state_dict()


@pytest.mark.parametrize("arch", MOE_FAMILIES)
def test_lazy_blocks_equal_from_pretrained(moe_models, arch):
    want = reference_state(moe_models[arch])
    handle = open_causal_lm(moe_models[arch], lazy=True)
    fused = [k for k in handle.layout.converted]
    assert fused and all(".experts." in k for k in fused)  # the per-expert files really are converted
    for index in range(len(handle.layers)):
        block = handle.materialize_block(index)
        for key, value in block.state_dict().items():
            assert torch.equal(value, want[f"{handle.layers_prefix}.{index}.{key}"]), key
        handle.release_block(index)
    assert handle.layout.unused == []  # every file tensor has a home


@pytest.mark.parametrize("arch", MOE_FAMILIES)
def test_partition_loader_equals_from_pretrained(moe_models, arch):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(moe_models[arch])))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))  # anything not filled from the files shows
    load_weights(model, moe_models[arch])
    want = reference_state(moe_models[arch])
    for key, value in model.state_dict().items():
        assert torch.equal(value, want[key]), key


def test_layout_of_a_plain_checkpoint_is_the_identity(tmp_path):
    model_dir = make_arch("llama", tmp_path / "llama")
    handle = open_causal_lm(model_dir, lazy=True)
    layout = CheckpointLayout(handle.model, list(weight_map(model_dir)))
    assert layout.converted == {} and layout.unused == []
    assert all(model_key == file_key for model_key, file_key in layout.direct.items())


def test_fused_experts_are_refused_with_the_exclude_to_use(moe_models):
    handle = open_causal_lm(moe_models["qwen2_moe"], lazy=True)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj is a fused 3-D weight "
                                         r"\[4, 64, 64\].*masking fused experts is not supported.*\\\.experts\\\."):
        select_targets(handle.model, 4)
    chosen = [t.name for t in select_targets(handle.model, 4, exclude=["lm_head", MOE_EXCLUDE])]
    assert chosen and not any(".experts." in name for name in chosen)
    assert any("shared_expert." in name for name in chosen) and any("self_attn" in name for name in chosen)
