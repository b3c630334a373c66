"""Estimator mechanics: score forms, the logit update, tracker and scaler, init and final masks."""

import math

import pytest
import torch

from maskpro_ds.masks import policy, sampling
from maskpro_ds.masks.advantages import AdvantageScaler, ResidualTracker
from maskpro_ds.masks.policy import (
    accumulate_update,
    apply_update_,
    final_mask,
    init_logits,
    log_prob_set,
    score,
)


def _random_masks(g: int, n: int, m: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.argsort(torch.rand(g, m, generator=gen), dim=1)[:, :n]
    return torch.zeros(g, m, dtype=torch.bool).scatter_(1, idx, True)


def _autograd_score(logits: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    x = logits.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(log_prob_set(x, mask, n).sum(), x)
    return grad


def test_score_fp32_close_to_fp64_for_confident_groups():
    # C = 10 priors, gaps of 50, 100 and 200: the fp32 closed form must stay finite and accurate.
    logits = torch.tensor([
        [10.0, 10.0, 0.0, 0.0],
        [50.0, 0.0, 50.0, 0.0],
        [100.0, 0.0, 0.0, 1.0],
        [200.0, 10.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],
        [-30.0, 30.0, 0.0, 20.0],
    ])
    for seed in range(4):
        mask = _random_masks(logits.shape[0], 2, 4, seed)
        got = score(logits, mask, 2)
        want = score(logits.double(), mask, 2)
        assert torch.isfinite(got).all()
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-12)
        assert torch.allclose(got.double().sum(dim=1), torch.zeros(6, dtype=torch.float64), atol=1e-6)
    # The prior itself: small, accurate gradient ~ 1.5 e^-10 on each kept logit.
    g = score(torch.tensor([[10.0, 10.0, 0.0, 0.0]]), torch.tensor([[True, True, False, False]]), 2)
    assert abs(float(g[0, 0]) / (1.5 * math.exp(-10.0)) - 1.0) < 1e-3


@pytest.mark.parametrize("n,m", [(2, 4), (2, 8), (3, 8), (4, 8)])
def test_accumulate_update_matches_reference(n, m):
    g = sampling.CHUNK_GROUPS + 300 if n == 2 else 500  # crosses a chunk boundary on the fast path
    gen = torch.Generator().manual_seed(n * m)
    logits = torch.randn(g, m, generator=gen) * 3.0
    masks = [_random_masks(g, n, m, seed) for seed in range(3)]
    adv = [0.004, -0.002, 0.0]
    lr = 50.0
    new = accumulate_update(logits, masks, adv, lr, n=n)
    ref = logits.double().clone()
    for mk, a in zip(masks, adv, strict=True):
        ref -= lr / 3 * a * _autograd_score(logits.double(), mk, n)
    assert torch.allclose(new.double(), ref, rtol=0, atol=2e-5)
    assert not torch.equal(new, logits)
    inplace = logits.clone()
    apply_update_(inplace, masks, adv, lr, n=n)
    assert torch.equal(inplace, new)


def test_update_rejects_non_strict_masks_and_mismatch():
    logits = torch.zeros(10, 4)
    bad = _random_masks(10, 2, 4, 0)
    bad[7, :] = True
    with pytest.raises(ValueError, match=r"not strict 2:4.*\[7\]"):
        accumulate_update(logits, [bad], [1.0], 1.0)
    inf_logits = logits.clone()
    inf_logits[3, 0] = float("inf")
    with pytest.raises(ValueError, match="group 3 hold NaN or inf"):
        accumulate_update(inf_logits, [_random_masks(10, 2, 4, 1)], [1.0], 1.0)
    with pytest.raises(ValueError, match="one advantage per mask"):
        accumulate_update(logits, [bad], [1.0, 2.0], 1.0)
    with pytest.raises(ValueError, match="not strict 3:4"):
        score(logits.double(), bad, 3)
    with pytest.raises(ValueError, match="bool"):
        score(logits, bad.float(), 2)


def test_residual_tracker_orders():
    use = ResidualTracker(alpha=0.9)
    ref = ResidualTracker(alpha=0.9, order="refresh_then_use")
    assert use.step([0.5]) == [0.5]  # delta_prev = 0
    assert ref.step([0.5]) == [0.5 - 0.1 * 0.5]
    assert use.delta == pytest.approx(0.05) and ref.delta == pytest.approx(0.05)
    # Several residuals: delta moves with their mean; the K = 1 reference order = alpha * default.
    adv = use.step([0.2, 0.4])
    assert adv == pytest.approx([0.2 - 0.05, 0.4 - 0.05])
    assert use.delta == pytest.approx(0.9 * 0.05 + 0.1 * 0.3)
    t1, t2 = ResidualTracker(alpha=0.99, delta=0.3), ResidualTracker(alpha=0.99, order="refresh_then_use", delta=0.3)
    assert t2.step([0.7])[0] == pytest.approx(0.99 * t1.step([0.7])[0])
    # alpha = 1: the plain-residual ablation, delta never moves.
    plain = ResidualTracker(alpha=1.0)
    for r in [0.1, 0.3, -0.2]:
        assert plain.step([r]) == [r]
    assert plain.delta == 0.0


def test_residual_tracker_state_round_trip_is_exact():
    t = ResidualTracker(alpha=0.99)
    for r in [0.0031, 0.0047, -0.0012, 1.0 / 3.0]:
        t.step([r, r * 0.5])
    u = ResidualTracker(alpha=0.99)
    u.load_state_dict(t.state_dict())
    assert u.delta == t.delta and u.steps == t.steps == 4
    assert u.step([0.01]) == t.step([0.01])
    with pytest.raises(ValueError, match="order"):
        ResidualTracker(order="sideways")
    with pytest.raises(ValueError, match="non-finite"):
        t.advantages([float("nan")])


def test_advantage_scaler_modes():
    assert AdvantageScaler("none").scale([0.3, -0.1]) == [0.3, -0.1]
    clip = AdvantageScaler("clip", clip=0.2)
    assert clip.scale([0.3, -0.5, 0.1]) == [0.2, -0.2, 0.1]
    rms = AdvantageScaler("rms", beta=0.5)
    first = rms.scale([0.003, -0.004])  # first step: own RMS = sqrt(12.5e-6)
    assert first == pytest.approx([0.003 / math.sqrt(12.5e-6), -0.004 / math.sqrt(12.5e-6)])
    # Second step divides by the bias-corrected RMS of the past only (= the first step's RMS).
    assert rms.scale([0.01]) == pytest.approx([0.01 / math.sqrt(12.5e-6)])
    ms = 0.5 * (0.5 * 12.5e-6) + 0.5 * 1e-4
    assert rms.rms() == pytest.approx(math.sqrt(ms / (1 - 0.25)))
    bounded = AdvantageScaler("rms", clip=3.0)
    bounded.scale([1e-3])
    assert bounded.scale([1.0]) == [3.0]
    for bad in [dict(mode="loud"), dict(mode="clip"), dict(mode="rms", beta=1.0), dict(mode="rms", clip=-1.0)]:
        with pytest.raises(ValueError, match="AdvantageScaler"):
            AdvantageScaler(**bad)


def test_advantage_scaler_state_round_trip_is_exact():
    a = AdvantageScaler("rms", beta=0.9, clip=4.0)
    for x in [0.003, -0.0021, 0.0007]:
        a.scale([x, x / 3])
    b = AdvantageScaler("rms", beta=0.9, clip=4.0)
    b.load_state_dict(a.state_dict())
    assert b.mean_square == a.mean_square and b.steps == a.steps
    assert b.scale([0.002]) == a.scale([0.002])


def test_init_and_final_mask_return_the_prior():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randint(-2, 3, (8, 32), generator=gen).float()  # many |w| ties
    prior = policy.nm.magnitude_prior(weight, 2, 4)
    logits = init_logits(prior, 10.0, 4)
    assert logits.dtype == torch.float32 and logits.shape == (64, 4)
    assert torch.equal(logits, prior.view(-1, 4).float() * 10.0)
    final = final_mask(logits, 2, 4)
    assert torch.equal(final, prior.view(-1, 4))
    assert torch.equal(final_mask(logits, 2, 4), final)  # deterministic
    # Ties in the logits themselves go to the lower index.
    assert final_mask(torch.zeros(1, 4), 2, 4).tolist() == [[True, True, False, False]]
    assert final_mask(torch.tensor([[0.0, 3.0, 3.0, 3.0]]), 2, 4).tolist() == [[False, True, True, False]]


def test_expected_flip_rate_and_entropy():
    assert policy.expected_flip_rate(10.0, 2, 4) == pytest.approx(1.0 - 1.0 / ((1 + math.exp(-10)) * (1 + 2 * math.exp(-10))))
    assert policy.mask_entropy(torch.zeros(5, 4), 2) == pytest.approx(math.log(6.0), rel=1e-6)
    confident = policy.mask_entropy(init_logits(torch.tensor([True, True, False, False]), 10.0, 4), 2)
    assert 0.0 < confident < 2e-3
    with pytest.raises(ValueError, match="N = 2"):
        policy.mask_entropy(torch.zeros(5, 8), 4)
