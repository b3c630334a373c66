/* The export's fused 2:4 (N:4) block pass, in one sweep over a row block: from fp32 logits, the
 * keep byte of every weight, the packed mask (nm.pack_bits layout) and the pruned weights' raw
 * bits. Built and loaded by maskpro_ds/export/native.py, which keeps it only if it gives the numpy
 * kernel's bytes (export/fused.py) on a probe with hard cases.
 *
 * Why C: the numpy kernel makes ~15 passes over temporaries per block (2.8 ns per weight); this is
 * one pass with no temporaries. No library offers "top-N of every group of 4 with this tie-break,
 * packed, and a select on raw bits" as one loop, and torch.compile's CPU code was slower than numpy.
 *
 * The rule is nm.topn_mask's: k beats j if x_k > x_j, or x_k == x_j and k < j (so -0.0 ties +0.0
 * and inf is an ordinary value); j is kept iff fewer than N positions beat it. Only compares and
 * integer ops: no float arithmetic, so compiler flags cannot change a bit. NaN is refused. */

#include <stdint.h>

/* Returns 0, or 1 if any logit of the block is NaN (outputs then undefined).
 * logits: rows * in_f floats; keep: rows * in_f bytes; packed: rows * ((in_f + 7) / 8) bytes;
 * weights/pruned: rows * in_f items of wbytes (1, 2, 4 or 8) each, or both NULL. in_f % 4 == 0. */
/* 4-bit keep code of every group (bit j = position j kept); returns nonzero if any logit is NaN.
 * Written as a plain loop over groups so the compiler vectorises it (8 groups per AVX2 step). */
static int group_codes(const float *restrict x, int64_t groups, int32_t n, uint8_t *restrict code) {
    int nan = 0;
    for (int64_t g = 0; g < groups; g++) {
        const float x0 = x[4 * g], x1 = x[4 * g + 1], x2 = x[4 * g + 2], x3 = x[4 * g + 3];
        nan |= (x0 != x0) | (x1 != x1) | (x2 != x2) | (x3 != x3);
        const int c01 = x0 >= x1, c02 = x0 >= x2, c03 = x0 >= x3;
        const int c12 = x1 >= x2, c13 = x1 >= x3, c23 = x2 >= x3;
        /* beaten_j: earlier positions win ties (>=), later ones must be strictly greater */
        const int b0 = 3 - c01 - c02 - c03;
        const int b1 = c01 + 2 - c12 - c13;
        const int b2 = c02 + c12 + 1 - c23;
        const int b3 = c03 + c13 + c23;
        code[g] = (uint8_t)((b0 < n) | (b1 < n) << 1 | (b2 < n) << 2 | (b3 < n) << 3);
    }
    return nan;
}

/* Returns 0, or 1 if any logit of the block is NaN (outputs then undefined).
 * logits: rows * in_f floats; keep: rows * in_f bytes; packed: rows * ((in_f + 7) / 8) bytes;
 * code: rows * in_f / 4 bytes of scratch; weights/pruned: rows * in_f items of wbytes (1, 2, 4 or
 * 8) each, or both NULL. in_f % 4 == 0. */
int maskpro_nm4_block(const float *logits, int64_t rows, int64_t in_f, int32_t n, uint8_t *keep,
                      uint8_t *packed, uint8_t *code, const void *weights, void *pruned, int32_t wbytes) {
    const int64_t row_bytes = (in_f + 7) / 8;
    const int64_t groups = in_f / 4;
    if (group_codes(logits, rows * groups, n, code)) return 1;
    /* keep bytes: code * (1 + 2^7 + 2^14 + 2^21) puts bit j at bit 8j (no two products overlap,
     * so nothing carries); the mask keeps those four bits. */
    uint32_t *keep4 = (uint32_t *)keep;
    for (int64_t g = 0; g < rows * groups; g++) keep4[g] = ((uint32_t)code[g] * 0x00204081u) & 0x01010101u;
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *c = code + r * groups;
        uint8_t *p = packed + r * row_bytes;
        for (int64_t b = 0; b < groups / 2; b++) p[b] = (uint8_t)(c[2 * b] | c[2 * b + 1] << 4);
        if (groups & 1) p[groups / 2] = c[groups - 1];
    }
    if (weights == 0) return 0;
    const int64_t count = rows * in_f;
    /* keep is 0 or 1: 0 - keep is all ones or all zeros in any unsigned width */
    if (wbytes == 2) {
        const uint16_t *w = weights;
        uint16_t *o = pruned;
        for (int64_t i = 0; i < count; i++) o[i] = w[i] & (uint16_t)(0u - keep[i]);
    } else if (wbytes == 4) {
        const uint32_t *w = weights;
        uint32_t *o = pruned;
        for (int64_t i = 0; i < count; i++) o[i] = w[i] & (0u - (uint32_t)keep[i]);
    } else if (wbytes == 1) {
        const uint8_t *w = weights;
        uint8_t *o = pruned;
        for (int64_t i = 0; i < count; i++) o[i] = w[i] & (uint8_t)(0u - keep[i]);
    } else {
        const uint64_t *w = weights;
        uint64_t *o = pruned;
        for (int64_t i = 0; i < count; i++) o[i] = w[i] & (0ull - (uint64_t)keep[i]);
    }
    return 0;
}
