"""Priors on a tiny random Llama (hidden 64, intermediate 128, 2 layers, vocab 128).

Every prior must be strict 2:4; Wanda is checked against a direct computation with plain forward
hooks on the full model; SparseGPT against a naive OBS that inverts every trailing Hessian
explicitly; from-checkpoint must recover a known mask from both the plain and the
compressed-tensors sparse-24-bitmask layouts (the latter built by hand with numpy.packbits).
"""

from __future__ import annotations

import json
import string

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from maskpro_ds.cli.prior import main as prior_main
from maskpro_ds.formats.mask_artifact import read_mask_artifact
from maskpro_ds.masks.nm import magnitude_prior, validate_nm
from maskpro_ds.models.lazy import open_causal_lm
from maskpro_ds.models.targets import select_targets as select_target_modules
from maskpro_ds.priors.base import PriorSpec
from maskpro_ds.priors.calibration import calibration_tokens
from maskpro_ds.priors.from_checkpoint import masks_from_checkpoint, strict_from_kept
from maskpro_ds.priors.make import compute_prior
from maskpro_ds.priors.sparsegpt import sparsegpt_prune
from maskpro_ds.priors.wanda import wanda_masks
from tests.unit.char_tokenizer import char_tokenizer

N, M = 2, 4


def make_model_dir(path, intermediate=128, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("priors")
    model_dir = make_model_dir(root / "model")
    rng = np.random.default_rng(0)
    words = "the of and to in a is that for it as was with be by on not he this are".split()
    calib = root / "calib.txt"
    calib.write_text("\n\n".join(" ".join(rng.choice(words, 150)) for _ in range(12)))
    return model_dir, calib


def _spec(tiny, method, tmp_path, **kw):
    model_dir, calib = tiny
    return PriorSpec(model=str(model_dir), method=method, out=str(tmp_path / method), calib=str(calib),
                     nsamples=8, seqlen=32, batch_size=3, **kw)


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_every_prior_is_strict_nm_over_all_decoder_linears(tiny, tmp_path, method, pattern):
    masks, meta = compute_prior(_spec(tiny, method, tmp_path, pattern=pattern))
    assert len(masks) == 14  # 2 blocks x (q, k, v, o, gate, up, down); lm_head is not a target
    assert all(".layers." in name for name in masks)
    n, m = (int(v) for v in pattern.split(":"))
    assert validate_nm(masks, n, m).ok
    assert meta["method"] == method
    if method == "magnitude":
        assert meta["calib"] is None
    else:
        assert meta["calib"]["tokens"] == 8 * 32


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_lazy_loading_gives_the_same_masks_as_eager(tiny, tmp_path, method):
    lazy, _ = compute_prior(_spec(tiny, method, tmp_path, load="lazy"))
    eager, _ = compute_prior(_spec(tiny, method, tmp_path, load="eager"))
    assert lazy.keys() == eager.keys()
    for name in lazy:
        assert torch.equal(lazy[name], eager[name]), name


def test_lazy_handle_holds_one_block_at_a_time(tiny):
    model_dir, _ = tiny
    handle = open_causal_lm(model_dir, lazy=True)
    assert all(p.is_meta for p in handle.layers.parameters())  # nothing of the blocks read yet
    handle.materialize_block(1)
    assert not any(p.is_meta for p in handle.layers[1].parameters())
    assert all(p.is_meta for p in handle.layers[0].parameters())
    ref = load_file(str(model_dir / "model.safetensors"))["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(handle.layers[1].mlp.down_proj.weight, ref)
    handle.release_block(1)
    assert all(p.is_meta for p in handle.layers.parameters())


def test_magnitude_prior_is_top2_abs_weight(tiny, tmp_path):
    masks, _ = compute_prior(_spec(tiny, "magnitude", tmp_path))
    weights = load_file(str(tiny[0] / "model.safetensors"))
    for name, mask in masks.items():
        w = weights[name + ".weight"].abs().reshape(-1, M)
        expected = torch.zeros_like(w, dtype=torch.bool)
        expected.scatter_(1, torch.argsort(w, dim=1, descending=True)[:, :N], True)  # no ties in random weights
        assert torch.equal(mask.reshape(-1, M), expected), name


def test_wanda_matches_a_direct_computation_with_sequential_pruning(tiny):
    """Collect X with plain forward hooks on the full model; block k sees blocks < k pruned."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, calib = tiny
    tokens = calibration_tokens(AutoTokenizer.from_pretrained(model_dir), calib.read_text(), 8, 32)
    handle = open_causal_lm(model_dir, lazy=True)
    targets = select_targets(handle.model, M)
    got = wanda_masks(handle, tokens, targets, N, M, batch_size=5)

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for block in range(2):
        names = [t for t in targets if t.startswith(f"model.layers.{block}.")]
        inputs = {name: [] for name in names}
        hooks = [model.get_submodule(n).register_forward_hook(lambda _m, i, _o, n=n, s=inputs: s[n].append(i[0]))
                 for n in names]
        with torch.no_grad():
            model(input_ids=tokens)
        for h in hooks:
            h.remove()
        for name in names:
            x = torch.cat(inputs[name]).reshape(-1, model.get_submodule(name).in_features).double()
            col_norm = x.pow(2).sum(dim=0).sqrt()
            weight = model.get_submodule(name).weight
            metric = (weight.double().abs() * col_norm).reshape(-1, M)
            expected = torch.zeros_like(metric, dtype=torch.bool)
            expected.scatter_(1, torch.topk(metric, N, dim=1).indices, True)
            assert torch.equal(got[name].reshape(-1, M), expected), name
            with torch.no_grad():  # prune this block before collecting the next one's inputs
                weight.copy_(torch.where(got[name], weight, 0))
    # Wanda differs from magnitude: the activation scale matters.
    assert any(not torch.equal(got[n], magnitude_prior(handle.weight(n), N, M)) for n in targets)


def naive_sparsegpt(w, h, n, m, percdamp=0.01):
    """OBS column by column with explicit inverses of the trailing Hessian (fp64, no Cholesky)."""
    w = w.double().clone()
    h = h.double().clone()
    h += percdamp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    cols = w.shape[1]
    mask = torch.zeros_like(w, dtype=torch.bool)
    for j in range(cols):
        if j % m == 0:
            diag = torch.stack([torch.linalg.inv(h[k:, k:])[0, 0] for k in range(j, j + m)])
            score = w[:, j : j + m] ** 2 / diag
            mask[:, j : j + m].scatter_(1, torch.topk(score, n, dim=1).indices, True)
        inv = torch.linalg.inv(h[j:, j:])
        err = torch.where(mask[:, j], 0.0, w[:, j]) / inv[0, 0]
        w[:, j:] -= err.unsqueeze(1) * inv[0].unsqueeze(0)
    return mask, torch.where(mask, w, 0.0)


@pytest.mark.parametrize("blocksize", [8, 128])
def test_sparsegpt_equals_naive_obs(blocksize):
    g = torch.Generator().manual_seed(0)
    rows, cols, tokens = 12, 32, 200
    x = torch.randn(tokens, cols, generator=g) @ torch.randn(cols, cols, generator=g)  # correlated inputs
    w = torch.randn(rows, cols, generator=g)
    h = 2 * x.t() @ x / tokens
    mask, updated = sparsegpt_prune(w, h, N, M, blocksize=blocksize)
    ref_mask, ref_w = naive_sparsegpt(w, h, N, M)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(updated.double(), ref_w, rtol=1e-3, atol=1e-4)
    assert validate_nm({"w": mask}, N, M).ok
    assert torch.equal(updated != 0, mask)
    # The weight update only helps: error below that of the same mask on the original weights.
    err_sgpt = torch.linalg.norm(x @ (w - updated).t())
    err_mask_only = torch.linalg.norm(x @ (w - torch.where(mask, w, 0)).t())
    assert err_sgpt < 0.9 * err_mask_only


def test_sparsegpt_rejects_block_not_multiple_of_m():
    with pytest.raises(ValueError, match="blocksize"):
        sparsegpt_prune(torch.randn(4, 8), torch.eye(8), N, M, blocksize=6)


def _known_masks(model_dir, seed=1):
    weights = load_file(str(model_dir / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for key, w in weights.items():
        if ".layers." in key and key.endswith("_proj.weight"):
            masks[key[: -len(".weight")]] = torch.rand(w.shape, generator=g).reshape(-1, M).argsort(1).argsort(1).lt(N).reshape(w.shape)
    return weights, masks


def test_from_checkpoint_plain_layout_recovers_the_mask(tiny, tmp_path):
    weights, masks = _known_masks(tiny[0])
    pruned = dict(weights)
    for name, mask in masks.items():
        pruned[name + ".weight"] = torch.where(mask, weights[name + ".weight"], 0)
    # One kept weight that is exactly zero: its group has one non-zero and must be completed.
    name0 = "model.layers.0.self_attn.q_proj"
    row0 = masks[name0][0, :M]
    kept_cols = torch.nonzero(row0).flatten().tolist()
    pruned[name0 + ".weight"][0, kept_cols[1]] = -0.0
    src = tmp_path / "pruned"
    src.mkdir()
    save_file(pruned, str(src / "model.safetensors"))
    shapes = {n: tuple(m.shape) for n, m in masks.items()}
    got, info = masks_from_checkpoint(src, shapes, N, M)
    assert info["layouts"] == ["plain"] and info["completed_groups"] == 1
    for name in masks:
        if name != name0:
            assert torch.equal(got[name], masks[name]), name
    # The completed group keeps its non-zero and the lowest-index zero slot.
    expected = torch.zeros(M, dtype=torch.bool)
    expected[kept_cols[0]] = True
    expected[min(set(range(M)) - {kept_cols[0]})] = True
    assert torch.equal(got[name0][0, :M], expected)
    assert torch.equal(got[name0][1:], masks[name0][1:]) and torch.equal(got[name0][0, M:], masks[name0][0, M:])


def test_from_checkpoint_rejects_groups_with_too_many_nonzeros():
    kept = torch.tensor([[True, True, True, False, True, True, False, False]])
    with pytest.raises(ValueError, match="more than N=2"):
        strict_from_kept(kept, N, M, "layer")


def write_ct_sparse24(src, weights, masks):
    """A compressed-tensors sparse-24-bitmask checkpoint, by hand (docs/formats.md §3)."""
    tensors = {}
    for key, w in weights.items():
        name = key[: -len(".weight")]
        if name not in masks:
            tensors[key] = w
            continue
        mask = masks[name]
        tensors[name + ".compressed"] = w[mask].reshape(w.shape[0], w.shape[1] // 2)
        tensors[name + ".bitmask"] = torch.from_numpy(np.packbits(mask.numpy(), axis=-1, bitorder="little"))
        tensors[name + ".shape"] = torch.tensor(list(w.shape), dtype=torch.int64).reshape(-1, 1)
    src.mkdir()
    save_file(tensors, str(src / "model.safetensors"))
    config = {"quantization_config": {"quant_method": "compressed-tensors", "version": "0.14.0", "config_groups": {},
                                      "sparsity_config": {"format": "sparse-24-bitmask", "sparsity_structure": "2:4"}}}
    (src / "config.json").write_text(json.dumps(config))


def test_from_checkpoint_ct_sparse24_layout_via_cli(tiny, tmp_path):
    model_dir, _ = tiny
    weights, masks = _known_masks(model_dir, seed=2)
    src = tmp_path / "ct"
    write_ct_sparse24(src, weights, masks)
    out = tmp_path / "prior"
    argv = ["--model", str(model_dir), "--method", "from-checkpoint", "--source", str(src), "--out", str(out)]
    assert prior_main(argv) == 0
    art = read_mask_artifact(out)
    assert art.meta["method"] == "from-checkpoint"
    assert art.meta["from_checkpoint"]["layouts"] == ["ct-sparse24"]
    assert art.meta["from_checkpoint"]["declared_sparsity_format"] == "sparse-24-bitmask"
    assert set(art.shapes) == set(masks)
    for name, mask in masks.items():
        assert torch.equal(art.layer_mask(name), mask), name
    assert prior_main(argv) == 2  # --out exists and no --force


def test_calibration_windows_are_evenly_spaced_and_checked():
    tok = char_tokenizer()
    text = "".join(string.ascii_lowercase[i % 26] for i in range(1000))
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    windows = calibration_tokens(tok, text, 4, 100)
    stride = (1000 - 100) // 3
    for i in range(4):
        assert torch.equal(windows[i], ids[i * stride : i * stride + 100])
    with pytest.raises(ValueError, match="--nsamples"):
        calibration_tokens(tok, text, 11, 100)


def select_targets(model, m, **kw) -> list[str]:
    return [t.name for t in select_target_modules(model, m, **kw)]


def test_target_selection(tmp_path, caplog):
    make_model_dir(tmp_path / "odd", intermediate=132)  # down_proj in=132: not divisible by 8
    handle = open_causal_lm(tmp_path / "odd", lazy=True)
    assert len(select_targets(handle.model, 4)) == 14
    with caplog.at_level("WARNING"):
        at8 = select_targets(handle.model, 8)
    assert len(at8) == 12 and not any("down_proj" in t for t in at8)
    assert "down_proj" in caplog.text
    mlp = select_targets(handle.model, 4, include=["mlp"])
    assert len(mlp) == 6 and all(".mlp." in t for t in mlp)
    assert len(select_targets(handle.model, 4, exclude=["lm_head", "k_proj|v_proj"])) == 10
    with pytest.raises(ValueError, match="not divisible"):
        select_targets(handle.model, 8, include=["down_proj"])
    with pytest.raises(ValueError, match="no nn.Linear"):
        select_targets(handle.model, 4, include=["nothing_matches"])
