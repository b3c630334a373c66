"""The closed-form expected layer error (masks/layer_error.py) against exact enumeration, and its
score-kernel gradient against autograd."""

import itertools

import pytest
import torch

from maskpro_ds.masks.layer_error import expected_error_gradient, expected_row_error
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
