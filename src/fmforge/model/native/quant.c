/* fmforge's CPU kernels for weight-only quantised linears (int8 and int4), any number of rows.
 *
 * Built at first use by fmforge/model/native/quant.py with the system C compiler and -fopenmp
 * (inside a torch process the OpenMP runtime is torch's own, so these threads and torch's are one
 * pool). Layouts (model/quantize.py writes them; docs/quantize.md documents them):
 *   activations: each row of x (rows, k) is quantised to int8 in blocks of 32 (xq, rows x kp,
 *     kp = k rounded up to 32, tail zero) with one fp32 scale per block (dx) and, for int4, the
 *     block's sum of quantised values (xsum); llama.cpp quantises activations the same way.
 *   int8 weights: w (n, kp) uint8, q in [0, 255] standing for scale * q + min; scales and mins
 *     (n, groups) fp16, one pair per `per_scale` blocks of 32 (1 for groups of 32, kp / 32 for
 *     one pair per row).
 *   int4 weights: w (n, kp / 2) uint8; block b of a row is bytes 16b .. 16b + 15, byte i holding
 *     element 32b + i in its low nibble and element 32b + 16 + i in its high nibble, q in [0, 15]
 *     standing for scale * q + min (llama.cpp's Q4_1 block); scales and mins (n, kp / 32) fp16.
 * Both are asymmetric: a block's product is scale * sum(q x) + min * sum(x), and sum(x) is
 * computed once per activation block for every weight row.
 * The weights stay quantised in memory: each block is widened in registers, multiplied as
 * integers with the activation block (maddubs on AVX2, vpdpbusd with AVX512-VNNI) and scaled
 * once per block, so a product reads 1 (int8) or 0.5 (int4) bytes per weight plus the scales.
 * Threads split the output rows in groups of 4 rows that share each activation block load; every
 * row of x is done while the 4 weight rows are in cache, so B rows cost one pass over the weights.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define FMFORGE_AVX2 1
#endif

#define BLOCK 32

static inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff, bits;
    if (exponent == 0) {
        if (mantissa == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            exponent = 127 - 15 + 1;
            while (!(mantissa & 0x400)) {
                mantissa <<= 1;
                exponent--;
            }
            bits = sign | (exponent << 23) | ((mantissa & 0x3ff) << 13);
        }
    } else if (exponent == 31) {
        bits = sign | 0x7f800000 | (mantissa << 13);
    } else {
        bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

/* x (rows, k) fp32 -> xq (rows, kp) int8, dx (rows, kp / 32) fp32 and xsum (rows, kp / 32) int32
 * (xsum may be NULL). Symmetric: q = round(x / d), d = max|x| / 127 per block of 32. */
void fmforge_quantize_rows(const float *x, int64_t rows, int64_t k, int64_t kp, int8_t *xq,
                           float *dx, int32_t *xsum) {
    const int64_t blocks = kp / BLOCK;
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * k;
        for (int64_t b = 0; b < blocks; b++) {
            float v[BLOCK];
            for (int i = 0; i < BLOCK; i++) {
                const int64_t c = b * BLOCK + i;
                v[i] = c < k ? xr[c] : 0.0f;
            }
            float amax = 0.0f;
            for (int i = 0; i < BLOCK; i++) amax = fmaxf(amax, fabsf(v[i]));
            const float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
            int8_t *q = xq + r * kp + b * BLOCK;
            int32_t sum = 0;
            for (int i = 0; i < BLOCK; i++) {
                q[i] = (int8_t)lrintf(v[i] * inv);
                sum += q[i];
            }
            dx[r * blocks + b] = d;
            if (xsum) xsum[r * blocks + b] = sum;
        }
    }
}

#ifdef FMFORGE_AVX2
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Prefetch the bytes at p of the 4 weight rows PREFETCH_ROWS rows further on (rows `stride`
 * bytes apart): the quad after the next one, which the same thread does soon after this one
 * (the schedule is static). A decode step streams each weight once, and a row of SmolLM2's int8
 * weights is only 9 cache lines, too short for the hardware prefetcher to run ahead: requesting
 * the lines early halved the int8 products' time on the 2-core EPYC VM (one step's products
 * 32 -> 16.5 ms, loaded machine). Prefetches never fault: past the last row they are harmless. */
#define PREFETCH_ROWS 8
static inline void prefetch4(const uint8_t *p, int64_t stride) {
    for (int c = 0; c < 4; c++)
        _mm_prefetch((const char *)(p + (c + PREFETCH_ROWS) * stride), _MM_HINT_T0);
}

/* Eight int32 partial sums of u (32 unsigned bytes) times s (32 signed bytes). */
static inline __m256i dot_u8_s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

/* Eight int32 partial sums of (q - Q8_SHIFT) x for uint8 weights q and int8 activations x; the
 * caller adds Q8_SHIFT * sum(x) back per block. With VNNI, vpdpbusd takes q as it is (shift 0).
 * maddubs would saturate on 255 * 127 * 2, so without VNNI q - 128 (one xor) goes in as int8,
 * its magnitude as the unsigned operand and its sign moved onto x (llama.cpp's trick; |q - 128|
 * <= 128 and |x| <= 127 keep each pair sum within int16). */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define Q8_SHIFT 0.0f
static inline __m256i dot_q8(__m256i q, __m256i x) { return dot_u8_s8(q, x); }
#else
#define Q8_SHIFT 128.0f
static inline __m256i dot_q8(__m256i q, __m256i x) {
    const __m256i w = _mm256_xor_si256(q, _mm256_set1_epi8((char)0x80));
    return dot_u8_s8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
}
#endif

#endif

/* One output row j for one activation row: the portable reference of the two kernels below. */
static float dot_row_q8(const int8_t *xr, const float *dr, const int32_t *sr, const uint8_t *wj,
                        const uint16_t *sj, const uint16_t *mj, int64_t groups, int64_t per_scale) {
    float acc = 0.0f;
    for (int64_t g = 0; g < groups; g++) {
        const float ws = half_to_float(sj[g]), wm = half_to_float(mj[g]);
        for (int64_t b = g * per_scale; b < (g + 1) * per_scale; b++) {
            int32_t dot = 0;
            for (int i = 0; i < BLOCK; i++) dot += (int32_t)wj[b * BLOCK + i] * xr[b * BLOCK + i];
            acc += dr[b] * (ws * (float)dot + wm * (float)sr[b]); /* sum (s q + m) x */
        }
    }
    return acc;
}

static float dot_row_q4(const int8_t *xr, const float *dr, const int32_t *sr, const uint8_t *wj,
                        const uint16_t *sj, const uint16_t *mj, int64_t blocks) {
    float acc = 0.0f;
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *p = wj + b * (BLOCK / 2);
        const int8_t *xb = xr + b * BLOCK;
        int32_t dot = 0;
        for (int i = 0; i < BLOCK / 2; i++)
            dot += (p[i] & 0x0f) * xb[i] + (p[i] >> 4) * xb[i + BLOCK / 2];
        /* sum (s q + m) x = s sum(q x) + m sum(x), each times the activations' block scale */
        acc += dr[b] * (half_to_float(sj[b]) * (float)dot + half_to_float(mj[b]) * (float)sr[b]);
    }
    return acc;
}

#ifdef FMFORGE_AVX2
/* The scales of 4 rows x 2 blocks (b, b + 1), each weight scale times its activation block's:
 * lanes [r0 b, r0 b+1, r1 b, r1 b+1, ..., r3 b+1]. Row r's two scales sit side by side in s. */
static inline __m256 pair_scales(const uint16_t *s, int64_t stride, const float *dr) {
    uint32_t h[4];
    for (int c = 0; c < 4; c++) memcpy(&h[c], s + c * stride, sizeof h[c]);
    const __m256 ws = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h));
    double pair; /* dr[0], dr[1] as one 8-byte value, broadcast 4 times */
    memcpy(&pair, dr, sizeof pair);
    return _mm256_mul_ps(ws, _mm256_castpd_ps(_mm256_set1_pd(pair)));
}

/* xsum of blocks b, b + 1 as floats, repeated for 4 rows (the lane order of pair_scales). */
static inline __m256 pair_sums(const int32_t *sr) {
    double pair;
    memcpy(&pair, sr, sizeof pair);
    return _mm256_cvtepi32_ps(_mm256_castpd_si256(_mm256_set1_pd(pair)));
}

/* Four output rows at once for one activation row, int8 weights with a scale and a min per
 * block. Blocks go in pairs: each row's two products are folded into one vector (lanes 0-1 and
 * 4-5: block b, 2-3 and 6-7: block b + 1) and scaled by one multiply-add, so the per-block scalar
 * work of a naive loop (convert, multiply, broadcast) is shared by 4 rows and 2 blocks; the
 * (min + Q8_SHIFT * scale) * sum(x) terms of 4 rows x 2 blocks take one more. */
static void dot4_q8(const int8_t *xr, const float *dr, const int32_t *sr, const uint8_t *w,
                    const uint16_t *s, const uint16_t *mins, int64_t kp, int64_t blocks,
                    float *out) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                     _mm256_setzero_ps()};
    __m256 offset = _mm256_setzero_ps();
    /* permutes the [r0 b, r0 b+1, r1 b, ...] scales to row c's hadd lane order */
    const __m256i pick[4] = {_mm256_setr_epi32(0, 0, 1, 1, 0, 0, 1, 1),
                             _mm256_setr_epi32(2, 2, 3, 3, 2, 2, 3, 3),
                             _mm256_setr_epi32(4, 4, 5, 5, 4, 4, 5, 5),
                             _mm256_setr_epi32(6, 6, 7, 7, 6, 6, 7, 7)};
    int64_t b = 0;
    for (; b + 1 < blocks; b += 2) {
        const __m256i x0 = _mm256_loadu_si256((const __m256i *)(xr + b * BLOCK));
        const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xr + (b + 1) * BLOCK));
        const __m256 d = pair_scales(s + b, blocks, dr + b);
        const __m256 m = _mm256_fmadd_ps(d, _mm256_set1_ps(Q8_SHIFT),
                                         pair_scales(mins + b, blocks, dr + b));
        offset = _mm256_fmadd_ps(m, pair_sums(sr + b), offset);
        prefetch4(w + b * BLOCK, kp);
        for (int c = 0; c < 4; c++) {
            const uint8_t *wc = w + c * kp + b * BLOCK;
            const __m256i w0 = _mm256_loadu_si256((const __m256i *)wc);
            const __m256i w1 = _mm256_loadu_si256((const __m256i *)(wc + BLOCK));
            const __m256i dot = _mm256_hadd_epi32(dot_q8(w0, x0), dot_q8(w1, x1));
            acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot),
                                     _mm256_permutevar8x32_ps(d, pick[c]), acc[c]);
        }
    }
    float off[8];
    _mm256_storeu_ps(off, offset);
    for (int c = 0; c < 4; c++) {
        out[c] = hsum(acc[c]) + off[2 * c] + off[2 * c + 1];
        if (b < blocks) /* an odd last block */
            out[c] += dot_row_q8(xr + b * BLOCK, dr + b, sr + b, w + c * kp + b * BLOCK,
                                 s + c * blocks + b, mins + c * blocks + b, 1, 1);
    }
}

/* Four output rows at once for one activation row, int8 weights with one scale and min per row. */
static void dot4_q8_rows(const int8_t *xr, const float *dr, const int32_t *sr, const uint8_t *w,
                         const uint16_t *s, const uint16_t *mins, int64_t kp, int64_t blocks,
                         float *out) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                     _mm256_setzero_ps()};
    float offset = 0.0f;
    for (int64_t b = 0; b < blocks; b++) {
        const __m256i xv = _mm256_loadu_si256((const __m256i *)(xr + b * BLOCK));
        const __m256 d = _mm256_set1_ps(dr[b]);
        offset += dr[b] * (float)sr[b];
        if (!(b & 1)) prefetch4(w + b * BLOCK, kp);
        for (int c = 0; c < 4; c++) {
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + c * kp + b * BLOCK));
            acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_q8(wv, xv)), d, acc[c]);
        }
    }
    for (int c = 0; c < 4; c++) /* sum x = offset: s (sum (q - shift) x + shift sum x) + m sum x */
        out[c] = half_to_float(s[c]) * (hsum(acc[c]) + Q8_SHIFT * offset) +
                 half_to_float(mins[c]) * offset;
}

/* Four output rows at once for one activation row, int4 weights. Blocks go in pairs: 32 bytes
 * hold both blocks' 16 bytes, so one load, one mask and one shift give the low nibbles of both
 * (elements 0-15 of b, then of b + 1) and the high nibbles (elements 16-31), matched by the
 * activations rearranged the same way once for all 4 rows. */
static void dot4_q4(const int8_t *xr, const float *dr, const int32_t *sr, const uint8_t *w,
                    const uint16_t *s, const uint16_t *mins, int64_t kp, int64_t blocks,
                    float *out) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                     _mm256_setzero_ps()};
    __m256 offset = _mm256_setzero_ps();
    const __m256i low = _mm256_set1_epi8(0x0f);
    const __m256i pick[4] = {_mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1),
                             _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3),
                             _mm256_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5),
                             _mm256_setr_epi32(6, 6, 6, 6, 7, 7, 7, 7)};
    int64_t b = 0;
    for (; b + 1 < blocks; b += 2) {
        const __m256i x0 = _mm256_loadu_si256((const __m256i *)(xr + b * BLOCK));
        const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xr + (b + 1) * BLOCK));
        const __m256i x_lo = _mm256_permute2x128_si256(x0, x1, 0x20); /* elements 0-15 of each */
        const __m256i x_hi = _mm256_permute2x128_si256(x0, x1, 0x31); /* elements 16-31 */
        const __m256 d = pair_scales(s + b, blocks, dr + b);
        offset = _mm256_fmadd_ps(pair_scales(mins + b, blocks, dr + b), pair_sums(sr + b), offset);
        if (!(b & 3)) prefetch4(w + b * (BLOCK / 2), kp / 2);
        for (int c = 0; c < 4; c++) {
            const __m256i wv =
                _mm256_loadu_si256((const __m256i *)(w + c * (kp / 2) + b * (BLOCK / 2)));
            const __m256i lo = _mm256_and_si256(wv, low);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), low);
            const __m256i dot = _mm256_add_epi32(dot_u8_s8(lo, x_lo), dot_u8_s8(hi, x_hi));
            acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot),
                                     _mm256_permutevar8x32_ps(d, pick[c]), acc[c]);
        }
    }
    float off[8];
    _mm256_storeu_ps(off, offset);
    for (int c = 0; c < 4; c++) {
        out[c] = hsum(acc[c]) + off[2 * c] + off[2 * c + 1]; /* + min * sum(x) per block */
        if (b < blocks) /* an odd last block */
            out[c] += dot_row_q4(xr + b * BLOCK, dr + b, sr + b, w + c * (kp / 2) + b * (BLOCK / 2),
                                 s + c * blocks + b, mins + c * blocks + b, 1);
    }
}
#endif

/* One output row of int8 weights times fp32 activations (padded to kp; xs: their sum per group):
 * the reference. */
static float dot_row_q8_float(const float *xr, const float *xs, const uint8_t *wj,
                              const uint16_t *sj, const uint16_t *mj, int64_t groups,
                              int64_t per_scale) {
    float acc = 0.0f;
    for (int64_t g = 0; g < groups; g++) {
        float part = 0.0f;
        for (int64_t c = g * per_scale * BLOCK; c < (g + 1) * per_scale * BLOCK; c++)
            part += (float)wj[c] * xr[c];
        acc += part * half_to_float(sj[g]) + half_to_float(mj[g]) * xs[g];
    }
    return acc;
}

#ifdef FMFORGE_AVX2
/* Four output rows of int8 weights times fp32 activations: each weight is widened to fp32 in
 * registers (8 at a time) and multiplied with the unrounded activations, so the only rounding is
 * the weights' own; the scale multiplies once per group, and the min times the group's sum of
 * activations (xs) is added once per group. */
static void dot4_q8_float(const float *xr, const float *xs, const uint8_t *w, const uint16_t *s,
                          const uint16_t *mins, int64_t kp, int64_t groups, int64_t per_scale,
                          float *out) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                     _mm256_setzero_ps()};
    float offset[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t g = 0; g < groups; g++) {
        __m256 part[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                          _mm256_setzero_ps()};
        for (int64_t i = g * per_scale * BLOCK; i < (g + 1) * per_scale * BLOCK; i += 8) {
            if (!(i & 63)) prefetch4(w + i, kp);
            const __m256 xv = _mm256_loadu_ps(xr + i);
            for (int c = 0; c < 4; c++) {
                const __m128i raw = _mm_loadl_epi64((const __m128i *)(w + c * kp + i));
                const __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(raw));
                part[c] = _mm256_fmadd_ps(wv, xv, part[c]);
            }
        }
        for (int c = 0; c < 4; c++) {
            acc[c] = _mm256_fmadd_ps(part[c], _mm256_set1_ps(half_to_float(s[c * groups + g])),
                                     acc[c]);
            offset[c] += half_to_float(mins[c * groups + g]) * xs[g];
        }
    }
    for (int c = 0; c < 4; c++) out[c] = hsum(acc[c]) + offset[c];
}
#endif

/* The products of up to 3 quantised linears that share their input (q/k/v, gate/up), in one call
 * (every weight has its mins):
 * x (rows, k) fp32 is quantised once, then one parallel loop covers every output row of every
 * weight, writing y (rows, n0 + n1 + n2) with the outputs side by side. All weights have the
 * same bits (8 or 4) and the same blocks per scale. One call and one thread team per group keeps
 * a decode step's per-product overhead to a few microseconds. */
void fmforge_quant_group(const float *x, int64_t rows, int64_t k, int64_t kp, int bits,
                         int64_t per_scale, int count, const void *w0, const uint16_t *s0,
                         const uint16_t *m0, int64_t n0, const void *w1, const uint16_t *s1,
                         const uint16_t *m1, int64_t n1, const void *w2, const uint16_t *s2,
                         const uint16_t *m2, int64_t n2, float *y, int float_x, int threads) {
    const int64_t blocks = kp / BLOCK, groups = blocks / per_scale;
    int8_t *xq = (int8_t *)malloc((size_t)(rows * kp));
    float *dx = (float *)malloc(sizeof(float) * (size_t)(rows * blocks));
    int32_t *xsum = (int32_t *)malloc(sizeof(int32_t) * (size_t)(rows * blocks));
    float *xf = float_x ? (float *)calloc((size_t)(rows * kp), sizeof(float)) : 0;
    float *xs = float_x ? (float *)malloc(sizeof(float) * (size_t)(rows * groups)) : 0;
    if (float_x) /* int8 weights times unrounded activations, padded to kp with zeros */
        for (int64_t r = 0; r < rows; r++) {
            memcpy(xf + r * kp, x + r * k, sizeof(float) * k);
            for (int64_t g = 0; g < groups; g++) { /* the sum the mins multiply */
                float sum = 0.0f;
                for (int64_t c = g * per_scale * BLOCK; c < (g + 1) * per_scale * BLOCK; c++)
                    sum += xf[r * kp + c];
                xs[r * groups + g] = sum;
            }
        }
    else
        fmforge_quantize_rows(x, rows, k, kp, xq, dx, xsum);
    const void *w[3] = {w0, w1, w2};
    const uint16_t *s[3] = {s0, s1, s2}, *mins[3] = {m0, m1, m2};
    const int64_t n[3] = {n0, count > 1 ? n1 : 0, count > 2 ? n2 : 0};
    const int64_t quads[3] = {(n[0] + 3) / 4, (n[1] + 3) / 4, (n[2] + 3) / 4};
    const int64_t total = quads[0] + quads[1] + quads[2], y_stride = n[0] + n[1] + n[2];
    const int64_t row_bytes = bits == 8 ? kp : kp / 2;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t q = 0; q < total; q++) {
        int m = 0;
        int64_t local = q, offset = 0;
        while (local >= quads[m]) {
            local -= quads[m];
            offset += n[m];
            m++;
        }
        const int64_t j0 = local * 4, count4 = n[m] - j0 < 4 ? n[m] - j0 : 4;
        const uint8_t *wm = (const uint8_t *)w[m] + j0 * row_bytes;
        const uint16_t *sm = s[m] + j0 * groups, *mm = mins[m] + j0 * groups;
        for (int64_t r = 0; r < rows; r++) {
            const int8_t *xr = xq + r * kp;
            const float *dr = dx + r * blocks;
            const int32_t *sr = xsum + r * blocks;
            float *yr = y + r * y_stride + offset + j0;
            if (float_x) {
#ifdef FMFORGE_AVX2
                if (count4 == 4) {
                    dot4_q8_float(xf + r * kp, xs + r * groups, wm, sm, mm, kp, groups, per_scale,
                                  yr);
                    continue;
                }
#endif
                for (int64_t c = 0; c < count4; c++)
                    yr[c] = dot_row_q8_float(xf + r * kp, xs + r * groups, wm + c * row_bytes,
                                             sm + c * groups, mm + c * groups, groups, per_scale);
                continue;
            }
#ifdef FMFORGE_AVX2
            if (count4 == 4) {
                if (bits == 8 && per_scale == 1)
                    dot4_q8(xr, dr, sr, wm, sm, mm, kp, blocks, yr);
                else if (bits == 8)
                    dot4_q8_rows(xr, dr, sr, wm, sm, mm, kp, blocks, yr);
                else
                    dot4_q4(xr, dr, sr, wm, sm, mm, kp, blocks, yr);
                continue;
            }
#endif
            for (int64_t c = 0; c < count4; c++) {
                if (bits == 8)
                    yr[c] = dot_row_q8(xr, dr, sr, wm + c * row_bytes, sm + c * groups,
                                       mm + c * groups, groups, per_scale);
                else
                    yr[c] = dot_row_q4(xr, dr, sr, wm + c * row_bytes, sm + c * groups,
                                       mm + c * groups, blocks);
            }
        }
    }
    free(xq);
    free(dx);
    free(xsum);
    free(xf);
    free(xs);
}
