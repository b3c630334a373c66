"""The expected reconstruction error of a masked Linear under the group distribution, in closed form.

For one output row w of a layer, its input Gram matrix H = XᵀX (what SparseGPT accumulates; Wanda
uses its diagonal) and the MaskPro group distribution with N = 2 (docs/method.md §2), the pruned
part z = w ⊙ (1 − m) has

    E‖X zᵀ‖² = Σ_{i,j in different groups} H_ij w_i w_j ρ_i ρ_j + Σ_i H_ii w_i² ρ_i
               + Σ_{i≠j, same group} H_ij w_i w_j q_ij

with ρ_i = P(i pruned) and q_ij = P(i and j both pruned), both sums of the group's pair
probabilities (groups are independent). Given the other groups the expression is linear in a
group's pair probabilities, E = Σ_S P(S) V(S) + (terms without the group), so its gradient in the
group's logits is Σ_S P(S) V(S) ∇log P(S): the N = 2 score kernel (policy.update_block) with the
per-group weights P(S)·V(S) over the C(M, 2) pairs. No sampling noise. docs/estimators.md
("Layer-local credit") says how a training step would use it and what it costs.
"""

from __future__ import annotations

import itertools

import torch

from maskpro_ds.masks.policy import update_block
from maskpro_ds.masks.sampling import pair_codes, pair_probs


def _check(w: torch.Tensor, logits: torch.Tensor, h: torch.Tensor) -> tuple[int, int]:
    rows, d_in = w.shape
    m = logits.shape[1]
    if d_in % m or logits.shape[0] != rows * d_in // m or h.shape != (d_in, d_in):
        raise ValueError(f"layer_error: need w [rows, in], logits [rows·in/M, M] and H [in, in]; got "
                         f"{tuple(w.shape)}, {tuple(logits.shape)}, {tuple(h.shape)}")
    return rows, m


def _pruned_probabilities(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """(P(pair) [G, C], ρ [G, M] = P(position pruned), the pairs in lexicographic order)."""
    m = logits.shape[1]
    pairs = list(itertools.combinations(range(m), 2))
    probs = pair_probs(logits)
    kept = torch.zeros(len(pairs), m, dtype=probs.dtype, device=probs.device)
    for k, (a, b) in enumerate(pairs):
        kept[k, a] = kept[k, b] = 1.0
    return probs, probs @ (1.0 - kept), pairs


def _same_group(h: torch.Tensor, m: int) -> torch.Tensor:
    """H's M×M diagonal blocks (pairs of inputs in one group of the row): ``[in/M, M, M]``."""
    idx = torch.arange(h.shape[0], device=h.device).view(-1, m)
    return h[idx.unsqueeze(2), idx.unsqueeze(1)]


def expected_row_error(w: torch.Tensor, logits: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """E‖X (w ⊙ (1 − m))ᵀ‖² per row, ``[rows]``, for N = 2 (dtype of ``logits`` promoted with ``w``)."""
    rows, m = _check(w, logits, h)
    probs, rho, pairs = _pruned_probabilities(logits)
    wg = w.reshape(rows, -1, m)
    rho = rho.reshape(rows, -1, m).to(w.dtype)
    u = (wg * rho).reshape(rows, -1)
    blocks = _same_group(h, m)  # [in/M, M, M]
    cross = (u @ h * u).sum(dim=1) - torch.einsum("rgi,gij,rgj->r", u.view_as(wg), blocks, u.view_as(wg))
    diag = (torch.diagonal(blocks, dim1=1, dim2=2) * wg * wg * rho).sum(dim=(1, 2))
    both = torch.zeros(rows, dtype=w.dtype, device=w.device)
    probs = probs.reshape(rows, -1, len(pairs)).to(w.dtype)
    for i, j in itertools.combinations(range(m), 2):  # both pruned: the pairs holding neither i nor j
        q = sum(probs[..., k] for k, (a, b) in enumerate(pairs) if a not in (i, j) and b not in (i, j))
        both += 2.0 * (blocks[:, i, j] * wg[..., i] * wg[..., j] * q).sum(dim=1)
    return cross + diag + both


def expected_error_gradient(w: torch.Tensor, logits: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """∂/∂logits of Σ_rows :func:`expected_row_error`, ``[G, M]`` (N = 2), with no sampling noise."""
    _check(w, logits, h)
    return slice_error_gradient(w, h, logits, torch.zeros(logits.shape, dtype=w.dtype), 0)


def slice_error_gradient(w: torch.Tensor, h: torch.Tensor, logits: torch.Tensor, pruned: torch.Tensor, offset: int,
                         row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The gradient of Σ_rows row_scale_r · E_r in the logits of a run of ``g`` consecutive groups.

    ``w`` ``[rows, in]`` are whole rows; their groups, row-major, are numbered 0..rows·in/M; ``logits``
    ``[g, M]`` are those of groups ``[offset, offset + g)`` (a rank's slice of a layer, which may start
    and end inside a row); ``pruned`` ``[rows·in/M, M]`` gives every other group's pruned indicator (or
    probability) ρ, entries inside the run being ignored. Since E is linear in each other group's ρ,
    a sampled mask (1 − m) there gives an unbiased estimate of the gradient at their probabilities.
    ``row_scale`` ``[rows]`` weighs each row's error (None: 1). Result ``[g, M]`` in the logits' dtype.
    """
    rows, d_in = w.shape
    g, m = logits.shape
    per_row = d_in // m
    if d_in % m or h.shape != (d_in, d_in) or pruned.shape != (rows * per_row, m) or not 0 <= offset <= rows * per_row - g:
        raise ValueError(f"slice_error_gradient: w {tuple(w.shape)}, H {tuple(h.shape)}, logits {tuple(logits.shape)}, "
                         f"pruned {tuple(pruned.shape)}, offset {offset} do not fit together")
    probs, rho_slice, pairs = _pruned_probabilities(logits)
    rho = pruned.to(w.dtype).clone()
    rho[offset:offset + g] = rho_slice.to(w.dtype)
    wg = w.reshape(rows, per_row, m)
    u = wg * rho.view(rows, per_row, m)
    blocks = _same_group(h, m)  # [in/M, M, M]
    # c_i = 2 w_i Σ_{j outside i's group} H_ij u_j: the other groups' pull on position i.
    hu = (u.reshape(rows, -1) @ h).view_as(wg) - torch.einsum("gij,rgj->rgi", blocks, u)
    run = slice(offset, offset + g)
    w_run = wg.reshape(-1, m)[run]
    blocks_run = blocks[torch.arange(offset, offset + g, device=w.device) % per_row]  # [g, M, M]
    linear = (2.0 * wg * hu).reshape(-1, m)[run] + torch.diagonal(blocks_run, dim1=1, dim2=2) * w_run * w_run
    values = []
    for a, b in pairs:  # V(S): what the group adds to the error when S = {a, b} is kept
        kept_out = [i for i in range(m) if i not in (a, b)]
        v = sum(linear[:, i] for i in kept_out)
        for i, j in itertools.combinations(kept_out, 2):
            v = v + 2.0 * blocks_run[:, i, j] * w_run[:, i] * w_run[:, j]
        values.append(v)
    weights = probs.t().to(w.dtype) * torch.stack(values)  # [C, g]: P(S)·V(S)
    if row_scale is not None:
        weights = weights * row_scale.to(w.dtype)[torch.arange(offset, offset + g, device=w.device) // per_row]
    codes = torch.tensor(pair_codes(m), dtype=torch.uint8, device=logits.device)
    codes = codes.unsqueeze(1).expand(-1, g).contiguous()
    return update_block(logits.t().contiguous(), codes, weights.to(logits.dtype)).t()
