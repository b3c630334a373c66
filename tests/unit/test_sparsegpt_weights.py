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


def test_fixed_mask_reconstructs_the_weights_of_a_given_mask(tiny, tmp_path):  # noqa: F811
    from maskpro_ds.priors.make import make_prior

    magnitude = make_prior(_spec(tiny, "magnitude", tmp_path))
    chosen, _ = compute_prior(_spec(tiny, "magnitude", tmp_path / "again"))
    out = tmp_path / "reconstructed"
    masks, _ = compute_prior(_spec(tiny, "sparsegpt", tmp_path, options=SparseGPTOptions(
        fixed_mask=str(magnitude), save_weights=str(out))))
    assert all(torch.equal(masks[k], chosen[k]) for k in chosen)  # the given mask, not SparseGPT's own
    model = AutoModelForCausalLM.from_pretrained(tiny[0], dtype=torch.float32)
    original = {k: model.get_submodule(k).weight.detach().clone() for k in masks}
    apply_weight_files(model, out)
    for name, mask in masks.items():
        w = model.get_submodule(name).weight.detach()
        assert torch.all(w[~mask] == 0), name
        assert not torch.equal(w[mask], original[name][mask]), name  # kept weights reconstructed


def test_fixed_mask_with_another_pattern_is_refused(tiny, tmp_path):  # noqa: F811
    from maskpro_ds.priors.make import make_prior

    four_eight = make_prior(_spec(tiny, "magnitude", tmp_path, pattern="4:8"))
    with pytest.raises(ValueError, match="4:8"):
        compute_prior(_spec(tiny, "sparsegpt", tmp_path, options=SparseGPTOptions(fixed_mask=str(four_eight))))


def test_fixed_mask_equal_to_sparsegpts_own_gives_its_weights_bit_for_bit(tiny, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    from maskpro_ds.priors.base import PriorSpec  # noqa: F401  (the spec type _spec builds)
    from maskpro_ds.priors.make import make_prior

    own = make_prior(_spec(tiny, "sparsegpt", tmp_path, options=SparseGPTOptions(save_weights=str(tmp_path / "w1"))))
    compute_prior(_spec(tiny, "sparsegpt", tmp_path / "b", options=SparseGPTOptions(
        fixed_mask=str(own), save_weights=str(tmp_path / "w2"))))
    files = sorted(p.name for p in (tmp_path / "w1").glob("*.safetensors"))
    assert files == sorted(p.name for p in (tmp_path / "w2").glob("*.safetensors"))
    for name in files:
        a, b = load_file(tmp_path / "w1" / name), load_file(tmp_path / "w2" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
