"""The swap prior on a tiny random Llama (hidden 64, intermediate 128, 2 layers).

Both calibration modes are checked against a direct computation on the full model with plain
forward hooks: collect H of each Linear's input, compute the start, run the search kernel.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from maskpro_ds.cli.prior import main as prior_main
from maskpro_ds.formats.mask_artifact import read_mask_artifact, write_mask_artifact
from maskpro_ds.masks.local_search import SearchConfig, local_search, objective
from maskpro_ds.masks.nm import magnitude_prior, topn_mask, validate_nm
from maskpro_ds.models.lazy import open_causal_lm
from maskpro_ds.models.targets import select_targets
from maskpro_ds.priors import swap as swap_module
from maskpro_ds.priors.base import PriorSpec
from maskpro_ds.priors.calibration import ColumnSumSq, Hessian, calibration_tokens
from maskpro_ds.priors.make import compute_prior, make_prior
from maskpro_ds.priors.sparsegpt import sparsegpt_prune
from maskpro_ds.priors.swap import SwapOptions, SwapPriorOptions, input_groups, swap_masks
from maskpro_ds.priors.swap_ranks import RowSplit
from maskpro_ds.priors.wanda import wanda_scores
from tests.unit.test_priors import make_model_dir

N, M = 2, 4
BATCH = 3  # calibration windows per forward; 8 windows -> micro-batches of 3, 3, 2
# The order in which a Llama block calls its Linears, grouped by the tensor they read.
LLAMA_GROUPS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("swap")
    model_dir = make_model_dir(root / "model")
    rng = np.random.default_rng(0)
    words = "the of and to in a is that for it as was with be by on not he this are".split()
    calib = root / "calib.txt"
    calib.write_text("\n\n".join(" ".join(rng.choice(words, 150)) for _ in range(12)))
    return model_dir, calib


def _spec(tiny, tmp_path, **kw):
    model_dir, calib = tiny
    kw.setdefault("swap_row_chunk", 48)  # several chunks per Linear
    options = SwapPriorOptions(**{k: kw.pop(k) for k in list(kw) if k.startswith("swap_")})
    return PriorSpec(model=str(model_dir), method="swap", out=str(tmp_path / "swap"), calib=str(calib),
                     nsamples=8, seqlen=32, batch_size=BATCH, options=options, **kw)


def _tokens(tiny):
    from transformers import AutoTokenizer

    model_dir, calib = tiny
    return calibration_tokens(AutoTokenizer.from_pretrained(model_dir), calib.read_text(), 8, 32)


def direct_swap(tiny, start: str, calib: str, config: SearchConfig, target: str = "own") -> dict[str, torch.Tensor]:
    """The swap prior computed on the full model with forward pre-hooks, group by group in call order.

    dense: every H from the dense model; sequential: every Linear searched so far is masked first;
    target dense: a second, dense copy of the model gives x_dense for the linear term D w.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny[0], dtype=torch.float32).eval()
    dense_model = AutoModelForCausalLM.from_pretrained(tiny[0], dtype=torch.float32).eval()
    tokens = _tokens(tiny)
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks: dict[str, torch.Tensor] = {}
    for block in range(2):
        for group in LLAMA_GROUPS:
            names = [f"model.layers.{block}.{suffix}" for suffix in group]
            leader = model.get_submodule(names[0])
            hessian, column = Hessian(leader.in_features, "cpu"), ColumnSumSq(leader.in_features, "cpu")

            def collect(_module, args, hessian=hessian, column=column):
                hessian.add(args[0])
                column.add(args[0])

            hook = leader.register_forward_pre_hook(collect)
            cross = torch.zeros(leader.in_features, leader.in_features)
            with torch.no_grad():
                for batch in tokens.split(BATCH):
                    if target == "dense":  # D = (2/n) Σ x (x − x_dense)ᵀ, as a running mean like H
                        xs = []
                        hooks = [m.get_submodule(names[0]).register_forward_pre_hook(
                            lambda _m, args, xs=xs: xs.append(args[0].reshape(-1, args[0].shape[-1])))
                            for m in (model, dense_model)]
                    seen = hessian.tokens
                    model(input_ids=batch, use_cache=False)
                    if target == "dense":
                        dense_model(input_ids=batch, use_cache=False)
                        for h in hooks:
                            h.remove()
                        cross *= seen / hessian.tokens
                        cross.addmm_(xs[0].t(), xs[0] - xs[1], alpha=2.0 / hessian.tokens)
            hook.remove()
            starts = []
            for name in names:
                w = originals[name + ".weight"]
                if start == "wanda":
                    starts.append(topn_mask(wanda_scores(w, column.sumsq), N, M))
                elif start == "sparsegpt":
                    starts.append(sparsegpt_prune(w, hessian.h, N, M)[0])
                else:
                    starts.append(magnitude_prior(w, N, M))
            # The Linears reading this input are searched as one stack of rows.
            weights = [originals[name + ".weight"] for name in names]
            linear = torch.cat(weights) @ cross.T if target == "dense" else None
            found, _ = local_search(torch.cat(weights), hessian.h, torch.cat(starts), N, M, config, linear=linear)
            for name, part in zip(names, found.split([w.shape[0] for w in weights]), strict=True):
                masks[name] = part
                if calib == "sequential":
                    with torch.no_grad():
                        model.get_submodule(name).weight.copy_(torch.where(part, originals[name + ".weight"], 0))
    return masks


@pytest.mark.parametrize("calib,target", [("dense", "own"), ("sequential", "own"), ("sequential", "dense")])
@pytest.mark.parametrize("start", ["wanda", "sparsegpt", "magnitude"])
def test_swap_equals_a_direct_computation_on_the_full_model(tiny, tmp_path, start, calib, target):
    got, meta = compute_prior(_spec(tiny, tmp_path, swap_start=start, swap_calib=calib, swap_target=target,
                                    swap_sweeps=4))
    expected = direct_swap(tiny, start, calib, SearchConfig(max_sweeps=4, tol=1e-3, row_chunk=48), target)
    assert got.keys() == expected.keys() and len(got) == 14
    for name in got:
        assert torch.equal(got[name], expected[name]), name
    info = meta["swap"]
    assert info["start"] == start and info["calib_mode"] == calib and info["target"] == target
    assert info["ranks"] == 1
    assert 0 < info["groups_changed"] < info["groups"] == sum(m.numel() // M for m in got.values())
    assert len(info["inputs"]) == 8  # 2 blocks x (q/k/v, o, gate/up, down)
    for name, stats in info["inputs"].items():
        assert all(b <= a for a, b in zip(stats["objective"], stats["objective"][1:], strict=False)), name
    if target == "dense":  # block 0's first input is the embedding in both streams: no linear term there
        own, _ = compute_prior(_spec(tiny, tmp_path, swap_start=start, swap_calib=calib, swap_sweeps=4))
        assert torch.equal(got["model.layers.0.self_attn.q_proj"], own["model.layers.0.self_attn.q_proj"])
        assert not torch.equal(got["model.layers.1.mlp.down_proj"], own["model.layers.1.mlp.down_proj"])


def test_the_two_modes_differ_and_both_beat_their_start(tiny, tmp_path):
    dense, _ = compute_prior(_spec(tiny, tmp_path, swap_calib="dense"))
    seq, _ = compute_prior(_spec(tiny, tmp_path, swap_calib="sequential"))
    assert any(not torch.equal(dense[n], seq[n]) for n in dense)
    # Block 0 reads the embeddings in both modes: its q/k/v see the same H and agree.
    assert torch.equal(dense["model.layers.0.self_attn.q_proj"], seq["model.layers.0.self_attn.q_proj"])


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_strict_nm_over_all_decoder_linears(tiny, tmp_path, pattern):
    masks, meta = compute_prior(_spec(tiny, tmp_path, pattern=pattern))
    n, m = (int(v) for v in pattern.split(":"))
    assert len(masks) == 14 and validate_nm(masks, n, m).ok
    assert meta["method"] == "swap" and meta["calib"]["tokens"] == 8 * 32


def test_lazy_loading_gives_the_same_masks_as_eager(tiny, tmp_path):
    lazy, _ = compute_prior(_spec(tiny, tmp_path, load="lazy", swap_calib="sequential"))
    eager, _ = compute_prior(_spec(tiny, tmp_path, load="eager", swap_calib="sequential"))
    assert all(torch.equal(lazy[n], eager[n]) for n in lazy)


def test_linears_are_grouped_by_the_tensor_they_read(tiny):
    handle = open_causal_lm(tiny[0], lazy=True)
    block = handle.materialize_block(0)
    from maskpro_ds.priors.block_inputs import record_block_inputs

    inputs = record_block_inputs(handle, _tokens(tiny), BATCH)
    linears = {f"model.layers.0.{s}": handle.model.get_submodule(f"model.layers.0.{s}")
               for g in LLAMA_GROUPS for s in g}
    groups = input_groups(block, dict(reversed(linears.items())), (inputs.hidden[0], inputs.calls[0][0]))  # dict order does not matter
    assert groups == [[f"model.layers.0.{s}" for s in g] for g in LLAMA_GROUPS]


def test_one_hessian_in_memory_at_a_time(tiny, monkeypatch):
    live, peak = [0], [0]

    class Counted(swap_module._InputStats):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            live[0] += 1
            peak[0] = max(peak[0], live[0])

        def __del__(self):
            live[0] -= 1

    monkeypatch.setattr(swap_module, "_InputStats", Counted)
    handle = open_causal_lm(tiny[0], lazy=True)
    targets = [t.name for t in select_targets(handle.model, M)]
    swap_masks(handle, _tokens(tiny), targets, N, M, SwapOptions(), batch_size=BATCH)
    assert peak[0] == 1 and live[0] == 0


def test_start_from_a_mask_artifact_or_a_pruned_checkpoint(tiny, tmp_path):
    model_dir, _ = tiny
    weights = load_file(str(model_dir / "model.safetensors"))
    names = [k[: -len(".weight")] for k in weights if ".layers." in k and k.endswith("_proj.weight")]
    g = torch.Generator().manual_seed(7)
    known = {n: topn_mask(torch.rand(weights[n + ".weight"].shape, generator=g), N, M) for n in names}
    from maskpro_ds.formats.hashing import model_fingerprint

    write_mask_artifact(tmp_path / "start", known, N, M, model_fingerprint(model_dir), meta={"method": "test"})
    pruned = tmp_path / "pruned"
    pruned.mkdir()
    save_file({k: torch.where(known[k[:-7]], v, 0) if k[:-7] in known else v for k, v in weights.items()},
              str(pruned / "model.safetensors"))
    for source in (tmp_path / "start", pruned):
        unchanged, meta = compute_prior(_spec(tiny, tmp_path, swap_start=str(source), swap_sweeps=0))
        assert all(torch.equal(unchanged[n], known[n]) for n in names)
        searched, _ = compute_prior(_spec(tiny, tmp_path, swap_start=str(source)))
        layer = "model.layers.1.mlp.down_proj"
        assert not torch.equal(searched[layer], known[layer])
    assert meta["swap"]["start_source"]["checkpoint"]["layouts"] == ["plain"]


def test_searched_masks_lower_the_layer_objective_on_dense_activations(tiny, tmp_path):
    got, meta = compute_prior(_spec(tiny, tmp_path, swap_start="magnitude", swap_sweeps=8))
    start = {n: magnitude_prior(open_causal_lm(tiny[0], lazy=True).weight(n), N, M) for n in got}
    for name, stats in meta["swap"]["inputs"].items():
        assert stats["objective"][-1] < 0.95 * stats["objective"][0], name
    assert all(not torch.equal(got[name], start[name]) for name in got)


def test_cli_writes_the_artifact_and_reports_bad_options(tiny, tmp_path, capsys):
    model_dir, calib = tiny
    out = tmp_path / "cli"
    base = ["--model", str(model_dir), "--method", "swap", "--calib", str(calib), "--nsamples", "8", "--seqlen", "32"]
    assert prior_main([*base, "--out", str(out), "--swap-sweeps", "2", "--swap-tol", "0", "--swap-calib",
                       "sequential", "--swap-start", "magnitude"]) == 0
    art = read_mask_artifact(out)
    assert art.meta["method"] == "swap" and art.meta["swap"]["max_sweeps"] == 2
    assert art.meta["swap"]["calib_mode"] == "sequential" and art.meta["swap"]["start"] == "magnitude"
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["layers"] == 14
    assert prior_main([*base, "--out", str(tmp_path / "x"), "--swap-start", str(tmp_path / "nowhere")]) == 2
    assert "--swap-start" in capsys.readouterr().err
    assert prior_main([*base, "--out", str(tmp_path / "x"), "--swap-sweeps", "-1"]) == 2
    assert "--swap-sweeps" in capsys.readouterr().err
    assert prior_main([*base, "--out", str(tmp_path / "x"), "--swap-target", "dense"]) == 2
    assert "--swap-target dense needs --swap-calib sequential" in capsys.readouterr().err


def test_start_artifact_of_another_pattern_is_refused(tiny, tmp_path):
    make_prior(_spec(tiny, tmp_path, pattern="4:8", swap_sweeps=0))
    with pytest.raises(ValueError, match="--swap-start .* is 4:8"):
        compute_prior(_spec(tiny, tmp_path, swap_start=str(tmp_path / "swap")))


def test_row_split_owners_balance_and_are_deterministic():
    split = RowSplit(rank=0, world=2)
    assert split.owners([512, 64, 192, 192]) == [0, 1, 1, 1]
    assert split.owners([48, 48, 48, 16]) == [0, 1, 0, 1]
    assert RowSplit().owners([5, 7]) == [0, 0]


def test_objective_helper_matches_the_layer_output_error():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(50, 16, generator=g, dtype=torch.float64), torch.randn(6, 16, generator=g, dtype=torch.float64)
    mask = magnitude_prior(w, N, M)
    err = (x @ (torch.where(mask, w, 0) - w).T).pow(2).sum()
    assert torch.allclose(objective(w, x.T @ x, mask), err)
