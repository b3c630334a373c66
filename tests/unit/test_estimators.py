"""The estimators beyond MaskPro's own: K masks per rank with a leave-one-out baseline (``loo``),
per-logit second-moment steps (``adaptive``), and the step-size schedule.

Unbiasedness is checked twice: exactly, by enumerating every K-tuple of sets of one 2:4 group and
every batch of a toy objective with a per-batch offset and a mask-batch interaction; and
statistically, through the sharded store's own draws and update on a multi-group toy.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from maskpro_ds.config import Config
from maskpro_ds.masks import nm
from maskpro_ds.masks.policy import apply_update_, apply_update_codes_, log_prob_set, score
from maskpro_ds.masks.sampling import key_scalar, masks_to_codes, packed_to_codes, sample_codes, sample_masks
from maskpro_ds.masks.second_moment import SecondMomentRule, bias_scale
from maskpro_ds.train.estimators import StepLosses, make_estimator
from maskpro_ds.train.estimators.loo import leave_one_out
from maskpro_ds.train.logit_store import LogitStore, select_kernels
from maskpro_ds.train.mask_modes import SampleMode
from maskpro_ds.train.step_size import lr_factor

SETS = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]], dtype=torch.bool)
CODE_TO_SET = torch.zeros(16, dtype=torch.long)
CODE_TO_SET[masks_to_codes(SETS).long()] = torch.arange(len(SETS))


def _train(**kw):
    return dataclasses.replace(Config().train, **kw)


def _toy(seed: int):
    """f(S, ξ) = g(S)·(1 + u_ξ) + c_ξ for 3 batches ξ: a large offset c and a mask-batch interaction u."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.rand(len(SETS), generator=gen, dtype=torch.float64)
    g[0] = 0.0  # set 0 = {0, 1} is the prior m0
    u = torch.tensor([-0.4, 0.1, 0.6], dtype=torch.float64)
    c = torch.tensor([28.0, 31.0, 35.0], dtype=torch.float64)
    p_batch = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    return g, u, c, p_batch


def _true_gradient(x: torch.Tensor, g, u, c, p_batch) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    probs = torch.exp(log_prob_set(x.expand(len(SETS), 4), SETS, 2))
    value = sum(p_batch[b] * (probs * (g * (1 + u[b]) + c[b])).sum() for b in range(3))
    (grad,) = torch.autograd.grad(value, x)
    return grad


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("tracker_weight", [0.0, 0.4])
def test_leave_one_out_is_unbiased_by_exact_enumeration(k, tracker_weight):
    g, u, c, p_batch = _toy(k)
    x = torch.tensor([1.2, 0.9, -0.3, 0.1], dtype=torch.float64)
    probs = torch.exp(log_prob_set(x.expand(len(SETS), 4), SETS, 2))
    scores = score(x.expand(len(SETS), 4).contiguous(), SETS, 2)
    est = make_estimator(_train(estimator="loo", masks_per_step=k, loo_tracker_weight=tracker_weight))
    est.tracker.delta = 0.7  # a baseline from earlier steps: must not bias the estimate
    expected = torch.zeros(4, dtype=torch.float64)
    for b in range(3):
        f0 = float(g[0] * (1 + u[b]) + c[b])
        for draw in itertools.product(range(len(SETS)), repeat=k):
            losses = [float(g[s] * (1 + u[b]) + c[b]) for s in draw]
            adv = est.advantages(StepLosses(losses, [f0] * k))
            weight = p_batch[b] * torch.prod(probs[list(draw)])
            expected += weight * sum(a * scores[s] for a, s in zip(adv, draw, strict=True)) / k
    true = _true_gradient(x, g, u, c, p_batch)
    assert float(true.abs().max()) > 1e-2  # not vacuous
    assert torch.allclose(expected, true, rtol=0, atol=1e-12), (expected, true)


def test_leave_one_out_cancels_the_batch_offset_and_falls_back_to_the_tracker():
    est = make_estimator(_train(estimator="loo", masks_per_step=2))
    a = est.advantages(StepLosses([2.5, 2.25, 3.0, 3.5], [2.0, 2.0, 3.25, 3.25]))
    assert a == [0.25, -0.25, -0.5, 0.5]  # each rank's two draws against each other; f(m0) cancels
    assert leave_one_out([1.0, 2.0, 4.0], 3) == [3.0, 2.5, 1.5]
    with pytest.raises(ValueError, match="k >= 2 dividing"):
        leave_one_out([1.0, 2.0, 4.0], 2)
    one = make_estimator(_train(estimator="loo"))
    tracker = make_estimator(_train(estimator="residual_tracker"))
    for est_ in (one, tracker):
        est_.tracker.delta = 0.125
    step = StepLosses([2.5, 2.75], [2.25, 2.5])
    assert one.advantages(step) == tracker.advantages(step) == [0.125, 0.125]
    assert one.draws_per_rank == 1 and make_estimator(_train(estimator="adaptive", masks_per_step=4)).draws_per_rank == 4


def _stores(draws: int, prior: torch.Tensor, c: float) -> list[LogitStore]:
    stores = [LogitStore(["a"], [(prior.shape[0] * 4 // 40, 40)], 2, 4, rank, 2, seed=3, kernels="plain", draws=draws)
              for rank in range(2)]
    for store in stores:
        g0, g1 = store.local_range(0)
        store.init_from_prior(0, prior[g0:g1], c)
    return stores


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("cache", [True, False])
def test_k_draws_per_rank_match_the_whole_layer_reference_bit_for_bit(adaptive, cache):
    """Two in-process stores of a world of 2 with K = 2 draws each vs the whole layer updated over
    the 4 masks of slots r·K + d (rank-major), plain or with the second-moment rule."""
    gen = torch.Generator().manual_seed(0)
    prior = nm.magnitude_prior(torch.randn(60, 40, generator=gen), 2, 4).view(-1, 4)
    stores = _stores(2, prior, c=2.0)
    for store in stores:
        store.cache_samples = cache
    whole = torch.cat([s.logits[0] for s in stores]).clone()
    v_whole = torch.zeros_like(whole)
    v_slices = [torch.zeros_like(s.logits[0]) for s in stores]
    advantages = [[0.3, -0.5, 0.1, 0.2], [-0.2, 0.9, 0.0, -0.4], [1.5, -0.1, 0.3, 0.3]]
    for t, adv in enumerate(advantages):
        masks = [sample_masks(whole, 2, key_scalar(3, t, slot, 0)) for slot in range(4)]
        for rank, store in enumerate(stores):
            g0, g1 = store.local_range(0)
            for d in range(2):
                send, sizes = store.forward_send(0, SampleMode(t, d))
                for r in range(2):  # rank r's draw d on this slice is slot r·K + d
                    assert torch.equal(send[sum(sizes[:r]):sum(sizes[:r + 1])],
                                       nm.pack_bits(masks[r * 2 + d][g0:g1].reshape(-1)))
            rule = SecondMomentRule(v_slices[rank], 0.9, 1e-2, t) if adaptive else None
            store.apply_update(0, t, adv, 2.0, rule)
        if adaptive:
            SecondMomentRule(v_whole, 0.9, 1e-2, t).apply_masks(whole, masks, adv, 2.0, 2)
        else:
            apply_update_(whole, masks, adv, 2.0, 2)
    got = torch.cat([s.logits[0] for s in stores])
    assert torch.equal(got.view(torch.int32), whole.view(torch.int32))
    if adaptive:
        assert torch.equal(torch.cat(v_slices).view(torch.int32), v_whole.view(torch.int32))
        assert float(v_whole.abs().max()) > 0
    assert not torch.equal(whole, torch.cat([s.logits[0] for s in _stores(2, prior, c=2.0)]))  # it moved
    with pytest.raises(ValueError, match="need 4 advantages"):
        stores[0].apply_update(0, 9, [0.1, 0.2], 1.0)


def test_compiled_update_kernel_gives_the_plain_bits_for_r_times_k_masks():
    sample_kernel, update_kernel, name = select_kernels("auto", slots=(2, 6))
    if name != "compiled":
        pytest.skip(f"torch.compile unavailable here: {name}")
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1001, 4, generator=gen) * 3.0
    codes = sample_codes(x, [key_scalar(1, 2, slot, 0) for slot in range(6)], kernel=sample_kernel, chunk=1000)
    assert torch.equal(codes, sample_codes(x, [key_scalar(1, 2, slot, 0) for slot in range(6)]))
    adv = [0.6, -1.1, 0.2, 0.0, -0.3, 0.9]
    want, got = x.clone(), x.clone()
    final = apply_update_codes_(want, codes, adv, 4.0)
    final_c = apply_update_codes_(got, codes, adv, 4.0, kernel=update_kernel, chunk=1000)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32)) and torch.equal(final, final_c)


def test_second_moment_direction_is_unbiased_given_the_past():
    """With v from earlier steps, E[Δπ] = −lr ∇E[f] / (sqrt(v̂) + ε) exactly (fp32 rounding aside)."""
    g, u, c, p_batch = _toy(9)
    x = torch.tensor([1.0, 0.6, -0.2, 0.3], dtype=torch.float32)
    v = torch.tensor([[0.04, 0.001, 0.0, 0.3]], dtype=torch.float32)
    beta, eps, lr, k, updates = 0.9, 1e-2, 0.5, 2, 7
    probs = torch.exp(log_prob_set(x.double().expand(len(SETS), 4), SETS, 2))
    est = make_estimator(_train(estimator="adaptive", masks_per_step=k))
    expected = torch.zeros(4, dtype=torch.float64)
    for b in range(3):
        f0 = float(g[0] * (1 + u[b]) + c[b])
        for draw in itertools.product(range(len(SETS)), repeat=k):
            adv = est.advantages(StepLosses([float(g[s] * (1 + u[b]) + c[b]) for s in draw], [f0] * k))
            logits, state = x.view(1, 4).clone(), v.clone()
            SecondMomentRule(state, beta, eps, updates).apply_masks(logits, [SETS[s].view(1, 4) for s in draw], adv, lr, 2)
            expected += p_batch[b] * torch.prod(probs[list(draw)]) * (logits - x).double().view(4)
    denom = torch.sqrt(v.double().view(4) * bias_scale(beta, updates)) + eps
    want = -lr * _true_gradient(x.double(), g, u, c, p_batch) / denom
    assert float(want.abs().max()) > 1e-2
    assert torch.allclose(expected, want, rtol=1e-4, atol=1e-5), (expected, want)


@pytest.mark.parametrize("name", ["loo", "adaptive"])
def test_store_updates_are_unbiased_on_a_many_group_toy(name):
    """The store's own draws (K = 3 on one batch per step) and update, many steps at fixed logits:
    the mean logit change is −lr·∇E[f] (times 1/ε for adaptive at its first step), within 5 SE."""
    groups, k, steps, lr = 5, 3, 1500, 1.0
    gen = torch.Generator().manual_seed(11)
    table = torch.rand(groups, len(SETS), generator=gen, dtype=torch.float64)
    table[:, 0] = 0.0
    store = LogitStore(["a"], [(groups, 4)], 2, 4, 0, 1, seed=4, kernels="plain", draws=k)
    store.init_from_prior(0, SETS[[0] * groups], 1.0)
    store.logits[0] += 0.8 * torch.randn(groups, 4, generator=gen)
    x = store.logits[0].clone()
    est = make_estimator(_train(estimator=name, masks_per_step=k, adaptive_eps=0.5))
    changes = []
    for t in range(steps):
        offset, inter = float(30 + 5 * torch.randn((), generator=gen)), float(0.5 * torch.rand((), generator=gen))
        losses = []
        for d in range(k):
            send, _ = store.forward_send(0, SampleMode(t, d))
            sets = CODE_TO_SET[packed_to_codes(send, groups, 4).long()]
            losses.append(float(table[torch.arange(groups), sets].sum()) * (1 + inter) + offset)
        step = StepLosses(losses, [offset] * k)
        adv = est.advantages(step)
        rule = est.update_rule("a")
        if rule is not None:
            est.second.clear()  # the first step's rule every time: divisor ε, a fixed scale
        store.apply_update(0, t, adv, lr, rule)
        changes.append((store.logits[0] - x).double().flatten())
        store.logits[0] = x.clone()
        est.commit(step)
    changes = torch.stack(changes)
    x64 = x.double().requires_grad_(True)
    value = sum((torch.exp(log_prob_set(x64[i].expand(len(SETS), 4), SETS, 2)) * table[i]).sum() for i in range(groups))
    (grad,) = torch.autograd.grad(value * (1 + 0.25), x64)  # E[1 + inter] = 1.25
    want = -lr * grad.flatten() / (0.5 if name == "adaptive" else 1.0)
    mean, se = changes.mean(dim=0), changes.std(dim=0) / math.sqrt(steps)
    z = (mean - want).abs() / se
    assert float(z.max()) < 5.0, float(z.max())
    assert float(want.abs().max()) > 3 * float(se.max())  # the test can tell the gradient from zero


def test_adaptive_state_is_sliced_saved_and_restored_exactly():
    stores = _stores(2, nm.magnitude_prior(torch.randn(30, 40), 2, 4).view(-1, 4), c=2.0)
    ests = [make_estimator(_train(estimator="adaptive", masks_per_step=2, adaptive_beta=0.9)) for _ in stores]
    steps = [StepLosses([2.5, 2.25, 3.0, 3.5], [2.0, 2.0, 3.25, 3.25]), StepLosses([2.0, 2.5, 3.0, 2.0], [2.0, 2.0, 2.5, 2.5])]
    assert ests[0].slice_state() == {}  # nothing before the first update
    for t, step in enumerate(steps):
        for store, est in zip(stores, ests, strict=True):
            store.apply_update(0, t, est.advantages(step), 0.5, est.update_rule("a"))
            est.commit(step)
    saved = [(est.state_dict(), {k: v.clone() for k, v in est.slice_state().items()}) for est in ests]
    assert list(saved[0][1]) == ["a/second_moment"]
    logits = [s.logits[0].clone() for s in stores]
    again = []
    for store, est in zip(stores, ests, strict=True):
        store.apply_update(0, 2, est.advantages(steps[0]), 0.5, est.update_rule("a"))
        again.append(store.logits[0].clone())
    for store, lg, (state, tensors) in zip(stores, logits, saved, strict=True):
        store.logits[0] = lg
        est = make_estimator(_train(estimator="adaptive", masks_per_step=2, adaptive_beta=0.9))
        est.load_state_dict(state)
        est.load_slice_state(tensors)
        assert est.updates == 2
        store.apply_update(0, 2, est.advantages(steps[0]), 0.5, est.update_rule("a"))
    for store, want in zip(stores, again, strict=True):
        assert torch.equal(store.logits[0].view(torch.int32), want.view(torch.int32))


def test_bias_scale_and_first_step_divisor():
    assert bias_scale(0.9, 0) == 0.0
    assert bias_scale(0.9, 1) == pytest.approx(10.0, rel=1e-12)
    assert bias_scale(0.999, 10_000) == pytest.approx(1.0, rel=1e-4)
    logits = torch.tensor([[3.0, 3.0, 0.0, 0.0]])
    v = torch.zeros_like(logits)
    mask = SETS[5].view(1, 4)
    SecondMomentRule(v, 0.9, 0.5, 0).apply_masks(logits, [mask], [1.0], 1.0, 2)
    plain = torch.tensor([[3.0, 3.0, 0.0, 0.0]])
    apply_update_(plain, [mask], [2.0], 1.0, 2)  # the first step is the plain one scaled by 1/ε
    assert torch.allclose(logits, plain, rtol=1e-6)
    assert float(v.sum()) > 0
    with pytest.raises(ValueError, match="must be fp32"):
        SecondMomentRule(v.double(), 0.9, 0.5, 0)


def test_lr_schedules():
    t = _train(steps=11, lr_schedule="cosine", lr_final_ratio=0.1, lr_warmup_steps=0)
    assert lr_factor(t, 0) == 1.0 and lr_factor(t, 10) == pytest.approx(0.1) and lr_factor(t, 5) == pytest.approx(0.55)
    lin = dataclasses.replace(t, lr_schedule="linear", lr_warmup_steps=1)
    assert [lr_factor(lin, s) for s in (0, 1, 10)] == [1.0, 1.0, pytest.approx(0.1)]
    warm = dataclasses.replace(t, lr_schedule="constant", lr_warmup_steps=4)
    assert [lr_factor(warm, s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


@pytest.mark.parametrize(("key", "value", "match"), [
    ("masks_per_step", 0, "masks_per_step must be in 1..64"),
    ("loo_tracker_weight", 1.5, "loo_tracker_weight must be in"),
    ("adaptive_beta", 1.0, "adaptive_beta must be in"),
    ("adaptive_eps", 0.0, "adaptive_eps must be > 0"),
    ("lr_schedule", "step", "lr_schedule = 'step' is not allowed"),
])
def test_config_rejects_bad_estimator_options(key, value, match):
    cfg = Config()
    setattr(cfg.train, key, value)
    with pytest.raises(ValueError, match=match):
        cfg.validate()
