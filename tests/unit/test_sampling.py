"""Counter-based RNG and exact N:M sampling: determinism, layout independence, distribution."""

import itertools
import math

import pytest
import torch

from maskpro_ds.masks import sampling
from maskpro_ds.masks.sampling import counter_bits, counter_uniform, key_scalar, pair_probs, sample_masks


def _mix32_reference(x: int) -> int:
    """The mixer written out on Python ints (unbounded, so no overflow question arises)."""
    x ^= x >> 16
    x = (x * 0x21F0AAAD) % 2**32
    x ^= x >> 15
    x = (x * 0x735A2D97) % 2**32
    x ^= x >> 15
    return x


def _bits_reference(key: int, counter: int) -> int:
    x = _mix32_reference((counter % 2**32) ^ (key % 2**32))
    return _mix32_reference(x ^ (counter >> 32) ^ ((key >> 32) % 2**32))


def _set_probability(p: list[float], subset: tuple[int, ...]) -> float:
    """P(S) as the sum over the N! orderings of the sequential draw (docs/method.md §2)."""
    total = 0.0
    for order in itertools.permutations(subset):
        prob, used = 1.0, 0.0
        for k in order:
            prob *= p[k] / (1.0 - used)
            used += p[k]
        total += prob
    return total


def test_counter_bits_match_python_reference():
    key = key_scalar(7, 123, 3, 45)
    counters = torch.tensor([0, 1, 2, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 2**40 + 17, 2**62 + 3])
    got = counter_bits(key, counters).tolist()
    assert got == [_bits_reference(key, c) for c in counters.tolist()]
    assert all(0 <= v < 2**32 for v in got)


def test_key_scalar_hashes_rather_than_adds():
    keys = {key_scalar(s, t, k, layer) for s in range(3) for t in range(3) for k in range(3) for layer in range(3)}
    assert len(keys) == 81
    assert key_scalar(0, 1, 0, 0) != key_scalar(0, 0, 1, 0)
    assert key_scalar(1, 2, 3, 4) == key_scalar(1, 2, 3, 4)
    assert 0 <= key_scalar(2**40, 2**33, 1, 0) < 2**64
    with pytest.raises(ValueError, match="key_scalar"):
        key_scalar(0, -1, 0, 0)


def test_counter_uniform_range_and_uniformity():
    u = counter_uniform(key_scalar(0, 0, 0, 0), torch.arange(1 << 20))
    assert u.dtype == torch.float32
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert torch.equal(u * 2**24, torch.floor(u * 2**24))  # multiples of 2**-24, exact
    # 64 equal bins: chi-square with 63 dof; mean 63, sd ~11.2; 120 is ~5 sd.
    counts = torch.bincount((u * 64).long(), minlength=64).double()
    expected = u.numel() / 64
    assert float(((counts - expected) ** 2 / expected).sum()) < 120.0
    # Neighbouring counters are not correlated (lag-1 correlation ~ N(0, 1/sqrt(n)) = 0.001).
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.005
    # A different key gives an unrelated stream.
    v = counter_uniform(key_scalar(0, 1, 0, 0), torch.arange(1 << 20))
    assert abs(float(torch.corrcoef(torch.stack([u, v]))[0, 1])) < 0.005


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (3, 4), (2, 8), (4, 8), (8, 16)])
def test_exact_count_even_for_extreme_logits(n, m):
    gen = torch.Generator().manual_seed(m * 10 + n)
    rows = [
        torch.randn(200, m, generator=gen),
        torch.zeros(50, m),  # all tied
        (torch.rand(50, m, generator=gen) * 300.0) - 150.0,  # gaps of hundreds
        torch.where(torch.arange(m) < n, 10.0, 0.0).expand(50, m),  # C = 10 prior
        torch.where(torch.arange(m) < 1, 500.0, -500.0).expand(50, m),  # one dominant logit
        torch.where(torch.arange(m) % 3 == 0, 60.0, 0.0).expand(50, m),  # gaps of 60
    ]
    logits = torch.cat(rows).contiguous()
    for step in range(3):
        mask = sample_masks(logits, n, key_scalar(1, step, 0, 0))
        assert mask.dtype == torch.bool and mask.shape == logits.shape
        assert torch.equal(mask.sum(dim=1), torch.full((logits.shape[0],), n))


def test_dominant_logits_pick_the_right_runner_up():
    # pi = [200, 10, 0, 0]: position 0 first, then position 1 with probability ~1 - 2e-5.
    logits = torch.tensor([[200.0, 10.0, 0.0, 0.0]]).expand(20000, 4).contiguous()
    mask = sample_masks(logits, 2, key_scalar(0, 0, 0, 0))
    assert bool(mask[:, 0].all())
    assert int(mask[:, 1].sum()) >= 19990
    probs = pair_probs(logits[:1].double())
    assert abs(float(probs[0, 0]) - 1.0 / (1.0 + 2.0 * math.exp(-10.0))) < 1e-12
    assert torch.isfinite(pair_probs(torch.tensor([[1e4, -1e4, 0.0, 3.0]]))).all()


@pytest.mark.parametrize("n,m", [(2, 4), (2, 8), (4, 8)])
def test_slice_of_whole_equals_whole_then_slice(n, m):
    gen = torch.Generator().manual_seed(5)
    g_total = sampling.CHUNK_GROUPS + 1234  # crosses a chunk boundary
    logits = torch.randn(g_total, m, generator=gen) * 2.0
    key = key_scalar(3, 9, 1, 7)
    whole = sample_masks(logits, n, key)
    for a, b in [(0, 17), (5, 1000), (777, g_total), (sampling.CHUNK_GROUPS - 3, sampling.CHUNK_GROUPS + 9)]:
        assert torch.equal(sample_masks(logits[a:b], n, key, group_offset=a), whole[a:b])
    # Same key and logits: same bits on repeat; any other key part changes the draw.
    assert torch.equal(sample_masks(logits, n, key), whole)
    for other in [key_scalar(4, 9, 1, 7), key_scalar(3, 10, 1, 7), key_scalar(3, 9, 2, 7), key_scalar(3, 9, 1, 8)]:
        assert (sample_masks(logits, n, other) != whole).any(dim=1).float().mean() > 0.3


def _chi_square_threshold(dof: int) -> float:
    """Upper 1e-4 quantile of chi-square(dof), Wilson–Hilferty approximation (z = 3.719)."""
    z = 3.719
    return dof * (1.0 - 2.0 / (9 * dof) + z * math.sqrt(2.0 / (9 * dof))) ** 3


@pytest.mark.parametrize("n,m,draws", [(2, 4, 200_000), (4, 8, 200_000), (2, 8, 200_000), (3, 4, 100_000)])
def test_sampler_matches_set_probabilities_chi_square(n, m, draws):
    gen = torch.Generator().manual_seed(100 + m)
    base = torch.randn(m, generator=gen, dtype=torch.float64) * 0.7
    logits = base.float().expand(draws, m).contiguous()  # one group, `draws` independent draws
    mask = sample_masks(logits, n, key_scalar(11, 0, 0, n * 100 + m))
    codes = (mask.long() * (1 << torch.arange(m))).sum(dim=1)
    counts = torch.bincount(codes, minlength=1 << m)
    p = torch.softmax(base.float().double(), dim=0).tolist()
    subsets = list(itertools.combinations(range(m), n))
    stat = 0.0
    for subset in subsets:
        expected = draws * _set_probability(p, subset)
        assert expected > 20  # the chi-square approximation holds
        observed = int(counts[sum(1 << j for j in subset)])
        stat += (observed - expected) ** 2 / expected
    assert int(counts.sum()) == draws
    assert stat < _chi_square_threshold(len(subsets) - 1), stat


def test_pair_probs_match_permutation_sum():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(20, 6, generator=gen, dtype=torch.float64) * 3.0
    probs = pair_probs(logits)
    for row, got in zip(logits, probs, strict=True):
        p = torch.softmax(row, dim=0).tolist()
        want = [_set_probability(p, s) for s in itertools.combinations(range(6), 2)]
        assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)
    assert torch.allclose(probs.sum(dim=1), torch.ones(20, dtype=torch.float64), atol=1e-14)


def test_sampler_rejects_bad_input():
    with pytest.raises(ValueError, match="0 < N < M"):
        sample_masks(torch.zeros(3, 4), 4, 0)
    with pytest.raises(ValueError, match="groups, M"):
        sample_masks(torch.zeros(12), 2, 0)
    with pytest.raises(ValueError, match="group_offset"):
        sample_masks(torch.zeros(3, 4), 2, 0, group_offset=-1)
    for n in (2, 3):
        bad = torch.zeros(10, 4)
        bad[6, 1] = float("nan")
        with pytest.raises(ValueError, match="group 106 hold NaN"):
            sample_masks(bad, n, 0, group_offset=100)
    with pytest.raises(ValueError, match="floating point"):
        sample_masks(torch.zeros(3, 4, dtype=torch.int64), 2, 0)


def test_chunk_size_never_changes_the_result(monkeypatch):
    from maskpro_ds.masks import policy

    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(5000, 4, generator=gen) * 2.0
    key = key_scalar(0, 3, 0, 1)
    masks = sample_masks(logits, 2, key)
    update = policy.accumulate_update(logits, [masks], [0.01], 50.0)
    logits8 = logits.view(-1, 8)
    masks8 = sample_masks(logits8, 4, key)
    monkeypatch.setattr(sampling, "CHUNK_GROUPS", 333)
    assert torch.equal(sample_masks(logits, 2, key), masks)
    assert torch.equal(sample_masks(logits8, 4, key), masks8)
    assert torch.equal(policy.accumulate_update(logits, [masks], [0.01], 50.0), update)
