"""The MaskPro estimator: set probability, its score, the logit update, init and final masks.

Model (docs/method.md §2): group logits pi in R^M, p = softmax(pi), a mask is the unordered set S of
N positions drawn without replacement (Plackett–Luce). Groups are independent, so every function
here works row-wise on ``[G, M]`` and a layer is any slice of rows.

Score ∇_pi log P(S):
* N = 2, closed form. With A = p_a + r, B = p_b + r, r = sum of p over the unselected
  (so A = 1 - p_b and B = 1 - p_a, computed as sums of positive terms), the chain rule through the
  softmax Jacobian simplifies to
      d/d pi_a = B (r/A) (1 + A)/(1 + r),   d/d pi_b = A (r/B) (1 + B)/(1 + r),
      d/d pi_l = -p_l [1 + (A/B + B/A)/(1 + r)]   for l not in S,
  in which nothing cancels: a very certain group gives a small, accurate gradient instead of
  (1 - p)^2 underflowing. Exponentials are relative to the runner-up logit (see sampling.py), so
  every divisor is >= 1 before normalisation.
* other N: autograd through :func:`log_prob_set`, a subset dynamic programme over the N! orderings
  in log space (2^N log-sum-exps; fine up to N = 8).

Update (docs/method.md §3): pi <- pi - lr/K sum_k a_k ∇ log P(m_k | pi), every score taken at the OLD pi.
:func:`apply_update_` takes bool masks; :func:`apply_update_codes_` (the sharded store's path)
takes the sampler's per-group codes, runs the same fp32 operations in one kernel per chunk
(:func:`update_final_block`, also giving the top-2 final mask for monitoring) and checks the
result is finite once per call.
The advantage a_k comes from the estimator (maskpro_ds.train.estimators), built on
:mod:`maskpro_ds.masks.advantages` (the residual tracker, a_k = r_k - delta, and the optional
conditioning of docs/method.md §5 that keeps the per-event logit change lr |a| in range).
"""

from __future__ import annotations

import itertools
import math

import torch

from maskpro_ds.masks import nm
from maskpro_ds.masks.sampling import (
    check_finite,
    chunk_groups,
    code_dtype,
    masks_to_codes,
    pair_probs,
    stable_exp_t,
)


def _check_shape(logits: torch.Tensor, mask: torch.Tensor, n: int, name: str) -> None:
    if logits.dim() != 2 or mask.shape != logits.shape:
        raise ValueError(f"{name}: need logits and mask of the same shape [G, M]; got "
                         f"{tuple(logits.shape)} and {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"{name}: mask must be bool, got {mask.dtype}")
    if not 0 < n < logits.shape[1]:
        raise ValueError(f"{name}: need 0 < N < M, got N={n}, M={logits.shape[1]}")


def _check_mask(logits: torch.Tensor, mask: torch.Tensor, n: int, name: str) -> None:
    """Shape, dtype and strict N:M (a full pass; the N = 2 fast path checks inside its chunks)."""
    _check_shape(logits, mask, n, name)
    bad = nm.nm_violations(mask, n, logits.shape[1])
    if bad.numel():
        raise ValueError(f"{name}: mask is not strict {n}:{logits.shape[1]} in {bad.numel()} groups, "
                         f"first {bad[:8].tolist()}")


def _selected(logits: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """Logits of the N selected positions of every group, in index order: ``[G, N]``."""
    cols = torch.nonzero(mask)[:, 1].view(-1, n)
    return torch.gather(logits, 1, cols)


def log_prob_set(logits: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """Exact log P(S) of each group's unordered set ``mask`` under Plackett–Luce: ``[G]``.

    N = 2: log P = pi_a + pi_b - L + log(e^{-L_a'} + e^{-L_b'}) with L = logsumexp(pi) and
    L_a' = logsumexp over k != a. Other N: f(T) = logsumexp_{i in T} f(T - i) + pi_i - L(rest of
    T - i) over subsets T of S, which sums the same N! ordered-draw terms without listing them.
    Differentiable (autograd) in both cases.
    """
    _check_mask(logits, mask, n, "log_prob_set")
    xs = _selected(logits, mask, n)
    rest = torch.logsumexp(logits.masked_fill(mask, -math.inf), dim=1)  # log mass not selected
    if n == 2:
        a, b = xs[:, 0], xs[:, 1]
        total = torch.logsumexp(torch.stack([a, b, rest], dim=1), dim=1)
        excl_a = torch.logaddexp(b, rest)
        excl_b = torch.logaddexp(a, rest)
        return a + b - total + torch.logaddexp(-excl_a, -excl_b)
    full = (1 << n) - 1
    # lse_out[t] = log of the mass left after the positions in subset t were drawn.
    lse_out = {}
    for t in range(full):
        left = [xs[:, i] for i in range(n) if not t >> i & 1]
        lse_out[t] = torch.logsumexp(torch.stack(left + [rest], dim=1), dim=1)
    f = {0: torch.zeros_like(rest)}
    for size in range(1, n + 1):
        for members in itertools.combinations(range(n), size):
            t = sum(1 << i for i in members)
            terms = [f[t & ~(1 << i)] + xs[:, i] - lse_out[t & ~(1 << i)] for i in members]
            f[t] = torch.logsumexp(torch.stack(terms, dim=1), dim=1)
    return f[full]


def _score2_t_(acc: list[torch.Tensor | None], ys: list[torch.Tensor], z: torch.Tensor,
               rows: list[torch.Tensor], weight) -> None:
    """acc[j] += weight * closed-form N = 2 score on a transposed block (acc[j] None: set it).

    ys[j]: exps of position j (runner-up-relative), z = sum(ys), rows[j]: bool mask of position j.
    A first term is stored, not added to zeros, so no sum depends on how 0 + (-0.0) is compiled.
    """
    # first[j]: position j is the lower-index selected one (a); the other selected one is b.
    first, seen = [], torch.zeros_like(rows[0])
    for s in rows:
        first.append(s & ~seen)
        seen = seen | s
    zero = torch.zeros((), dtype=ys[0].dtype, device=ys[0].device)
    y_a = sum(torch.where(f, y, zero) for y, f in zip(ys, first, strict=True))
    y_b = sum(torch.where(s & ~f, y, zero) for y, s, f in zip(ys, rows, first, strict=True))
    r = sum(torch.where(s, zero, y) for y, s in zip(ys, rows, strict=True))  # mass not selected
    s_a, s_b = y_a + r, y_b + r  # Z * A and Z * B, each >= 1 (one of the top two is in each)
    inv_z = z.reciprocal()
    inv_zr = (z + r).reciprocal()  # 1 / (Z (1 + r))
    w_inv_zr = inv_zr * weight
    g_a = s_b * inv_z * (r / s_a) * (z + s_a) * w_inv_zr
    g_b = s_a * inv_z * (r / s_b) * (z + s_b) * w_inv_zr
    # Unselected l: -p_l [1 + (A/B + B/A)/(1 + r)] = -y_l q with q <= 3 (Sa, Sb in [1, Z]).
    neg_q = -(inv_z + (s_a * inv_zr) / s_b + (s_b * inv_zr) / s_a) * weight
    for j, (y, s, f) in enumerate(zip(ys, rows, first, strict=True)):
        term = torch.where(s, torch.where(f, g_a, g_b), y * neg_q)
        acc[j] = term if acc[j] is None else acc[j] + term


def _code_rows(code: torch.Tensor, m: int) -> list[torch.Tensor]:
    """Bool row j (position j kept) of per-group mask codes ``[g]``."""
    code = code.to(torch.int32)
    return [((code >> j) & 1).to(torch.bool) for j in range(m)]


def update_block(xt: torch.Tensor, codes: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_k weights[k] * score(codes[k]) for a transposed block, N = 2: ``[M, g]``.

    xt: fp32 logits ``[M, g]``; codes: mask codes ``[K, g]`` (sampling.codes_to_masks);
    weights: ``[K]`` tensor.
    """
    ys = stable_exp_t(xt)
    z = sum(ys)
    acc = [None] * len(ys)
    for k in range(codes.shape[0]):
        _score2_t_(acc, ys, z, _code_rows(codes[k], len(ys)), weights[k])
    return torch.stack(acc, dim=0)


def top2_code_t(rows: list[torch.Tensor]) -> torch.Tensor:
    """Code of the top-2 positions of each group of a transposed block (ties to the lower index).

    Position j is kept when fewer than 2 positions beat it, k beating j if x_k > x_j or
    (x_k == x_j and k < j): the order of nm.topn_mask's stable descending sort.
    """
    code = None
    for j, xj in enumerate(rows):
        beaten = None
        for k, xk in enumerate(rows):
            if k == j:
                continue
            b = (xk >= xj if k < j else xk > xj).to(torch.int32)
            beaten = b if beaten is None else beaten + b
        kept = (beaten < 2).to(torch.int32) << j
        code = kept if code is None else code | kept
    return code


def update_final_block(xt: torch.Tensor, codes: torch.Tensor, weights: torch.Tensor):
    """The store's update of a transposed chunk ``[M, g]``, N = 2: (new logits ``[M, g]``, top-2 codes ``[g]``).

    new = xt + :func:`update_block` (the fp32 operations of :func:`apply_update_`), and the
    final-mask code of ``new`` for monitoring. Pure elementwise code:
    ``torch.compile(update_final_block, dynamic=True)`` fuses it with the same bits (tests check).
    """
    delta = update_block(xt, codes, weights)
    new_rows = [xt[j] + delta[j] for j in range(xt.shape[0])]
    return torch.stack(new_rows), top2_code_t(new_rows).to(codes.dtype)


def top2_codes(logits: torch.Tensor) -> torch.Tensor:
    """Codes ``[G]`` of :func:`final_mask` for N = 2 (same tie rule), without a sort."""
    out = torch.empty(logits.shape[0], dtype=code_dtype(logits.shape[1]), device=logits.device)
    step = chunk_groups(logits.device)
    for start in range(0, logits.shape[0], step):
        stop = min(start + step, logits.shape[0])
        out[start:stop] = top2_code_t(list(logits[start:stop].t().unbind(0)))
    return out


def _score_chunks(logits: torch.Tensor, masks: list[torch.Tensor], weights: list[float]):
    """Yield (start, stop, sum_k weights[k] * score(logits, masks[k])) chunk by chunk, N = 2.

    Also checks every group of every mask keeps exactly 2 (cheap here, on transposed bool rows);
    group numbers in errors count from row 0 of ``logits``.
    """
    g_total, m = logits.shape
    w = torch.tensor(weights, dtype=logits.dtype, device=logits.device)
    check_finite(logits, 0, "score")
    step = chunk_groups(logits.device)
    for start in range(0, g_total, step):
        stop = min(start + step, g_total)
        xt = logits[start:stop].t().contiguous()
        chunk = [mask[start:stop] for mask in masks]
        count = torch.stack([c.sum(dim=1, dtype=torch.int32) for c in chunk])
        if not bool((count == 2).all()):
            bad = torch.nonzero((count != 2).any(dim=0)).flatten()[:8] + start
            raise ValueError(f"score: mask is not strict 2:{m}; offending groups {bad.tolist()}")
        codes = torch.stack([masks_to_codes(c) for c in chunk])
        yield start, stop, update_block(xt, codes, w).t()


def score(logits: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """∇_pi log P(mask | logits), ``[G, M]``: closed form for N = 2, autograd otherwise."""
    if n == 2:
        _check_shape(logits, mask, n, "score")
        out = torch.empty_like(logits)
        for start, stop, g in _score_chunks(logits, [mask], [1.0]):
            out[start:stop] = g
        return out
    with torch.enable_grad():
        x = logits.detach().clone().requires_grad_(True)
        _check_mask(logits, mask, n, "score")
        check_finite(logits, 0, "score")
        (grad,) = torch.autograd.grad(log_prob_set(x, mask, n).sum(), x)
    return grad


def accumulate_update(logits: torch.Tensor, masks: list[torch.Tensor], advantages: list[float],
                      lr: float, n: int = 2) -> torch.Tensor:
    """New logits pi - lr/K sum_k a_k ∇ log P(masks[k] | pi), all scores at the old pi (K = len(masks)).

    ``logits`` is left untouched; see :func:`apply_update_` for the in-place variant.
    """
    out = logits.clone()
    apply_update_(out, masks, advantages, lr, n)
    return out


def update_weights(advantages: list[float], lr: float) -> list[float]:
    """The per-mask weights -lr a_k / K of the update."""
    return [-float(lr) * float(a) / len(advantages) for a in advantages]


def apply_update_(logits: torch.Tensor, masks: list[torch.Tensor], advantages: list[float],
                  lr: float, n: int = 2) -> torch.Tensor:
    """In-place :func:`accumulate_update`; chunked so each group's scores are read at the old pi.

    N = 2 runs :func:`update_block` (the kernel of the sharded store's
    :func:`apply_update_codes_`, so both give the same bits).
    """
    if len(masks) != len(advantages) or not masks:
        raise ValueError(f"accumulate_update: need one advantage per mask, got {len(masks)} masks and "
                         f"{len(advantages)} advantages")
    for mask in masks:
        _check_shape(logits, mask, n, "accumulate_update")
    weights = update_weights(advantages, lr)
    if n != 2:
        delta = sum(w * score(logits, m, n) for m, w in zip(masks, weights, strict=True) if w != 0)
        return logits.add_(delta) if torch.is_tensor(delta) else logits
    # Each chunk is transposed (copied) before anything is written, so in place is safe.
    for start, stop, delta in _score_chunks(logits, masks, weights):
        logits[start:stop] += delta
    return logits


def apply_update_codes_(logits: torch.Tensor, codes: torch.Tensor, advantages: list[float], lr: float,
                        kernel=update_final_block, check: bool = True, chunk: int | None = None,
                        transpose: bool = True) -> torch.Tensor:
    """:func:`apply_update_` for N = 2 from per-group mask codes; returns the top-2 codes after it.

    fp32 ``logits [G, M]`` are updated in place. ``codes`` ``[K, G]``: strict 2-of-M codes (the
    sampler's output; not re-checked). ``kernel``: :func:`update_final_block` or a compiled copy
    giving the same bits. ``check`` raises if the updated logits hold NaN or inf. ``chunk`` and
    ``transpose``: as in sampling.sample_codes (speed only).
    """
    if codes.dim() != 2 or codes.shape[0] != len(advantages) or not len(advantages):
        raise ValueError(f"apply_update_codes_: need codes [K, G] and K advantages, got {tuple(codes.shape)} and {len(advantages)}")
    if logits.dtype != torch.float32 or logits.dim() != 2:
        raise ValueError(f"apply_update_codes_: need fp32 logits [G, M], got {logits.dtype} {tuple(logits.shape)}")
    g_total, m = logits.shape
    if codes.shape[1] != g_total:
        raise ValueError(f"apply_update_codes_: codes cover {codes.shape[1]} groups, logits {g_total}")
    w = torch.tensor(update_weights(advantages, lr), dtype=torch.float32, device=logits.device)
    final = torch.empty(g_total, dtype=code_dtype(m), device=logits.device)
    step = chunk or chunk_groups(logits.device)
    for start in range(0, g_total, step):
        stop = min(start + step, g_total)
        xt = logits[start:stop].t()
        new, final[start:stop] = kernel(xt.contiguous() if transpose else xt, codes[:, start:stop].contiguous(), w)
        logits[start:stop] = new.t()  # a row copy when logits are a view of [M, G] storage (LogitStore)
    if check:
        check_finite(logits, 0, "update")
    return final


def init_logits(prior_mask: torch.Tensor, c: float, m: int) -> torch.Tensor:
    """pi_0 = C * m0 in group layout: fp32 ``[G, M]`` from a bool prior ``[..., in]``."""
    return nm.group_view(prior_mask.to(torch.bool), m).to(torch.float32) * float(c)


def final_mask(logits: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Top-N logits per group (ties to the lower index, as nm.topn_mask): bool ``[G, M]``."""
    return nm.topn_mask(logits, n, m).view(-1, m)


def expected_flip_rate(c: float, n: int, m: int) -> float:
    """P(a group sampled from logits C * m0 differs from m0) = 1 - P(m0), exact (fp64)."""
    logits = torch.zeros(1, m, dtype=torch.float64)
    logits[0, :n] = float(c)
    mask = logits > 0
    return float(-torch.expm1(log_prob_set(logits, mask, n))[0])


def mask_entropy(logits: torch.Tensor, n: int) -> float:
    """Mean entropy (nats) of the per-group distribution over sets; N = 2 only (pair table)."""
    if n != 2:
        raise ValueError(f"mask_entropy: only N = 2 is supported, got N={n}")
    probs = pair_probs(logits)
    return float(-(probs * torch.log(probs.clamp_min(1e-45))).sum(dim=1).mean())
