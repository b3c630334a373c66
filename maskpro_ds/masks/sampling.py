"""Mask sampling: a counter-based RNG and exact N:M draws from the MaskPro distribution.

Randomness is a pure function of ``(seed, step, slot, layer)`` and of the group's GLOBAL index
in its layer, never of how groups are split across ranks, chunks or devices: sampling
``logits[a:b]`` with ``group_offset=a`` gives exactly rows ``a:b`` of sampling the whole layer.
That is what lets any ZeRO partition, any world size and a resumed run draw the same masks.

The RNG is a 32-bit integer hash (two rounds of a low-bias xorshift-multiply mixer) evaluated in
int64 tensors holding 32-bit values. Every multiplier is below 2**31, so the product of a 32-bit
state and a multiplier stays below 2**63: no signed overflow is ever relied on. Uniforms use the
top 24 bits, so they are exact in fp32, lie in [0, 1) and are never 1.0.

Distribution (docs/method.md §2): N positions drawn one after another without replacement with
probabilities softmax(pi) (Plackett–Luce). Two exact paths:

* N = 2: one uniform per group and the inverse CDF over the C(M, 2) unordered pairs (lexicographic
  order) with P({a, b}) = p_a p_b (1/(1 - p_a) + 1/(1 - p_b)). Every 1 - p is computed as the sum
  of the other terms (no cancellation). Exponentials are taken relative to the group's runner-up
  logit and capped at e^60 (and floored at e^-80), so every normaliser holds a term >= 1: logits
  that differ by hundreds give neither NaN nor a wrong count (the cap changes probabilities by a
  relative e^-60). Resolution is 2**-24: a pair rarer than ~6e-8 may be drawn at a rate off by
  that much. The fp32 exponential is built from exactly rounded operations (:func:`exp_exact_ops`,
  ~1 ulp), so plain torch and a torch.compile'd kernel give the same bits on any chunking.
* other N: Gumbel-top-N with one uniform per weight (counter ``global_group * M + j``). The 24-bit
  uniform bounds the Gumbel noise to about [-2.9, 17.3], so a logit gap above ~20 (probability
  ~2e-9) is never bridged.

The N = 2 path works on chunks of groups transposed to ``[M, chunk]`` so every operation is a
contiguous, cache-sized vector op (softmax over a last dim of 4 is far slower in stock torch).
Its draws come out as per-group codes (bit j set = position j kept: 4 bits for M = 4), which pack
to nm.pack_bits bytes without a bool ``[G, M]`` detour, and R draws of a chunk share its pair
weights (:func:`pair_code_block`, the kernel the sharded store compiles).
"""

from __future__ import annotations

import itertools
from functools import cache

import torch

from maskpro_ds.masks.nm import pack_bits, unpack_bits

_MASK32 = 0xFFFFFFFF
# Multipliers of a two-multiply xorshift mixer found by the hash-prospector search (bias ~0.108);
# both are odd and below 2**31, so (32-bit state) x (multiplier) < 2**63.
_MUL1 = 0x21F0AAAD
_MUL2 = 0x735A2D97
_INV_2_24 = 1.0 / (1 << 24)
EXP_CAP = 60.0  # cap on logit - runner-up before exp (see module docstring)
CHUNK_GROUPS = 1 << 15  # groups per CPU chunk on the N = 2 path: a few hundred KB per temporary
CHUNK_GROUPS_ACCEL = 1 << 22  # on an accelerator, chunks only bound memory and launch count


def chunk_groups(device: torch.device) -> int:
    """Groups per chunk: cache-sized on CPU, large on accelerators. Never changes the result."""
    return CHUNK_GROUPS if device.type == "cpu" else CHUNK_GROUPS_ACCEL


def _mix32_py(x: int) -> int:
    """The mixer of :func:`_mix32_` on a Python int (used to build keys)."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * _MUL1) & _MASK32
    x ^= x >> 15
    x = (x * _MUL2) & _MASK32
    x ^= x >> 15
    return x


def key_scalar(seed: int, step: int, slot: int, layer: int) -> int:
    """One 64-bit key from the four non-negative integers that name a draw.

    The integers are hashed one after another (a chained mixer over their 32-bit words), not
    added, so (step=1, slot=0) and (step=0, slot=1) give unrelated keys. ``slot`` is the sample
    slot within a step (one per rank), ``layer`` the index of the masked layer.
    """
    h_lo, h_hi = 0x3C6EF372, 0x0BB67AE8  # arbitrary distinct starting states
    for value in (seed, step, slot, layer):
        value = int(value)
        if value < 0 or value >= 1 << 64:
            raise ValueError(f"key_scalar: seed/step/slot/layer must be in [0, 2**64), got {value}")
        for word in (value & _MASK32, value >> 32):
            h_lo = _mix32_py(h_lo ^ _mix32_py(word ^ h_hi))
            h_hi = _mix32_py((h_hi + 0x9E3779B9) ^ h_lo)
    return (h_hi << 32) | h_lo


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """In-place 32-bit mixer on an int64 tensor holding values in [0, 2**32)."""
    x.bitwise_xor_(x >> 16)
    x.mul_(_MUL1).bitwise_and_(_MASK32)
    x.bitwise_xor_(x >> 15)
    x.mul_(_MUL2).bitwise_and_(_MASK32)
    x.bitwise_xor_(x >> 15)
    return x


def _hash_counters(k_lo, k_hi, counters: torch.Tensor) -> torch.Tensor:
    """:func:`counter_bits` with the key given as its two 32-bit words (ints or int64 0-d tensors)."""
    x = counters.to(torch.int64)
    hi = x >> 32
    x = x.bitwise_and(_MASK32).bitwise_xor_(k_lo)
    _mix32_(x)
    x.bitwise_xor_(hi).bitwise_xor_(k_hi)
    return _mix32_(x)


def counter_bits(key: int, counters: torch.Tensor) -> torch.Tensor:
    """32 random bits (int64 in [0, 2**32)) for every non-negative int64 counter under ``key``.

    Counters must be >= 0 (not checked here: that would cost a pass; callers build them from
    non-negative group indices).

    Round one mixes the low counter word xor the low key word; round two mixes that xor the high
    key word and the high counter word. Keys differing anywhere give unrelated streams, not a
    relabelling of the counters.
    """
    key = int(key)
    return _hash_counters(key & _MASK32, (key >> 32) & _MASK32, counters)


def counter_uniform(key: int, counters: torch.Tensor) -> torch.Tensor:
    """Uniforms in [0, 1) (multiples of 2**-24, exact in fp32, never 1.0) for int64 counters."""
    return (counter_bits(key, counters) >> 8).to(torch.float32).mul_(_INV_2_24)


@cache
def _pairs_cpu(m: int) -> tuple[tuple[tuple[int, int], ...], torch.Tensor]:
    pairs = tuple(itertools.combinations(range(m), 2))
    masks = torch.zeros(len(pairs), m, dtype=torch.bool)
    for i, (a, b) in enumerate(pairs):
        masks[i, a] = masks[i, b] = True
    return pairs, masks


def pair_table(m: int, device: torch.device | str = "cpu") -> tuple[tuple[tuple[int, int], ...], torch.Tensor]:
    """The C(M, 2) unordered pairs in lexicographic order, and their masks ``[C(M,2), M]`` bool."""
    pairs, masks = _pairs_cpu(int(m))
    return pairs, masks.to(device)


# exp(v) = 2**k * P(r), r = v - k ln 2 (Cody-Waite, ln 2 split so k * _LN2_HI is exact), P the
# Cephes expf polynomial (~1 ulp). Built from +, *, round and a bit cast only: each is exactly
# rounded, so plain torch (vector body or scalar tail, any chunking) and a compiled kernel give
# the same bits. torch.exp does not: MKL, Sleef and libm differ in the last bit.
_LOG2E = 1.44269504088896341
_LN2_HI = 0.693359375
_LN2_LO = -2.12194440e-4
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
EXP_FLOOR = -80.0  # below this exp(v) < 2e-35 is returned as exp(-80): no denormals anywhere


def exp_exact_ops(v: torch.Tensor) -> torch.Tensor:
    """exp of fp32 ``v`` clamped to [EXP_FLOOR, EXP_CAP], reproducible bit for bit everywhere.

    Other dtypes (fp64 for exact probabilities in tests and reports) use torch.exp(min(v, EXP_CAP)).
    """
    if v.dtype != torch.float32:
        return torch.exp(v.clamp_max(EXP_CAP))
    v = v.clamp(EXP_FLOOR, EXP_CAP)
    k = torch.round(v * _LOG2E)
    r = (v - k * _LN2_HI) - k * _LN2_LO
    p = r * _EXP_POLY[0] + _EXP_POLY[1]
    for c in _EXP_POLY[2:]:
        p = p * r + c
    p = (p * (r * r) + r) + 1.0
    scale = ((k.to(torch.int32) + 127) << 23).view(torch.float32)
    return p * scale


def stable_exp_t(xt: torch.Tensor) -> list[torch.Tensor]:
    """Per-position exponentials of a transposed group block ``[M, g]``, relative to the runner-up.

    Returns y_j = exp(min(x_j - runner_up, EXP_CAP)) as M vectors (:func:`exp_exact_ops`). At
    least two entries per group are exactly 1 or more (the top two), so any sum that leaves out
    one entry is >= 1 and never underflows.
    """
    rows = list(xt.unbind(0))
    max1 = torch.maximum(rows[0], rows[1])
    max2 = torch.minimum(rows[0], rows[1])
    for row in rows[2:]:
        max2 = torch.maximum(max2, torch.minimum(max1, row))
        max1 = torch.maximum(max1, row)
    if xt.is_contiguous():  # one op over the block (eager: fewer calls); the same bits either way
        return list(exp_exact_ops(xt - max2).unbind(0))
    return [exp_exact_ops(row - max2) for row in rows]  # a strided view: keep compiled loops 1-D


def exclusive_sums(ys: list[torch.Tensor]) -> list[torch.Tensor]:
    """For each position a, sum_{k != a} y_k from prefix and suffix sums (no subtraction)."""
    m = len(ys)
    prefix = [None] * m
    suffix = [None] * m
    for j in range(1, m):
        prefix[j] = ys[0] if j == 1 else prefix[j - 1] + ys[j - 1]
    for j in range(m - 2, -1, -1):
        suffix[j] = ys[m - 1] if j == m - 2 else suffix[j + 1] + ys[j + 1]
    out = []
    for j in range(m):
        if prefix[j] is None:
            out.append(suffix[j])
        elif suffix[j] is None:
            out.append(prefix[j])
        else:
            out.append(prefix[j] + suffix[j])
    return out


def _pair_weights_t(xt: torch.Tensor) -> list[torch.Tensor]:
    """Unnormalised P({a,b}) * Z for every pair (lexicographic) of a block ``[M, g]``."""
    ys = stable_exp_t(xt)
    inv_excl = [e.reciprocal() for e in exclusive_sums(ys)]  # Z / (1 - p_a) / Z
    pairs = itertools.combinations(range(len(ys)), 2)  # plain Python: traceable by torch.compile
    return [ys[a] * ys[b] * (inv_excl[a] + inv_excl[b]) for a, b in pairs]


def pair_probs(logits: torch.Tensor) -> torch.Tensor:
    """P({a, b}) for every pair of every group: ``[G, M]`` -> ``[G, C(M, 2)]`` (lexicographic)."""
    xt = logits.t().contiguous()
    weights = torch.stack(_pair_weights_t(xt), dim=1)
    return weights / weights.sum(dim=1, keepdim=True)


def _check_logits(logits: torch.Tensor, n: int, group_offset: int) -> None:
    if int(group_offset) < 0:
        raise ValueError(f"sample_masks: group_offset must be >= 0, got {group_offset}")
    if logits.dim() != 2:
        raise ValueError(f"sample_masks: logits must be [groups, M], got shape {tuple(logits.shape)}")
    m = logits.shape[1]
    if not 0 < n < m:
        raise ValueError(f"sample_masks: need 0 < N < M, got N={n}, M={m}")
    if not logits.is_floating_point():
        raise ValueError(f"sample_masks: logits must be floating point, got {logits.dtype}")


def check_finite(rows: torch.Tensor, first_group: int, name: str) -> None:
    """Raise if a ``[g, M]`` block of logits holds NaN or inf (a diverged run), naming the group.

    The common case costs one reduction: a sum of finite values is finite unless it overflows,
    and only then (or for a real NaN/inf) is the exact element-wise test run.
    """
    if rows.numel() == 0 or bool(torch.isfinite(rows.sum())):
        return
    finite = torch.isfinite(rows)
    if not bool(finite.all()):
        bad = int(torch.nonzero(~finite.all(dim=1))[0, 0]) + first_group
        raise ValueError(f"{name}: logits of group {bad} hold NaN or inf; the run diverged "
                         f"(lower the lr or condition the advantages)")


# ---------------------------------------------------------------------------------------------
# N = 2: masks as integer codes (bit j set = position j kept); M <= 8 fits a byte.
MAX_CODE_M = 31


def code_dtype(m: int) -> torch.dtype:
    """Dtype of per-group mask codes: uint8 up to M = 8, int32 above (M <= 31)."""
    if m > MAX_CODE_M:
        raise ValueError(f"N = 2 sampling supports M <= {MAX_CODE_M}, got M={m}")
    return torch.uint8 if m <= 8 else torch.int32


def pair_codes(m: int) -> list[int]:
    """Codes of the C(M, 2) unordered pairs in lexicographic order (the order of :func:`pair_table`)."""
    return [(1 << a) | (1 << b) for a, b in itertools.combinations(range(m), 2)]


def codes_to_masks(codes: torch.Tensor, m: int) -> torch.Tensor:
    """Per-group codes ``[G]`` -> bool masks ``[G, M]``."""
    shifts = torch.arange(m, dtype=torch.int32, device=codes.device)
    return ((codes.to(torch.int32).unsqueeze(1) >> shifts) & 1).to(torch.bool)


def masks_to_codes(masks: torch.Tensor) -> torch.Tensor:
    """Bool masks ``[G, M]`` -> per-group codes ``[G]`` (inverse of :func:`codes_to_masks`)."""
    m = masks.shape[1]
    weights = torch.tensor([1 << j for j in range(m)], dtype=torch.int32, device=masks.device)
    return (masks.to(torch.int32) * weights).sum(dim=1, dtype=torch.int32).to(code_dtype(m))


def codes_to_packed(codes: torch.Tensor, m: int) -> torch.Tensor:
    """Per-group codes ``[G]`` -> the nm.pack_bits bytes of their ``[G, M]`` masks (no bool detour for M = 4, 8)."""
    if m == 8:
        return codes.contiguous()
    if m == 4:
        if codes.shape[0] % 2:
            codes = torch.cat([codes, codes.new_zeros(1)])
        pairs = codes.view(-1, 2)
        return pairs[:, 0] | (pairs[:, 1] << 4)
    return pack_bits(codes_to_masks(codes, m).reshape(-1))


def packed_to_codes(packed: torch.Tensor, g: int, m: int) -> torch.Tensor:
    """Inverse of :func:`codes_to_packed` for ``g`` groups."""
    if m == 8:
        return packed[:g]
    if m == 4:
        return torch.stack([packed & 15, packed >> 4], dim=1).reshape(-1)[:g]
    return masks_to_codes(unpack_bits(packed, g * m).view(g, m))


def pair_code_block(xt: torch.Tensor, first: torch.Tensor, k_lo: torch.Tensor, k_hi: torch.Tensor) -> torch.Tensor:
    """R draws (N = 2) for a transposed chunk: fp32 logits ``[M, g]`` -> mask codes ``[R, g]``.

    ``first``: global index of group 0 (int64 0-d tensor); ``k_lo``/``k_hi``: the R keys' 32-bit
    words (int64 ``[R]``), tensors so that a compiled kernel is not specialised on them. The pair
    weights are computed once and shared by the R draws. Each draw takes one uniform per group
    (counter = global group index) and inverts the CDF over the pairs: the cdf is a running fp32
    sum (monotone) and v = u * total is strictly below total for u <= 1 - 2**-24, so the pair
    drawn always has a positive weight. Pure elementwise code:
    ``torch.compile(pair_code_block, dynamic=True)`` fuses it with the same bits (tests check).
    """
    m, g = xt.shape
    counters = torch.arange(g, dtype=torch.int64, device=xt.device) + first
    weights = _pair_weights_t(xt)
    cdf = weights[0]
    cdfs = [cdf]
    for w in weights[1:-1]:
        cdf = cdf + w
        cdfs.append(cdf)
    total = cdf + weights[-1]
    codes = pair_codes(m)
    out = []
    for r in range(k_lo.shape[0]):
        u = (_hash_counters(k_lo[r], k_hi[r], counters) >> 8).to(torch.float32) * _INV_2_24
        v = u * total
        # code of pair idx = codes[0] + sum_{k < idx} (codes[k+1] - codes[k]), idx = #{k: cdf_k <= v}
        code = torch.full((g,), codes[0], dtype=torch.int32, device=xt.device)
        for k, c in enumerate(cdfs):
            code = code + (c <= v).to(torch.int32) * (codes[k + 1] - codes[k])
        out.append(code.to(code_dtype(m)))
    return torch.stack(out, dim=0)


def key_words(keys: list[int], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Low and high 32-bit words of the keys as int64 ``[R]`` tensors (kernel arguments)."""
    keys = [int(k) for k in keys]
    return (torch.tensor([k & _MASK32 for k in keys], dtype=torch.int64, device=device),
            torch.tensor([(k >> 32) & _MASK32 for k in keys], dtype=torch.int64, device=device))


def sample_codes(logits: torch.Tensor, keys: list[int], group_offset: int = 0, kernel=pair_code_block,
                 check: bool = True, chunk: int | None = None, transpose: bool = True) -> torch.Tensor:
    """N = 2 draws under each of ``keys`` as per-group mask codes ``[R, G]`` (:func:`codes_to_masks`).

    Row r equals ``sample_masks(logits, 2, keys[r], group_offset)`` as codes. ``kernel`` computes
    a chunk (default :func:`pair_code_block`, plain torch); a compiled one must give the same bits
    (maskpro_ds.logits.select_kernels checks that before using one). ``check=False`` skips the
    finiteness check, for callers that check their logits once per update instead. ``chunk``
    (groups per kernel call) and ``transpose`` (hand the kernel a contiguous ``[M, g]`` copy rather
    than a transposed view, best for plain torch) change speed only, never the result.
    """
    _check_logits(logits, 2, group_offset)
    g_total, m = logits.shape
    out = torch.empty(len(keys), g_total, dtype=code_dtype(m), device=logits.device)
    if check:
        check_finite(logits, int(group_offset), "sample_masks")
    k_lo, k_hi = key_words(keys, logits.device)
    step = chunk or chunk_groups(logits.device)
    for start in range(0, g_total, step):
        stop = min(start + step, g_total)
        first = torch.tensor(int(group_offset) + start, dtype=torch.int64, device=logits.device)
        xt = logits[start:stop].to(torch.float32).t()
        out[:, start:stop] = kernel(xt.contiguous() if transpose else xt, first, k_lo, k_hi)
    return out


def sample_masks(logits: torch.Tensor, n: int, key: int, group_offset: int = 0,
                 kernel=pair_code_block) -> torch.Tensor:
    """Draw one strict N:M mask per group from Plackett–Luce(softmax(logits)); bool ``[G, M]``.

    ``group_offset`` is the global index (within the layer) of row 0 of ``logits``; the draw of a
    group depends only on ``key``, its global index and its own logits. ``kernel``: see
    :func:`sample_codes` (N = 2 only).
    """
    _check_logits(logits, n, group_offset)
    g_total, m = logits.shape
    if n == 2:
        return codes_to_masks(sample_codes(logits, [key], group_offset, kernel)[0], m)
    out = torch.zeros(g_total, m, dtype=torch.bool, device=logits.device)
    step = chunk_groups(logits.device)
    for start in range(0, g_total, step):
        stop = min(start + step, g_total)
        check_finite(logits[start:stop], group_offset + start, "sample_masks")
        first = (group_offset + start) * m
        counters = torch.arange(first, first + (stop - start) * m, device=logits.device)
        # Gumbel-top-N; u in (0, 1) strictly: the centre of its 24-bit cell.
        u = ((counter_bits(key, counters) >> 8).to(torch.float64) + 0.5) * _INV_2_24
        perturbed = logits[start:stop].to(torch.float64) - torch.log(-torch.log(u)).view(-1, m)
        out[start:stop].scatter_(1, torch.topk(perturbed, n, dim=1).indices, True)
    return out
