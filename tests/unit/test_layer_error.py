"""The closed-form expected layer error (masks/layer_error.py) against exact enumeration, and its
score-kernel gradient against autograd."""

import itertools

import pytest
import torch

from maskpro_ds.masks.layer_error import expected_error_gradient, expected_row_error, slice_error_gradient
from maskpro_ds.masks.sampling import pair_probs


def _case(rows: int, d_in: int, m: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, d_in, generator=gen, dtype=torch.float64)
    x = torch.randn(3 * d_in, d_in, generator=gen, dtype=torch.float64) + 0.5 * torch.randn(1, d_in, generator=gen,
                                                                                              dtype=torch.float64)
    logits = torch.randn(rows * d_in // m, m, generator=gen, dtype=torch.float64) * 1.5
    return w, x.t() @ x, logits  # a correlated H, as real activations give


@pytest.mark.parametrize(("rows", "d_in", "m"), [(2, 8, 4), (1, 16, 8)])
def test_expected_error_equals_enumeration(rows, d_in, m):
    w, h, logits = _case(rows, d_in, m, seed=d_in)
    pairs = list(itertools.combinations(range(m), 2))
    probs = pair_probs(logits)  # [G, C]
    groups = d_in // m
    want = torch.zeros(rows, dtype=torch.float64)
    for r in range(rows):
        for choice in itertools.product(range(len(pairs)), repeat=groups):
            keep = torch.zeros(d_in, dtype=torch.float64)
            p = 1.0
            for g, k in enumerate(choice):
                keep[g * m + pairs[k][0]] = keep[g * m + pairs[k][1]] = 1.0
                p *= float(probs[r * groups + g, k])
            z = w[r] * (1.0 - keep)
            want[r] += p * (z @ h @ z)
    got = expected_row_error(w, logits, h)
    assert torch.allclose(got, want, rtol=1e-10, atol=0), (got, want)


@pytest.mark.parametrize(("rows", "d_in", "m"), [(3, 12, 4), (2, 16, 8)])
def test_gradient_equals_autograd(rows, d_in, m):
    w, h, logits = _case(rows, d_in, m, seed=7 + m)
    x = logits.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(expected_row_error(w, x, h).sum(), x)
    got = expected_error_gradient(w, logits, h)
    assert float(want.abs().max()) > 1e-2
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-9), float((got - want).abs().max())


def test_shapes_are_checked():
    w, h, logits = _case(2, 8, 4, seed=0)
    with pytest.raises(ValueError, match="need w"):
        expected_row_error(w, logits[:-1], h)


def _rho(logits: torch.Tensor) -> torch.Tensor:
    """P(position pruned) ``[G, M]`` for N = 2 (one minus the kept probability of the pairs)."""
    m = logits.shape[1]
    pairs = list(itertools.combinations(range(m), 2))
    kept = torch.zeros(len(pairs), m, dtype=logits.dtype)
    for k, (a, b) in enumerate(pairs):
        kept[k, a] = kept[k, b] = 1.0
    return 1.0 - pair_probs(logits) @ kept


@pytest.mark.parametrize(("offset", "g"), [(0, 6), (1, 3), (4, 2), (2, 1)])
def test_slice_gradient_is_the_full_gradient_on_its_groups(offset, g):
    """A run of groups that starts and ends inside rows, the others held at their probabilities."""
    w, h, logits = _case(3, 8, 4, seed=5)
    full = expected_error_gradient(w, logits, h)
    got = slice_error_gradient(w, h, logits[offset:offset + g], _rho(logits), offset)
    assert torch.allclose(got, full[offset:offset + g], rtol=1e-10, atol=1e-12)


def test_slice_gradient_with_sampled_masks_elsewhere_is_unbiased():
    """Averaged over every mask of the other groups (weighted by its probability), the gradient with
    sampled indicators equals the gradient at the probabilities: E is linear in each other group."""
    w, h, logits = _case(1, 12, 4, seed=9)  # one row, 3 groups; the run is the middle one
    pairs = list(itertools.combinations(range(4), 2))
    probs = pair_probs(logits)
    mean = torch.zeros(1, 4, dtype=torch.float64)
    for a, c in itertools.product(range(len(pairs)), repeat=2):
        pruned = torch.ones(3, 4, dtype=torch.float64)
        pruned[0, list(pairs[a])] = 0.0
        pruned[2, list(pairs[c])] = 0.0
        mean += float(probs[0, a] * probs[2, c]) * slice_error_gradient(w, h, logits[1:2], pruned, 1)
    want = expected_error_gradient(w, logits, h)[1:2]
    assert torch.allclose(mean, want, rtol=1e-10, atol=1e-12)


def test_row_scale_weighs_each_row():
    w, h, logits = _case(2, 8, 4, seed=3)
    scale = torch.tensor([0.5, 3.0], dtype=torch.float64)
    got = slice_error_gradient(w, h, logits, _rho(logits), 0, row_scale=scale)
    plain = expected_error_gradient(w, logits, h)
    assert torch.allclose(got, plain * scale.repeat_interleave(2).unsqueeze(1), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="do not fit"):
        slice_error_gradient(w, h, logits, _rho(logits), 1)
