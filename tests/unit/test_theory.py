"""The checks the theory gives (docs/method.md §6), each asserting a number that could fail."""

import itertools
import math

import pytest
import torch

from maskpro_ds.masks import policy
from maskpro_ds.masks.advantages import ResidualTracker
from maskpro_ds.masks.policy import expected_flip_rate, log_prob_set, score
from maskpro_ds.masks.sampling import key_scalar, pair_probs, sample_masks


def _all_sets(n: int, m: int) -> torch.Tensor:
    """Every N-subset of M positions as a bool mask ``[C(M, N), M]``."""
    subsets = list(itertools.combinations(range(m), n))
    masks = torch.zeros(len(subsets), m, dtype=torch.bool)
    for i, s in enumerate(subsets):
        masks[i, list(s)] = True
    return masks


def _permutation_sum(p: torch.Tensor, subset: list[int]) -> torch.Tensor:
    total = torch.zeros((), dtype=p.dtype)
    for order in itertools.permutations(subset):
        prob, used = torch.ones((), dtype=p.dtype), torch.zeros((), dtype=p.dtype)
        for k in order:
            prob = prob * p[k] / (1 - used)
            used = used + p[k]
        total = total + prob
    return total


# §6.1 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (2, 8), (3, 16)])
def test_set_probabilities_sum_to_one(n, m):
    gen = torch.Generator().manual_seed(n * 100 + m)
    sets = _all_sets(n, m)
    for scale in [0.5, 3.0, 10.0]:
        logits = (torch.randn(m, generator=gen, dtype=torch.float64) * scale).expand(len(sets), m)
        total = torch.exp(log_prob_set(logits, sets, n)).sum()
        assert abs(float(total) - 1.0) < 1e-12, (scale, float(total))
    if n == 2:
        assert abs(float(pair_probs(logits[:1]).sum()) - 1.0) < 1e-12


# §6.2 ----------------------------------------------------------------------------------------
def test_closed_form_equals_permutation_sum_and_dp():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(40, 4, generator=gen, dtype=torch.float64) * 2.0
    for mask in _all_sets(2, 4):
        masks = mask.expand(40, 4)
        closed = log_prob_set(logits, masks, 2)
        ref = torch.stack([torch.log(_permutation_sum(torch.softmax(r, 0), mask.nonzero().flatten().tolist()))
                           for r in logits])
        assert torch.allclose(closed, ref, rtol=0, atol=1e-13)
    # General-N subset DP against the permutation sum too (N = 3, 4 of 8).
    for n in (1, 3, 4):
        logits8 = torch.randn(30, 8, generator=gen, dtype=torch.float64) * 2.0
        sets = _all_sets(n, 8)[torch.randint(0, math.comb(8, n), (30,), generator=gen)]
        got = log_prob_set(logits8, sets, n)
        ref = torch.stack([torch.log(_permutation_sum(torch.softmax(r, 0), s.nonzero().flatten().tolist()))
                           for r, s in zip(logits8, sets, strict=True)])
        assert torch.allclose(got, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("m", [4, 8])
def test_closed_form_score_equals_finite_differences_and_autograd(m):
    gen = torch.Generator().manual_seed(m)
    logits = torch.randn(25, m, generator=gen, dtype=torch.float64) * 2.0
    sets = _all_sets(2, m)[torch.randint(0, math.comb(m, 2), (25,), generator=gen)]
    closed = score(logits, sets, 2)
    x = logits.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(log_prob_set(x, sets, 2).sum(), x)
    assert torch.allclose(closed, auto, rtol=0, atol=1e-13)
    h = 1e-5
    fd = torch.zeros_like(logits)
    for j in range(m):
        e = torch.zeros_like(logits)
        e[:, j] = h
        fd[:, j] = (log_prob_set(logits + e, sets, 2) - log_prob_set(logits - e, sets, 2)) / (2 * h)
    assert float((closed - fd).abs().max()) < 1e-7


# §6.4 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,m", [(2, 4), (3, 6), (4, 8)])
def test_score_estimator_is_unbiased_for_any_baseline(n, m):
    gen = torch.Generator().manual_seed(7 * m)
    sets = _all_sets(n, m)
    f = torch.rand(len(sets), generator=gen, dtype=torch.float64) * 2.0 - 0.5  # arbitrary f(S)
    base = torch.randn(m, generator=gen, dtype=torch.float64)
    x = base.clone().requires_grad_(True)
    logp = log_prob_set(x.expand(len(sets), m), sets, n)
    (true_grad,) = torch.autograd.grad((torch.exp(logp) * f).sum(), x)
    probs = torch.exp(logp.detach())
    scores = score(base.expand(len(sets), m).contiguous(), sets, n)
    assert float(true_grad.abs().max()) > 1e-3  # the check is not vacuous
    for b in [0.0, 0.3, -2.0, 17.0]:
        estimate = (probs * (f - b)).unsqueeze(1).mul(scores).sum(dim=0)
        assert torch.allclose(estimate, true_grad, rtol=0, atol=1e-13), b


# §6.5 ----------------------------------------------------------------------------------------
def test_variance_ordering_vanilla_residual_tracker():
    """f(m, xi) = g(m) + c(xi) with c ~ 30 + 5 N(0, 1): a large per-batch offset.

    Four 2:4 groups; g is a fixed random table per group and set, with the prior set m0 best
    (g(m0) = 0). Draws come from the package sampler, scores from the closed form.
    """
    n, m, groups, steps = 2, 4, 4, 20000
    gen = torch.Generator().manual_seed(5)
    sets = _all_sets(n, m)
    table = 1.0 + torch.rand(groups, len(sets), generator=gen, dtype=torch.float64)
    table[:, 0] = 0.0  # set 0 = {0, 1} = m0
    logits = torch.tensor([[1.5, 1.5, 0.0, 0.0], [1.0, 0.5, 0.0, 0.2], [2.0, 1.0, 0.5, 0.0], [0.8, 0.8, 0.0, 0.3]],
                          dtype=torch.float64)
    # Exact gradient of E[g] by enumeration and autograd.
    x = logits.clone().requires_grad_(True)
    exp_g = sum((torch.exp(log_prob_set(x[i].expand(len(sets), m), sets, n)) * table[i]).sum() for i in range(groups))
    (true_grad,) = torch.autograd.grad(exp_g, x)
    # `steps` independent draws: the group's logits repeated, one row per step.
    rows = logits.repeat(steps, 1)
    masks = sample_masks(rows.float(), n, key_scalar(0, 0, 0, 0))
    codes = (masks.long() * torch.tensor([1, 2, 4, 8])).sum(dim=1)
    set_code = (sets.long() * torch.tensor([1, 2, 4, 8])).sum(dim=1)
    lookup = torch.full((16,), -1, dtype=torch.long)
    lookup[set_code] = torch.arange(len(sets))
    set_idx = lookup[codes].view(steps, groups)
    g = table.gather(1, set_idx.t()).t().sum(dim=1)  # [steps]
    c = 30.0 + 5.0 * torch.randn(steps, generator=gen, dtype=torch.float64)
    scores = score(rows, masks, n).view(steps, groups * m)
    residual = g  # f(m, xi) - f(m0, xi) = g(m) - g(m0) = g(m)
    tracker = ResidualTracker(alpha=0.99)
    tracked = torch.tensor([tracker.step([float(r)])[0] for r in residual], dtype=torch.float64)
    estimates = {
        "vanilla": (g + c).unsqueeze(1) * scores,
        "residual": residual.unsqueeze(1) * scores,
        "tracker": tracked.unsqueeze(1) * scores,
    }
    total_var = {}
    for name, est in estimates.items():
        mean, std = est.mean(dim=0), est.std(dim=0)
        # Unbiased: every coordinate within 5 standard errors of the exact gradient.
        z = (mean - true_grad.flatten()).abs() / (std / math.sqrt(steps))
        assert float(z.max()) < 5.0, (name, float(z.max()))
        total_var[name] = float(est.var(dim=0).sum())
    assert total_var["vanilla"] > 50.0 * total_var["residual"], total_var
    assert total_var["residual"] > 1.3 * total_var["tracker"], total_var


# §6.6 ----------------------------------------------------------------------------------------
def test_final_mask_strict_deterministic_and_prior_before_training():
    gen = torch.Generator().manual_seed(2)
    prior = policy.nm.topn_mask(torch.randint(0, 3, (16, 64), generator=gen).float(), 2, 4)
    logits = policy.init_logits(prior, 1.0, 4)  # C = 1: updates move it within a few steps
    assert torch.equal(policy.final_mask(logits, 2, 4), prior.view(-1, 4))
    assert torch.equal(policy.final_mask(policy.init_logits(prior, 10.0, 4), 2, 4), prior.view(-1, 4))
    for step in range(5):  # a few large updates, then the final mask is still strict 2:4
        masks = [sample_masks(logits, 2, key_scalar(0, step, k, 0)) for k in range(2)]
        policy.apply_update_(logits, masks, [0.5, -0.3], 40.0)
    final = policy.final_mask(logits, 2, 4)
    assert torch.equal(final.sum(dim=1), torch.full((256,), 2))
    assert torch.equal(policy.final_mask(logits.clone(), 2, 4), final)
    assert (final != prior.view(-1, 4)).any()


# §6.7 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("c,paper,groups", [(5.0, 2.0e-2, 200_000), (7.0, 2.7e-3, 400_000), (10.0, 1.4e-4, 2_000_000)])
def test_flip_rate_closed_form_and_sampling(c, paper, groups):
    rate = expected_flip_rate(c, 2, 4)
    assert f"{rate:.1e}" == f"{paper:.1e}", rate  # the numbers in docs/method.md, to 2 digits
    prior = torch.tensor([True, True, False, False]).repeat(groups)
    logits = policy.init_logits(prior, c, 4)
    flips = int((sample_masks(logits, 2, key_scalar(9, 0, 0, 0)) != prior.view(-1, 4)).any(dim=1).sum())
    expected = rate * groups
    assert abs(flips - expected) < 5.0 * math.sqrt(expected), (flips, expected)


def test_flip_rate_4_8_gumbel_path():
    rate = expected_flip_rate(3.0, 4, 8)
    groups = 100_000
    prior = torch.tensor([True] * 4 + [False] * 4).repeat(groups)
    logits = policy.init_logits(prior, 3.0, 8)
    flips = int((sample_masks(logits, 4, key_scalar(9, 1, 0, 0)) != prior.view(-1, 8)).any(dim=1).sum())
    assert abs(flips - rate * groups) < 5.0 * math.sqrt(rate * groups * (1 - rate)), (flips, rate * groups)
