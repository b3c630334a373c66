"""Mask-only local search for one Linear: the strict N:M mask that best reconstructs its output.

For a Linear with weight W [rows, cols] and calibration inputs X, keeping the mask m (weights
unchanged) changes the output by X (W ⊙ m − W)ᵀ. Its squared norm separates over rows:

    f(m) = Σ_r z_rᵀ H z_r,   z_r = w_r ⊙ (1 − m_r)   (the pruned part of row r),   H = XᵀX

(any positive scale of H gives the same search). H is shared by every row, so all rows are searched
at once. Coordinate descent over the groups: one group column g at a time, every row takes the best
pattern of its group given the rest of the row. With G = Z H kept up to date, replacing the group's
pruned part z_g by z'_g costs

    c(z'_g) = 2 z'_gᵀ (G_g − H_gg z_g) + z'_gᵀ H_gg z'_g        (+ terms that do not depend on z'_g)

so each candidate is a few flops per row. Candidates:
- exhaustive: all C(M, N) patterns (2:4: 6, 4:8: 70) while that count is at most ``exhaustive_limit``;
- pairwise: otherwise, the best swap of one kept and one pruned position, repeated up to
  min(N, M − N) times per visit (the most swaps that can separate two patterns).

The current pattern stays unless a candidate is strictly cheaper; among equally cheap candidates the
lower pattern index (``itertools.combinations`` order) wins, so the search is deterministic.

G = Z H is maintained like SparseGPT's lazy batches: inside a block of ``blocksize`` columns every change
is applied exactly to the rest of the block (a [rows, M] x [M, block] product), and the block's total
change reaches the columns after it with one matmul. G is recomputed from Z at the start of every
sweep, so rounding never accumulates across sweeps. A sweep costs about 1.5 · rows · cols² multiply-
adds (the recompute plus the lazy updates) and rows · cols / M small candidate evaluations.

Rows are searched in fixed chunks of ``row_chunk`` rows, each chunk on its own until its relative
improvement in a sweep falls below ``tol`` (or ``max_sweeps``). Rows are independent problems, so a
chunk's result does not depend on which other chunks run, in which process, or in which order: the
row split over ranks (priors/swap_ranks.py) gives the same bits for any rank count, because every
chunk sees tensors of the same shapes. Pure tensor code: no torch.distributed.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SearchConfig:
    """How far and how the search goes; every field is a CLI option of the swap prior."""

    max_sweeps: int = 5
    tol: float = 1e-3  # stop a chunk when a sweep improves its objective by less than this fraction
    blocksize: int = 128  # columns per lazy G update; a multiple of M
    row_chunk: int = 1024  # rows searched together; the unit of the row split over ranks
    exhaustive_limit: int = 70  # largest C(M, N) searched exhaustively; above it, pairwise swaps

    def check(self, m: int) -> None:
        if self.max_sweeps < 0:
            raise ValueError(f"--swap-sweeps must be >= 0; got {self.max_sweeps}")
        if not self.tol >= 0:
            raise ValueError(f"--swap-tol must be >= 0; got {self.tol}")
        if self.blocksize < m or self.blocksize % m:
            raise ValueError(f"swap blocksize {self.blocksize} must be a positive multiple of M={m}")
        if self.row_chunk < 1:
            raise ValueError(f"--swap-row-chunk must be >= 1; got {self.row_chunk}")


@dataclass
class SearchStats:
    """What a search did, summed over row chunks (sweep k of every chunk adds to entry k)."""

    groups: int = 0  # groups searched (rows x cols / M)
    groups_changed: int = 0  # groups whose final pattern differs from the start
    objective: list[float] = field(default_factory=list)  # f before sweep 1, then after each sweep
    changed: list[int] = field(default_factory=list)  # groups whose pattern changed, per sweep
    chunk_sweeps: list[int] = field(default_factory=list)  # sweeps run by each chunk

    @property
    def sweeps(self) -> int:
        return len(self.changed)

    def add(self, other: SearchStats) -> None:
        """Fold another chunk's (or rank's) stats in; a chunk that stopped keeps its last objective."""
        self.groups += other.groups
        self.groups_changed += other.groups_changed
        self.chunk_sweeps += other.chunk_sweeps
        self.objective = _add_padded(self.objective, other.objective, hold=True)
        self.changed = _add_padded(self.changed, other.changed, hold=False)

    def to_dict(self) -> dict:
        return {"groups": self.groups, "groups_changed": self.groups_changed, "sweeps": self.sweeps,
                "objective": self.objective, "changed_per_sweep": self.changed}


def _add_padded(a: list, b: list, hold: bool) -> list:
    """Element-wise sum of two per-sweep lists; the shorter one is padded with its last value
    (``hold``: objectives stay where a finished chunk stopped) or with zeros (counts)."""
    size = max(len(a), len(b))
    if size == 0:
        return []

    def pad(v: list) -> list:
        fill = (v[-1] if v else 0) if hold else 0
        return v + [fill] * (size - len(v))

    return [x + y for x, y in zip(pad(a), pad(b), strict=True)]


def kept_patterns(n: int, m: int) -> torch.Tensor:
    """bool [C(M,N), M]: every way to keep N of M, in ``itertools.combinations`` order."""
    combos = list(itertools.combinations(range(m), n))
    table = torch.zeros(len(combos), m, dtype=torch.bool)
    for i, kept in enumerate(combos):
        table[i, list(kept)] = True
    return table


def objective(weight: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """f(m) = Σ_r z_rᵀ H z_r with z = w ⊙ (1 − m), in the dtype of ``hessian`` (a 0-d tensor)."""
    z = torch.where(mask, 0.0, weight.to(hessian.dtype))
    return ((z @ hessian) * z).sum()


def row_chunks(rows: int, row_chunk: int) -> list[tuple[int, int]]:
    """The fixed row ranges the search works on: [0, c), [c, 2c), ... (the last may be shorter)."""
    return [(r0, min(r0 + row_chunk, rows)) for r0 in range(0, rows, row_chunk)]


def local_search(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    mask: torch.Tensor,
    n: int,
    m: int,
    config: SearchConfig | None = None,
    chunks: list[tuple[int, int]] | None = None,
    linear: torch.Tensor | None = None,
) -> tuple[torch.Tensor, SearchStats]:
    """Search from ``mask`` (strict N:M, bool [rows, cols]); returns (new mask, stats).

    The arithmetic is in ``hessian``'s dtype (fp32 in the prior, fp64 for reference checks).
    ``chunks`` restricts the search to some row ranges of :func:`row_chunks` (a rank's share);
    rows outside them keep the starting mask. ``linear`` (B, [rows, cols]) adds a linear term:
    f = Σ_r z_rᵀ H z_r − 2 b_rᵀ z_r, the objective when the target is not the layer's own output on
    the same inputs (priors/swap.py, ``--swap-target dense``).
    """
    config = config or SearchConfig()
    config.check(m)
    rows, cols = weight.shape
    if cols % m or tuple(hessian.shape) != (cols, cols) or tuple(mask.shape) != (rows, cols):
        raise ValueError(f"local_search: weight {tuple(weight.shape)}, Hessian {tuple(hessian.shape)} and mask "
                         f"{tuple(mask.shape)} do not fit N:M={n}:{m}")
    counts = mask.reshape(rows, -1, m).sum(dim=-1)
    if bool((counts != n).any()):
        raise ValueError(f"local_search: the starting mask is not strict {n}:{m}")
    if linear is not None and tuple(linear.shape) != (rows, cols):
        raise ValueError(f"local_search: linear term {tuple(linear.shape)} does not match weight {(rows, cols)}")
    out = mask.clone()
    stats = SearchStats()
    searcher = _ChunkSearch(hessian, n, m, config)
    for r0, r1 in chunks if chunks is not None else row_chunks(rows, config.row_chunk):
        b = None if linear is None else linear[r0:r1]
        out[r0:r1], chunk_stats = searcher.run(weight[r0:r1], mask[r0:r1], b)
        stats.add(chunk_stats)
    return out, stats


class _ChunkSearch:
    """The sweeps over one chunk of rows; holds what every chunk of the layer shares (H, patterns).

    Everything is kept transposed, rows innermost (Wᵀ, Zᵀ, Gᵀ = H Zᵀ: [cols, rows]): every
    per-group operation then runs over contiguous vectors of rows. With rows outermost the same
    operations walk [rows, M] slices with a stride, several times slower on CPU."""

    def __init__(self, hessian: torch.Tensor, n: int, m: int, config: SearchConfig):
        self.h, self.n, self.m, self.config = hessian, n, m, config
        self.dtype = hessian.dtype
        self.exhaustive = math.comb(m, n) <= config.exhaustive_limit
        cols = hessian.shape[0]
        # H_gg of every group: [groups, M, M].
        self.h_groups = hessian.reshape(cols // m, m, cols // m, m).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        if self.exhaustive:
            self.kept = kept_patterns(n, m).to(hessian.device)  # [K, M]
            self.pruned = (~self.kept).to(self.dtype)  # [K, M]: 1 where the pattern prunes
            self.pruned_t = self.pruned.T.contiguous()  # [M, K]
            # q_p q_pᵀ per pattern, flattened: the quadratic term is Σ_jk (w_j w_k H_jk) q_pj q_pk.
            self.pair = (self.pruned.unsqueeze(2) * self.pruned.unsqueeze(1)).reshape(len(self.kept), m * m)

    # ---- one chunk -------------------------------------------------------------------------
    def run(self, weight: torch.Tensor, mask: torch.Tensor,
            linear: torch.Tensor | None = None) -> tuple[torch.Tensor, SearchStats]:
        m = self.m
        rows, cols = weight.shape
        wt = weight.to(self.dtype).T.contiguous()  # [cols, rows]
        bt = None if linear is None else linear.to(self.dtype).T.contiguous()
        keep = mask.T.contiguous()
        stats = SearchStats(groups=rows * cols // m)
        # Exhaustive: the pattern index of every group, [groups, rows]. Two N-hot vectors match iff
        # their dot product is N (exact in floating point for 0/1 values).
        pattern = None
        if self.exhaustive:
            match = torch.einsum("km,gmr->gkr", self.kept.to(self.dtype), keep.view(-1, m, rows).to(self.dtype))
            index = torch.arange(len(self.kept), dtype=self.dtype, device=wt.device)
            pattern = torch.einsum("gkr,k->gr", (match == self.n).to(self.dtype), index).long()
        f, sweeps_left = None, self.config.max_sweeps
        while True:
            zt = torch.where(keep, 0.0, wt)
            gt = self.h @ zt  # H is symmetric: Gᵀ = H Zᵀ
            if bt is not None:
                gt -= bt  # G = Z H − B: the group costs below then include the linear term
            if f is None:  # f = Σ zᵀHz − 2 bᵀz = Σ z·(G − B)
                f = float((zt * (gt if bt is None else gt - bt)).sum(dtype=torch.float64))
                stats.objective.append(f)
            if sweeps_left == 0:
                break
            if self.exhaustive:
                gain, changed = self._sweep_exhaustive(wt, zt, gt, keep, pattern)
            else:
                gain, changed = self._sweep_pairwise(wt, zt, gt, keep)
            sweeps_left -= 1
            previous, f = f, f + gain  # gain <= 0: the sum of the accepted changes of f
            stats.objective.append(f)
            stats.changed.append(changed)
            if changed == 0 or sweeps_left == 0 or -gain < self.config.tol * abs(previous):
                break
        out = keep.T.contiguous()
        stats.chunk_sweeps.append(len(stats.changed))
        stats.groups_changed = int((out != mask).reshape(rows, -1, m).any(dim=-1).sum())
        return out, stats

    def _sweep_exhaustive(self, wt, zt, gt, keep, pattern) -> tuple[float, int]:
        """One pass over all groups, best of the C(M,N) patterns each; updates gt, keep and pattern
        (zt is left as it was at the start of the sweep: the next sweep rebuilds it from keep)."""
        m, cols, rows = self.m, wt.shape[0], wt.shape[1]
        dev = wt.device
        gain = torch.zeros((), dtype=torch.float64, device=dev)
        changed = torch.zeros((), dtype=torch.int64, device=dev)
        for b0 in range(0, cols, self.config.blocksize):
            b1 = min(b0 + self.config.blocksize, cols)
            nb, g0 = (b1 - b0) // m, b0 // m
            wb, zb = wt[b0:b1].view(nb, m, rows), zt[b0:b1].view(nb, m, rows)
            hgg = self.h_groups[g0 : g0 + nb]  # [nb, M, M]
            # Quadratic term of every pattern of every group in the block: [nb, K, rows].
            ww = (wb.unsqueeze(2) * wb.unsqueeze(1)).reshape(nb, m * m, rows)
            quad = torch.bmm(hgg.reshape(nb, 1, m * m) * self.pair.unsqueeze(0), ww)
            # a_g = (H z_{-g})_g, the pull of the rest of the row on group g; kept exact inside the
            # block as groups change, so each group sees every earlier change of this sweep.
            at = (gt[b0:b1].view(nb, m, rows) - torch.bmm(hgg, zb)).view(b1 - b0, rows)
            two_w = 2.0 * wb
            pat = pattern[g0 : g0 + nb]  # [nb, rows]
            gain_block = torch.empty(nb, rows, dtype=self.dtype, device=dev)
            delta_block = torch.empty(b1 - b0, rows, dtype=self.dtype, device=dev)
            for i in range(nb):
                c = b0 + i * m
                cost = torch.addmm(quad[i], self.pruned, two_w[i] * at[c - b0 : c - b0 + m])  # [K, rows]
                cur = pat[i : i + 1]
                best_cost, best = cost.min(dim=0, keepdim=True)  # first index among equal minima
                # <= 0; exactly 0 when the current pattern is among the best: then it stays.
                diff = torch.sub(best_cost, cost.gather(0, cur), out=gain_block[i : i + 1])
                torch.where(diff < 0, best, cur, out=cur)
                delta = delta_block[c - b0 : c + m - b0]
                torch.mul(wb[i], self.pruned_t.index_select(1, cur[0]), out=delta).sub_(zb[i])  # [M, rows]
                if c + m < b1:
                    at[c + m - b0 :].addmm_(self.h[c + m : b1, c : c + m], delta)
            if b1 < cols:
                gt[b1:].addmm_(self.h[b1:, b0:b1], delta_block)
            keep[b0:b1] = self.kept[pat].permute(0, 2, 1).reshape(b1 - b0, rows)
            gain += gain_block.sum(dtype=torch.float64)
            changed += (gain_block < 0).sum()
        return float(gain), int(changed)

    def _sweep_pairwise(self, wt, zt, gt, keep) -> tuple[float, int]:
        """One pass over all groups, up to min(N, M−N) best kept/pruned swaps each (large M)."""
        m, cols, rows = self.m, wt.shape[0], wt.shape[1]
        swaps = min(self.n, m - self.n)
        dev = wt.device
        gain = torch.zeros((), dtype=torch.float64, device=dev)
        changed = torch.zeros((), dtype=torch.int64, device=dev)
        inf = torch.tensor(float("inf"), dtype=self.dtype, device=dev)
        columns = torch.arange(rows, device=dev)
        for b0 in range(0, cols, self.config.blocksize):
            b1 = min(b0 + self.config.blocksize, cols)
            delta_block = torch.empty(b1 - b0, rows, dtype=self.dtype, device=dev)
            for c in range(b0, b1, m):
                hgg = self.h_groups[c // m]
                wg, kg, zg = wt[c : c + m], keep[c : c + m], zt[c : c + m]
                zg_start = zg.clone()
                ag = gt[c : c + m].clone()  # (Hz)_g, kept exact inside the group below
                wsq_diag = wg * wg * torch.diagonal(hgg).unsqueeze(1)
                # Swap i (kept -> pruned) and j (pruned -> kept): δ = w_i e_i − w_j e_j,
                # Δf = 2 δ·(Hz)_g + δᵀ H_gg δ = A_i + B_j − 2 w_i w_j H_ij.   [i, j, rows]
                cross = -2.0 * (wg.unsqueeze(1) * wg.unsqueeze(0)) * hgg.unsqueeze(2)
                any_swap = torch.zeros(rows, dtype=torch.bool, device=dev)
                for _ in range(swaps):
                    a_i = 2.0 * wg * ag + wsq_diag
                    b_j = -2.0 * wg * ag + wsq_diag
                    dfs = a_i.unsqueeze(1) + b_j.unsqueeze(0) + cross
                    valid = kg.unsqueeze(1) & ~kg.unsqueeze(0)
                    dfs = torch.where(valid, dfs, inf).reshape(m * m, rows)
                    best_df, best = dfs.min(dim=0)  # first (i, j) in row-major order among equal minima
                    take = best_df < 0
                    if not bool(take.any()):
                        break
                    sel = columns[take]
                    kg[best[take] // m, sel] = False
                    kg[best[take] % m, sel] = True
                    new_zg = torch.where(kg, 0.0, wg)
                    ag += hgg @ (new_zg - zg)
                    zg.copy_(new_zg)
                    gain += torch.where(take, best_df, 0.0).sum(dtype=torch.float64)
                    any_swap |= take
                delta = zg - zg_start
                if c + m < b1:
                    gt[c + m : b1] += self.h[c + m : b1, c : c + m] @ delta
                delta_block[c - b0 : c + m - b0] = delta
                changed += any_swap.sum()
            if b1 < cols:
                gt[b1:].addmm_(self.h[b1:, b0:b1], delta_block)
        return float(gain), int(changed)
