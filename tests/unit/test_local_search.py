"""The mask-only local search kernel (masks/local_search.py) against naive fp64 searches.

The references below evaluate the full row objective zᵀHz for every candidate (no G, no lazy
updates, no row chunks): the kernel must make the same choices in the same order.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from maskpro_ds.masks.local_search import SearchConfig, kept_patterns, local_search, objective, row_chunks
from maskpro_ds.masks.nm import magnitude_prior, validate_nm


def problem(rows: int, cols: int, tokens: int = 256, seed: int = 0):
    """Weights and a correlated H = XᵀX (correlated inputs make the search matter)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.3
    x += torch.randn(tokens, cols, generator=g)
    return torch.randn(rows, cols, generator=g), x.T @ x


def row_cost(w: torch.Tensor, h: torch.Tensor, keep: torch.Tensor, b: torch.Tensor | None = None) -> float:
    z = torch.where(keep, 0.0, w)
    return float(z @ h @ z - (0.0 if b is None else 2.0 * b @ z))


def naive_exhaustive(w, h, mask, n, m, max_sweeps, linear=None):
    """Gauss-Seidel over groups, best pattern by full objective; current kept unless strictly better."""
    w, h, mask = w.double(), h.double(), mask.clone()
    b = None if linear is None else linear.double()
    patterns = kept_patterns(n, m)
    for _ in range(max_sweeps):
        changed = 0
        for r in range(w.shape[0]):
            for c in range(0, w.shape[1], m):
                trial = mask[r].clone()
                br = None if b is None else b[r]
                best, best_cost = None, row_cost(w[r], h, trial, br)
                for p in patterns:
                    trial[c : c + m] = p
                    cost = row_cost(w[r], h, trial, br)
                    if cost < best_cost:
                        best, best_cost = p, cost
                if best is not None:
                    mask[r, c : c + m] = best
                    changed += 1
        if changed == 0:
            break
    return mask


def naive_pairwise(w, h, mask, n, m, max_sweeps):
    """Per group visit up to min(N, M−N) best single swaps (kept <-> pruned), strictly improving."""
    w, h, mask = w.double(), h.double(), mask.clone()
    for _ in range(max_sweeps):
        changed = 0
        for r in range(w.shape[0]):
            for c in range(0, w.shape[1], m):
                moved = False
                for _ in range(min(n, m - n)):
                    base = row_cost(w[r], h, mask[r])
                    best, best_gain = None, 0.0
                    for i, j in itertools.product(range(m), range(m)):
                        if mask[r, c + i] and not mask[r, c + j]:
                            trial = mask[r].clone()
                            trial[c + i], trial[c + j] = False, True
                            gain = row_cost(w[r], h, trial) - base
                            if gain < best_gain:
                                best, best_gain = (i, j), gain
                    if best is None:
                        break
                    mask[r, c + best[0]], mask[r, c + best[1]] = False, True
                    moved = True
                changed += moved
        if changed == 0:
            break
    return mask


def test_fp64_kernel_equals_naive_exhaustive_search_2_4_and_4_8():
    for (n, m), cols in (((2, 4), 32), ((4, 8), 32)):
        w, h = problem(10, cols)
        start = magnitude_prior(w, n, m)
        config = SearchConfig(max_sweeps=30, tol=0.0, blocksize=8, row_chunk=4)  # several blocks and chunks
        found, stats = local_search(w, h.double(), start, n, m, config)
        assert torch.equal(found, naive_exhaustive(w, h, start, n, m, 30))
        assert stats.changed[-1] == 0  # converged, not stopped by max_sweeps
        assert stats.groups_changed == int((found != start).reshape(10, -1, m).any(-1).sum()) > 0


def test_linear_term_equals_naive_search_on_the_full_objective():
    """f = Σ zᵀHz − 2bᵀz: the objective when the target is the dense model's output."""
    w, h = problem(10, 32, seed=8)
    b = torch.randn(10, 32, generator=torch.Generator().manual_seed(9)) @ h * 0.3
    start = magnitude_prior(w, 2, 4)
    config = SearchConfig(max_sweeps=30, tol=0.0, blocksize=8, row_chunk=4)
    found, stats = local_search(w, h.double(), start, 2, 4, config, linear=b.double())
    assert torch.equal(found, naive_exhaustive(w, h, start, 2, 4, 30, linear=b))
    without, _ = local_search(w, h.double(), start, 2, 4, config)
    assert not torch.equal(found, without)
    f = sum(row_cost(w[r].double(), h.double(), found[r], b[r].double()) for r in range(10))
    assert abs(stats.objective[-1] - f) <= 1e-9 * abs(f)
    with pytest.raises(ValueError, match="linear term"):
        local_search(w, h, start, 2, 4, config, linear=b[:3])


def test_fp32_kernel_agrees_with_the_fp64_reference():
    w, h = problem(24, 64, seed=1)
    start = magnitude_prior(w, 2, 4)
    config = SearchConfig(max_sweeps=30, tol=0.0, blocksize=16, row_chunk=8)
    fp32, stats32 = local_search(w, h, start, 2, 4, config)
    reference = naive_exhaustive(w, h, start, 2, 4, 30)
    f32 = float(objective(w, h.double(), fp32))
    f64 = float(objective(w, h.double(), reference))
    assert (fp32 == reference).float().mean() > 0.99
    assert abs(f32 - f64) <= 1e-5 * f64
    assert abs(stats32.objective[-1] - f32) <= 1e-4 * f32  # the tracked objective is the real one


@pytest.mark.parametrize("pattern", [(2, 4), (4, 8), (8, 16)])
def test_objective_never_increases_sweep_by_sweep_and_masks_stay_strict(pattern):
    n, m = pattern
    w, h = problem(16, 64, seed=2)
    start = magnitude_prior(w, n, m)
    values = [float(objective(w, h.double(), start))]
    for sweeps in range(1, 6):  # deterministic: the run with k sweeps is the k-th state of a longer one
        found, stats = local_search(w, h, start, n, m, SearchConfig(max_sweeps=sweeps, tol=0.0, blocksize=16))
        assert validate_nm({"w": found}, n, m).ok
        values.append(float(objective(w, h.double(), found)))
    assert all(b <= a * (1 + 1e-6) for a, b in zip(values, values[1:], strict=False)), values
    assert values[-1] < 0.9 * values[0]
    assert len(stats.objective) == stats.sweeps + 1
    assert all(b <= a for a, b in zip(stats.objective, stats.objective[1:], strict=False))


def test_at_convergence_every_group_is_the_exhaustive_optimum_given_the_rest_of_its_row():
    n, m = 2, 4
    w, h = problem(12, 48, seed=3)
    found, stats = local_search(w, h.double(), magnitude_prior(w, n, m), n, m,
                                SearchConfig(max_sweeps=50, tol=0.0, blocksize=16))
    assert stats.changed[-1] == 0
    w64, h64 = w.double(), h.double()
    for r in range(w.shape[0]):
        for c in range(0, w.shape[1], m):
            current = row_cost(w64[r], h64, found[r])
            trial = found[r].clone()
            for p in kept_patterns(n, m):
                trial[c : c + m] = p
                assert row_cost(w64[r], h64, trial) >= current * (1 - 1e-12)


def test_pairwise_path_equals_naive_swaps_and_leaves_no_improving_swap():
    w, h = problem(8, 32, seed=4)
    for n, m, limit in ((2, 4, 0), (4, 8, 0), (8, 16, 70)):  # C(16, 8) = 12870 > 70: pairwise by default
        start = magnitude_prior(w, n, m)
        found, stats = local_search(w, h.double(), start, n, m,
                                    SearchConfig(max_sweeps=30, tol=0.0, blocksize=16, exhaustive_limit=limit))
        assert torch.equal(found, naive_pairwise(w, h, start, n, m, 30))
        assert stats.changed[-1] == 0 and validate_nm({"w": found}, n, m).ok
        assert float(objective(w, h.double(), found)) < float(objective(w, h.double(), start))


def test_rows_are_independent_so_any_chunking_gives_the_same_rows():
    w, h = problem(20, 32, seed=5)
    start = magnitude_prior(w, 2, 4)
    config = SearchConfig(max_sweeps=8, tol=1e-4, blocksize=8, row_chunk=6)
    whole, _ = local_search(w, h, start, 2, 4, config)
    assert row_chunks(20, 6) == [(0, 6), (6, 12), (12, 18), (18, 20)]
    pieces = [local_search(w[r0:r1], h, start[r0:r1], 2, 4, config)[0] for r0, r1 in row_chunks(20, 6)]
    assert torch.equal(whole, torch.cat(pieces))
    part, stats = local_search(w, h, start, 2, 4, config, chunks=[(6, 12)])
    assert torch.equal(part[6:12], whole[6:12])
    assert torch.equal(part[:6], start[:6]) and torch.equal(part[12:], start[12:])
    assert stats.groups == 6 * 8


def test_ties_keep_the_current_pattern_or_take_the_lowest_index():
    h = torch.eye(4)  # cost = sum of the pruned weights squared
    w = torch.tensor([[3.0, 1.0, 1.0, 0.5], [2.0, 2.0, 2.0, 2.0]])
    start = torch.tensor([[False, False, True, True], [False, True, False, True]])
    found, _ = local_search(w, h, start, 2, 4, SearchConfig(max_sweeps=3, tol=0.0, blocksize=4))
    # Row 0: keeping {0,1} and {0,2} cost the same and beat the start: the lower pattern index wins.
    # Row 1: every pattern costs the same: the current one stays.
    assert found.tolist() == [[True, True, False, False], [False, True, False, True]]


def test_stops_when_a_sweep_improves_less_than_tol():
    w, h = problem(16, 64, seed=6)
    start = magnitude_prior(w, 2, 4)
    _, loose = local_search(w, h, start, 2, 4, SearchConfig(max_sweeps=50, tol=0.05))
    _, tight = local_search(w, h, start, 2, 4, SearchConfig(max_sweeps=50, tol=0.0))
    f = loose.objective
    assert (f[-2] - f[-1]) < 0.05 * f[-2] and all((a - b) >= 0.05 * a for a, b in zip(f[:-2], f[1:-1], strict=True))
    assert loose.sweeps < tight.sweeps


def test_bad_inputs_are_refused():
    w, h = problem(4, 16)
    good = magnitude_prior(w, 2, 4)
    with pytest.raises(ValueError, match="not strict 2:4"):
        local_search(w, h, torch.ones_like(good), 2, 4)
    with pytest.raises(ValueError, match="do not fit"):
        local_search(w, h[:8, :8], good, 2, 4)
    with pytest.raises(ValueError, match="multiple of M=4"):
        local_search(w, h, good, 2, 4, SearchConfig(blocksize=6))
    with pytest.raises(ValueError, match="--swap-sweeps"):
        local_search(w, h, good, 2, 4, SearchConfig(max_sweeps=-1))
