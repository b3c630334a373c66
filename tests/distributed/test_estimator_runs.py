"""The estimators with several masks per rank and per-logit state, run for real on 2 CPU ranks under
ZeRO-3 and checked bit for bit against the in-process reference (tests/reference.py).

Three launches in all: ``loo`` with K = 3 uninterrupted, and ``adaptive`` (K = 2, leave-one-out,
second-moment steps, a cosine schedule with warmup) killed after step 7 and resumed from its step-5
checkpoint. The step-5 checkpoint of the killed run is the uninterrupted trajectory; the resumed
step 10 must be the same as an uninterrupted run, which is what the reference computes. The runs use
the plain kernels (compiling costs a minute per launch on a busy machine; the compiled kernels give
the same bits for R·K masks: tests/unit/test_estimators.py).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from maskpro_ds.config import Config
from maskpro_ds.formats.checkpoint_format import load_group_range, read_manifest
from maskpro_ds.train.forward import num_rounds
from maskpro_ds.train.step_size import lr_factor
from tests.distributed.launch import REPO, base_env, torchrun, train_args
from tests.distributed.test_training import assert_same_logits, logits_at, samples_tokens
from tests.reference import ReferenceMaskPro
from tests.tiny import make_text, make_tiny_llama

pytestmark = pytest.mark.distributed
CONFIG = REPO / "configs" / "tiny_debug.yaml"
STEPS = 10
ADAPTIVE = dict(train__estimator="adaptive", train__masks_per_step=2, train__lr=0.05, train__adaptive_eps=0.01,
                train__adaptive_beta=0.9, train__lr_schedule="cosine", train__lr_warmup_steps=2,
                train__lr_final_ratio=0.2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("estimators")
    model = make_tiny_llama(root / "model")
    text = make_text(root / "text.txt")
    return {"root": root, "model": model, "text": text,
            "common": dict(model__path=model, data__source=text, data__cache_dir=root / "cache",
                           mask__kernels="plain")}


def reference(setup, steps: int, **kw) -> ReferenceMaskPro:
    ref = ReferenceMaskPro(setup["model"], samples_tokens(setup), c=3.0, batch_size=2, **kw)
    for _ in range(steps):
        ref.step(2)
    return ref


def named(ref: ReferenceMaskPro, tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(zip([name for name, _ in ref.layers], tensors, strict=True))


def forwards_logged(run_dir) -> list[int]:
    return [json.loads(x)["train/forwards"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loo_two_ranks_match_in_process_reference(setup):
    run_dir = setup["root"] / "loo"
    torchrun(2, train_args(CONFIG, train__run_dir=run_dir, train__estimator="loo", train__masks_per_step=3,
                           **setup["common"]))
    ref = reference(setup, STEPS, lr=20.0, estimator="loo", k=3)
    got = logits_at(run_dir, STEPS)
    assert_same_logits(got, named(ref, ref.logits))
    assert any(not torch.equal(g, torch.round(g / 3.0) * 3.0) for g in got.values())  # learning happened
    baseline_pass = num_rounds(16, 2, 2)  # tiny_debug: 16 samples, 2 ranks, batch 2
    assert forwards_logged(run_dir) == [baseline_pass + 3 * s for s in range(1, STEPS + 1)]


def test_adaptive_two_ranks_match_reference_and_resume_is_bit_identical(setup):
    run_dir = setup["root"] / "adaptive"
    args = train_args(CONFIG, train__run_dir=run_dir, **ADAPTIVE, **setup["common"])
    proc = torchrun(2, args, env=base_env(MASKPRO_FAULT_STEP="7", MASKPRO_FAULT_RANK="1"), check=False)
    assert proc.returncode != 0
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000005"

    train = dataclasses.replace(Config().train, steps=STEPS, lr_schedule="cosine", lr_warmup_steps=2, lr_final_ratio=0.2)
    kw = dict(lr=0.05, estimator="adaptive", k=2, beta=0.9, eps=0.01, lr_factor=lambda t: lr_factor(train, t))
    ref5 = reference(setup, 5, **kw)
    assert_same_logits(logits_at(run_dir, 5), named(ref5, ref5.logits))  # the uninterrupted part

    torchrun(2, [*args, "--resume"])
    ref = reference(setup, STEPS, **kw)
    assert_same_logits(logits_at(run_dir, STEPS), named(ref, ref.logits))
    manifest = read_manifest(run_dir / "checkpoints" / f"step-{STEPS:06d}")
    assert manifest.state["estimator"]["second_moment_updates"] == STEPS
    for layer, want in named(ref, ref.second).items():
        got = load_group_range(manifest, f"{layer}/second_moment", (0, manifest.layer(layer).num_groups))
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), layer
    moved = [float((g - torch.round(g / 3.0) * 3.0).abs().max()) for g in ref.logits]
    assert max(moved) > 1e-3 and all(torch.isfinite(g).all() for g in ref.logits)
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    assert forwards_logged(run_dir) == [num_rounds(16, 2, 2) + 2 * s for s in range(1, STEPS + 1)]


def test_layer_credit_two_ranks_match_reference(setup):
    """train.layer_credit on 2 ranks equals the reference, which recomputes each rank's slice rows and H
    from a plain model's inputs (slices that cut rows: tests/unit/test_layer_credit.py)."""
    run_dir = setup["root"] / "credit"
    torchrun(2, train_args(CONFIG, train__run_dir=run_dir, train__layer_credit=2.0, train__layer_credit_every=2,
                           **setup["common"]))
    ref = reference(setup, STEPS, lr=20.0, layer_credit=2.0, layer_credit_every=2)
    assert_same_logits(logits_at(run_dir, STEPS), named(ref, ref.logits))
    plain = reference(setup, STEPS, lr=20.0)
    moved = max(float((a - b).abs().max()) for a, b in zip(ref.logits, plain.logits, strict=True))
    assert moved > 1e-2  # the credit changed the logits beyond rounding
    assert forwards_logged(run_dir) == [num_rounds(16, 2, 2) + s + (s + 1) // 2 for s in range(1, STEPS + 1)]


def swap_reference_masks(setup, samples: int) -> dict[str, torch.Tensor]:
    """The warm start's mask computed here, in one process: the swap prior from magnitude on the run's
    text (the search gives the same bits for any rank count: tests/distributed/test_swap_ranks.py)."""
    from maskpro_ds.priors.base import PriorSpec
    from maskpro_ds.priors.make import compute_prior
    from maskpro_ds.priors.swap import SwapPriorOptions

    spec = PriorSpec(model=str(setup["model"]), method="swap", out=str(setup["root"] / "unused"),
                     calib=str(setup["text"]), nsamples=samples, seqlen=32, exclude=["lm_head"], dtype="fp32",
                     options=SwapPriorOptions(swap_start="magnitude"))
    masks, _ = compute_prior(spec)
    return masks


def test_warm_start_two_ranks_match_reference_and_resume_reuses_it(setup):
    """mask.warm_start = swap with rms advantages (the shipped configs' recipe) on 2 ranks, killed after
    step 7 and resumed: the warm-start mask is the in-process swap search's, the search runs once, and
    the resumed run equals the reference trained from that mask (the uninterrupted trajectory)."""
    from maskpro_ds.formats.mask_artifact import read_mask_artifact
    from maskpro_ds.masks.nm import magnitude_prior

    run_dir = setup["root"] / "warm"
    args = train_args(CONFIG, train__run_dir=run_dir, mask__warm_start="swap", mask__warm_start_samples=8,
                      train__advantage_norm="rms", train__lr=1.5, **setup["common"])
    proc = torchrun(2, args, env=base_env(MASKPRO_FAULT_STEP="7", MASKPRO_FAULT_RANK="1"), check=False)
    assert proc.returncode != 0
    warm_dirs = sorted(run_dir.glob("warm_start-*"))
    assert len(warm_dirs) == 1
    manifest = warm_dirs[0] / "mask_manifest.json"
    written = manifest.stat().st_mtime_ns

    swap = swap_reference_masks(setup, 8)
    artifact = read_mask_artifact(warm_dirs[0])
    for name, want in swap.items():
        assert torch.equal(artifact.layer_mask(name), want), name
    ref = ReferenceMaskPro(setup["model"], samples_tokens(setup), c=3.0, lr=1.5, batch_size=2, norm="rms",
                           prior=swap)
    changed = sum(int((magnitude_prior(w, 2, 4) != swap[name]).sum())  # ref.weights: the dense weights
                  for (name, _), w in zip(ref.layers, ref.weights, strict=True))
    assert changed > 0  # the search moved away from the magnitude start

    torchrun(2, [*args, "--resume"])
    assert sorted(run_dir.glob("warm_start-*")) == warm_dirs and manifest.stat().st_mtime_ns == written
    for _ in range(STEPS):
        ref.step(2)
    assert_same_logits(logits_at(run_dir, STEPS), named(ref, ref.logits))
    moved = [float((g - torch.round(g / 3.0) * 3.0).abs().max()) for g in ref.logits]
    assert max(moved) > 1e-3  # learning happened
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 0 and lines[0]["warm_start/forwards"] == 4  # 8 windows, batch 2
    assert [x["train/lr"] for x in lines[1:]] == [1.5] * STEPS  # no guard trip: the reference's lr holds
    assert [x["train/forwards"] for x in lines[1:]] == [num_rounds(16, 2, 2) + 4 + s for s in range(1, STEPS + 1)]
    # Resuming with inputs that would make another warm start is refused before anything is searched.
    proc = torchrun(2, [*args, "--resume", "--train.steps=12", "--mask.warm_start_samples=6"], check=False)
    assert proc.returncode != 0
    assert "mask.warm_start: the checkpoint being resumed was trained from the warm start" in proc.stderr + proc.stdout
    assert sorted(run_dir.glob("warm_start-*")) == warm_dirs
