"""SparseGPT's ``--save-weights``: the reconstructed weights written per block and loaded for evaluation."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from maskpro_ds.eval.masked_model import apply_weight_files
from maskpro_ds.priors.make import compute_prior
from maskpro_ds.priors.sparsegpt import SparseGPTOptions
from tests.unit.test_priors import _spec, tiny  # noqa: F401  (the module fixture)


def test_saved_weights_are_the_reconstruction_under_the_same_mask(tiny, tmp_path):  # noqa: F811
    plain, _ = compute_prior(_spec(tiny, "sparsegpt", tmp_path))
    out = tmp_path / "weights"
    masks, meta = compute_prior(_spec(tiny, "sparsegpt", tmp_path, options=SparseGPTOptions(save_weights=str(out))))
    assert all(torch.equal(masks[k], plain[k]) for k in plain)  # saving weights does not change the prior
    assert meta["sparsegpt"]["save_weights"] == str(out)
    index = json.loads((out / "weights.json").read_text())
    assert sorted(index["weight_map"]) == sorted(masks)
    assert index["pattern"] == "2:4"

    model = AutoModelForCausalLM.from_pretrained(tiny[0], dtype=torch.float32)
    original = {k: model.get_submodule(k).weight.detach().clone() for k in masks}
    assert apply_weight_files(model, out) == len(masks)
    updated = 0
    for name, mask in masks.items():
        w = model.get_submodule(name).weight.detach()
        assert torch.all(w[~mask] == 0), name  # pruned slots are zero ...
        assert not torch.equal(w, torch.where(mask, original[name], 0)), name  # ... and the kept ones moved
        updated += int((w[mask] != original[name][mask]).sum())
    assert updated > 0


def test_save_weights_refuses_an_existing_directory_and_loading_names_a_missing_index(tiny, tmp_path):  # noqa: F811
    out = tmp_path / "taken"
    out.mkdir()
    with pytest.raises(FileExistsError, match="taken"):
        compute_prior(_spec(tiny, "sparsegpt", tmp_path, options=SparseGPTOptions(save_weights=str(out))))
    model = AutoModelForCausalLM.from_pretrained(tiny[0], dtype=torch.float32)
    with pytest.raises(FileNotFoundError, match="weights.json"):
        apply_weight_files(model, out)
