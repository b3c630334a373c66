"""Priors on the real SmolLM2-135M demo model with real Wikipedia calibration text.

On real layers the three priors must order as the literature says by layer-wise reconstruction
error ||W X − Ŵ X|| over the calibration activations: SparseGPT (mask plus its weight update) ≤
Wanda (mask only) ≤ magnitude (mask only). The whole-model runs check that each prior covers all
210 decoder Linears strictly and that the calibrated priors beat magnitude on held-out perplexity.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from maskpro_ds.eval.perplexity import perplexity
from maskpro_ds.masks.nm import magnitude_prior, topn_mask, validate_nm
from maskpro_ds.priors.base import PriorSpec
from maskpro_ds.priors.calibration import calibration_tokens
from maskpro_ds.priors.make import compute_prior
from maskpro_ds.priors.sparsegpt import sparsegpt_prune
from maskpro_ds.priors.wanda import wanda_scores

N, M = 2, 4
LAYERS = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.mlp.down_proj",
    "model.layers.7.self_attn.o_proj",
    "model.layers.15.mlp.up_proj",
    "model.layers.29.self_attn.v_proj",
    "model.layers.29.mlp.down_proj",
]


@pytest.fixture(scope="module")
def real(demo_assets):
    model = AutoModelForCausalLM.from_pretrained(demo_assets.model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(demo_assets.model_dir)
    tokens = calibration_tokens(tok, demo_assets.calib_text.read_text(encoding="utf-8"), 32, 128)
    return model, tok, tokens


def test_reconstruction_error_sparsegpt_le_wanda_le_magnitude(real):
    model, _, tokens = real
    inputs = {name: [] for name in LAYERS}
    hooks = [model.get_submodule(n).register_forward_hook(lambda _m, i, _o, n=n: inputs[n].append(i[0]))
             for n in LAYERS]
    with torch.no_grad():
        for batch in tokens.split(8):
            model(input_ids=batch)
    for h in hooks:
        h.remove()
    for name in LAYERS:
        w = model.get_submodule(name).weight.detach()
        x = torch.cat(inputs[name]).reshape(-1, w.shape[1])  # 4096 calibration tokens
        hessian = 2 * x.t() @ x / x.shape[0]
        sgpt_mask, sgpt_w = sparsegpt_prune(w, hessian, N, M)
        wanda_mask = topn_mask(wanda_scores(w, x.double().pow(2).sum(0)), N, M)
        mag_mask = magnitude_prior(w, N, M)

        def err(w_hat, x=x, w=w):
            return float(torch.linalg.norm(x @ (w - w_hat).t()))

        e_sgpt = err(sgpt_w)
        e_wanda = err(torch.where(wanda_mask, w, 0))
        e_mag = err(torch.where(mag_mask, w, 0))
        assert validate_nm({"s": sgpt_mask, "w": wanda_mask}, N, M).ok
        assert e_sgpt < e_wanda < e_mag, (name, e_sgpt, e_wanda, e_mag)


@pytest.mark.slow
def test_all_priors_over_the_real_model(demo_assets, real, tmp_path):
    """~5 minutes on 2 cores: each prior over 210 Linears, then held-out perplexity of each."""
    model, tok, _ = real
    heldout = demo_assets.heldout_text.read_text(encoding="utf-8")
    ppl = {"dense": perplexity(model, tok, heldout, seqlen=512, max_tokens=8192).ppl}
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        for method in ("magnitude", "wanda", "sparsegpt"):
            spec = PriorSpec(model=str(demo_assets.model_dir), method=method, out=str(tmp_path / method),
                             calib=str(demo_assets.calib_text), nsamples=32, seqlen=128)
            masks, _ = compute_prior(spec)
            assert len(masks) == 210 and validate_nm(masks, N, M).ok
            with torch.no_grad():
                for name, mask in masks.items():
                    model.get_submodule(name).weight.copy_(torch.where(mask, original[name + ".weight"], 0))
            ppl[method] = perplexity(model, tok, heldout, seqlen=512, max_tokens=8192).ppl
    finally:  # the model is shared by the module's tests
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(original[n])
    assert ppl["dense"] < ppl["sparsegpt"] < ppl["magnitude"]
    assert ppl["dense"] < ppl["wanda"] < ppl["magnitude"] / 3
