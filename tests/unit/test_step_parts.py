"""The parts the training step is read from: estimators, the lr guard, explicit mask modes, padded rounds."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from maskpro_ds.config import Config
from maskpro_ds.masks.advantages import AdvantageScaler, ResidualTracker
from maskpro_ds.train.estimators import ESTIMATORS, StepLosses, make_estimator
from maskpro_ds.train.forward import num_rounds, padded_rounds
from maskpro_ds.train.logit_store import LogitStore
from maskpro_ds.train.lr_guard import GuardStop, LrGuard
from maskpro_ds.train.mask_modes import FINAL, PRIOR, SampleMode

TRACKED = {"residual_tracker", "loo", "adaptive"}  # with one draw per rank, loo and adaptive use the tracker
STEPS = [StepLosses([2.5, 2.75], [2.25, 2.5]), StepLosses([2.0, 3.0], [2.5, 2.5]), StepLosses([1.5, 2.0], [2.0, 1.0])]


def _train(**kw):
    return dataclasses.replace(Config().train, **kw)


@pytest.mark.parametrize("norm", ["none", "rms", "clip"])
@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_estimators_equal_tracker_and_scaler_composed_by_hand(name, norm):
    clip = 0.3 if norm != "none" else 0.0  # rms: a bound on |a / rms|; none refuses one
    train = _train(estimator=name, advantage_norm=norm, advantage_clip=clip, alpha=0.9)
    est = make_estimator(train)
    tracker = ResidualTracker(alpha=0.9)
    scaler = AdvantageScaler(mode=norm, clip=clip or None)
    for step in STEPS:
        signal = step.losses if name == "vanilla" else [f - b for f, b in zip(step.losses, step.baselines, strict=True)]
        want = scaler.scale(tracker.advantages(signal) if name in TRACKED else signal)
        assert est.advantages(step) == want
        est.commit(step)
        if name in TRACKED:
            tracker.update(signal)
        assert est.metrics() == {"train/delta": tracker.delta}
    assert (tracker.delta != 0.0) == (name in TRACKED)


def test_estimator_state_round_trip_is_exact():
    est = make_estimator(_train(advantage_norm="rms"))
    for step in STEPS[:2]:
        est.advantages(step)
        est.commit(step)
    again = make_estimator(_train(advantage_norm="rms"))
    again.load_state_dict(est.state_dict())
    assert again.advantages(STEPS[2]) == est.advantages(STEPS[2])
    assert est.draws_per_rank == 1 and est.slice_state() == {}


def test_rms_advantages_are_clipped_at_advantage_clip():
    """train.advantage_clip bounds |a / rms| under rms (the recipes' 3.0 used to be ignored)."""
    est = make_estimator(_train(estimator="residual", advantage_norm="rms", advantage_clip=3.0))
    calm = StepLosses([2.01, 1.99, 2.01, 1.99], [2.0] * 4)
    est.advantages(calm)
    est.commit(calm)  # running RMS = 0.01
    outlier = StepLosses([2.5, 2.01, 1.99, 2.0], [2.0] * 4)
    got = est.advantages(outlier)
    assert got[0] == 3.0 and got[1:] == pytest.approx([1.0, -1.0, 0.0], abs=1e-9)
    unclipped = make_estimator(_train(estimator="residual", advantage_norm="rms"))
    unclipped.commit(calm)
    assert unclipped.advantages(outlier)[0] == pytest.approx(50.0)
    with pytest.raises(ValueError, match="no effect"):
        AdvantageScaler(mode="none", clip=3.0)


@pytest.mark.parametrize("norm", ["rms", "clip"])
def test_advantages_are_pure_and_commit_counts_a_step_once(norm):
    """Asking twice (a step redone after a stop) gives the same advantages; only commit moves state.
    The raw advantages are r - delta in loss units, whatever the conditioning."""
    est = make_estimator(_train(advantage_norm=norm, advantage_clip=0.3))
    for step in STEPS[:2]:
        est.advantages(step)
        est.commit(step)
    state = est.state_dict()
    first = est.advantages(STEPS[2])
    assert est.advantages(STEPS[2]) == first and est.state_dict() == state
    delta = est.tracker.delta
    assert est.raw_advantages(STEPS[2]) == [f - b - delta for f, b in zip(STEPS[2].losses, STEPS[2].baselines,
                                                                          strict=True)]
    est.commit(STEPS[2])
    assert est.state_dict() != state and est.scaler.steps == 3


def test_lr_guard_halves_then_stops_and_restores_its_state():
    guard = LrGuard(8.0, max_abs_advantage=1.0, max_deviation=0.1)
    guard.check_advantages([0.5, -0.9], step=0)
    guard.check_deviation(0.05, step=0)
    assert guard.lr == 8.0
    guard.check_advantages([0.5, -1.5], step=1)
    guard.check_deviation(0.2, step=1)
    assert guard.lr == 2.0
    restored = LrGuard(8.0)
    restored.load_state_dict(guard.state_dict())
    assert restored.lr == 2.0
    changed = LrGuard(4.0)
    changed.load_state_dict(guard.state_dict())  # the user chose a new train.lr: it wins
    assert changed.lr == 4.0
    with pytest.raises(GuardStop, match="train.max_deviation"):
        for step in range(20):
            guard.check_deviation(0.5, step)
    assert guard.lr < 8.0 / 1000


def test_masked_forward_needs_an_explicit_mode():
    store = LogitStore(["a"], [(4, 8)], 2, 4, rank=0, world_size=1, seed=0, kernels="plain")
    store.init_from_prior(0, torch.tensor([[True, True, False, False]] * 8), 10.0)
    with pytest.raises(RuntimeError, match="outside LogitStore.drawing"):
        store.mask_for_forward(0)
    with store.drawing(PRIOR), pytest.raises(RuntimeError, match="one forward at a time"):
        with store.drawing(FINAL):
            pass
    with store.drawing(PRIOR):
        pass
    with store.drawing(SampleMode(3)):  # the previous block left no mode behind: a new one may start
        pass
    # untrained, the final mask is the prior; a sample at C = 10 mostly is too
    assert torch.equal(store.forward_send(0, FINAL)[0], store.forward_send(0, PRIOR)[0])


@pytest.mark.parametrize(("total", "world", "batch"), [(10, 3, 2), (7, 2, 4), (1, 4, 3)])
def test_padded_rounds_cover_every_item_once_in_equal_rounds(total, world, batch):
    seen = []
    for rank in range(world):
        rounds = list(padded_rounds(total, world, rank, batch))
        assert len(rounds) == num_rounds(total, world, batch)
        for ids, real in rounds:
            assert ids.numel() == batch and (ids[real:] == 0).all()
            seen += ids[:real].tolist()
    assert sorted(seen) == list(range(total))
