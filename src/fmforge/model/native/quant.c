/* fmforge's CPU kernels for weight-only quantised linears (int8 and int4), any number of rows.
 *
 * Built at first use by fmforge/model/native/quant.py with the system C compiler and -fopenmp
 * (inside a torch process the OpenMP runtime is torch's own, so these threads and torch's are one
 * pool). Layouts (model/quantize.py writes them; docs/quantize.md documents them):
 *   activations: each row of x (rows, k) is quantised to int8 in blocks of 32 (xq, rows x kp,
 *     kp = k rounded up to 32, tail zero) with one fp32 scale per block (dx) and, for int4, the
 *     block's sum of quantised values (xsum); llama.cpp quantises activations the same way.
 *   int8 weights: w (n, kp) int8 in [-127, 127]; scales (n, groups) fp16, one per
 *     `blocks_per_scale` blocks of 32 (1 for groups of 32, kp / 32 for one scale per row).
 *   int4 weights: w (n, kp / 2) uint8; block b of a row is bytes 16b .. 16b + 15, byte i holding
 *     element 32b + i in its low nibble and element 32b + 16 + i in its high nibble, each stored
 *     as q + 8 for q in [-8, 7] (llama.cpp's Q4_0 block); scales (n, kp / 32) fp16.
 * The weights stay quantised in memory: each block is widened in registers, multiplied as
 * integers with the activation block (maddubs on AVX2, vpdpbusd with AVX512-VNNI) and scaled
 * once per block, so a product reads 1 (int8) or 0.5 (int4) bytes per weight plus the scales.
 * Threads split the output rows in groups of 4 rows that share each activation block load; every
 * row of x is done while the 4 weight rows are in cache, so B rows cost one pass over the weights.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
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

/* Eight int32 partial sums of u (32 unsigned bytes) times s (32 signed bytes). */
static inline __m256i dot_u8_s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

static inline __m256i unpack_q4(const uint8_t *p) {
    const __m128i raw = _mm_loadu_si128((const __m128i *)p);
    const __m128i low = _mm_set1_epi8(0x0f);
    const __m128i lo = _mm_and_si128(raw, low);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
    return _mm256_set_m128i(hi, lo); /* elements 0..15, then 16..31 */
}
#endif

/* One output row j for one activation row: the portable reference of the two kernels below. */
static float dot_row_q8(const int8_t *xr, const float *dr, const int8_t *wj, const uint16_t *sj,
                        int64_t groups, int64_t per_scale) {
    float acc = 0.0f;
    for (int64_t g = 0; g < groups; g++) {
        const float ws = half_to_float(sj[g]);
        for (int64_t b = g * per_scale; b < (g + 1) * per_scale; b++) {
            int32_t dot = 0;
            for (int i = 0; i < BLOCK; i++) dot += (int32_t)wj[b * BLOCK + i] * xr[b * BLOCK + i];
            acc += (float)dot * (dr[b] * ws);
        }
    }
    return acc;
}

static float dot_row_q4(const int8_t *xr, const float *dr, const int32_t *sr, const uint8_t *wj,
                        const uint16_t *sj, int64_t blocks) {
    float acc = 0.0f, offset = 0.0f;
    for (int64_t b = 0; b < blocks; b++) {
        const float d = dr[b] * half_to_float(sj[b]);
        const uint8_t *p = wj + b * (BLOCK / 2);
        const int8_t *xb = xr + b * BLOCK;
        int32_t dot = 0;
        for (int i = 0; i < BLOCK / 2; i++)
            dot += (p[i] & 0x0f) * xb[i] + (p[i] >> 4) * xb[i + BLOCK / 2];
        acc += (float)dot * d;
        offset += d * (float)sr[b];
    }
    return acc - 8.0f * offset; /* the stored nibbles are q + 8 */
}

#ifdef FMFORGE_AVX2
/* Four output rows at once for one activation row: each activation block is loaded once and the
 * four rows' products form four independent accumulation chains. */
static void dot4_q8(const int8_t *xr, const float *dr, const int32_t *sr, const int8_t *w,
                    const uint16_t *s, int64_t kp, int64_t groups, int64_t per_scale, float *out) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                     _mm256_setzero_ps()};
    float offset[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const __m256i bias = _mm256_set1_epi8((char)0x80);
    for (int64_t g = 0; g < groups; g++) {
        float ws[4];
        for (int c = 0; c < 4; c++) ws[c] = half_to_float(s[c * groups + g]);
        for (int64_t b = g * per_scale; b < (g + 1) * per_scale; b++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xr + b * BLOCK));
            for (int c = 0; c < 4; c++) {
                /* w + 128 as unsigned bytes (one xor), then take 128 * sum(x) back out */
                const __m256i wv = _mm256_xor_si256(
                    _mm256_loadu_si256((const __m256i *)(w + c * kp + b * BLOCK)), bias);
                const float d = dr[b] * ws[c];
                acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8_s8(wv, xv)),
                                         _mm256_set1_ps(d), acc[c]);
                offset[c] += d * (float)sr[b];
            }
        }
    }
    for (int c = 0; c < 4; c++) out[c] = hsum(acc[c]) - 128.0f * offset[c];
}

static void dot4_q4(const int8_t *xr, const float *dr, const int32_t *sr, const uint8_t *w,
                    const uint16_t *s, int64_t kp, int64_t blocks, float *out) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                     _mm256_setzero_ps()};
    __m128 offset = _mm_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        const __m256i xv = _mm256_loadu_si256((const __m256i *)(xr + b * BLOCK));
        const __m128 ws = _mm_set_ps(half_to_float(s[3 * blocks + b]),
                                     half_to_float(s[2 * blocks + b]),
                                     half_to_float(s[blocks + b]), half_to_float(s[b]));
        const __m128 d = _mm_mul_ps(ws, _mm_set1_ps(dr[b]));
        offset = _mm_fmadd_ps(d, _mm_set1_ps((float)sr[b]), offset);
        float dc[4];
        _mm_storeu_ps(dc, d);
        for (int c = 0; c < 4; c++) {
            const __m256i wv = unpack_q4(w + c * (kp / 2) + b * (BLOCK / 2));
            acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8_s8(wv, xv)),
                                     _mm256_set1_ps(dc[c]), acc[c]);
        }
    }
    float off[4];
    _mm_storeu_ps(off, offset);
    for (int c = 0; c < 4; c++) out[c] = hsum(acc[c]) - 8.0f * off[c];
}
#endif

/* y[r, j] = sum_c x[r, c] * W[j, c] for int8 W; y rows y_stride apart. */
void fmforge_gemm_q8(const int8_t *xq, const float *dx, const int32_t *xsum, const int8_t *w,
                     const uint16_t *scales, int64_t rows, int64_t kp, int64_t n, int64_t per_scale, float *y,
                     int64_t y_stride, int threads) {
    const int64_t blocks = kp / BLOCK, groups = blocks / per_scale, quads = (n + 3) / 4;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t q = 0; q < quads; q++) {
        const int64_t j0 = q * 4, count = n - j0 < 4 ? n - j0 : 4;
        for (int64_t r = 0; r < rows; r++) {
            const int8_t *xr = xq + r * kp;
            const float *dr = dx + r * blocks;
            const int32_t *sr = xsum + r * blocks;
            float *yr = y + r * y_stride + j0;
#ifdef FMFORGE_AVX2
            if (count == 4) {
                dot4_q8(xr, dr, sr, w + j0 * kp, scales + j0 * groups, kp, groups, per_scale, yr);
                continue;
            }
#endif
            for (int64_t c = 0; c < count; c++)
                yr[c] = dot_row_q8(xr, dr, w + (j0 + c) * kp, scales + (j0 + c) * groups, groups,
                                   per_scale);
        }
    }
}

/* y[r, j] = sum_c x[r, c] * W[j, c] for int4 W (Q4_0 blocks); y rows y_stride apart. */
void fmforge_gemm_q4(const int8_t *xq, const float *dx, const int32_t *xsum, const uint8_t *w,
                     const uint16_t *scales, int64_t rows, int64_t kp, int64_t n, float *y,
                     int64_t y_stride, int threads) {
    const int64_t blocks = kp / BLOCK, quads = (n + 3) / 4;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t q = 0; q < quads; q++) {
        const int64_t j0 = q * 4, count = n - j0 < 4 ? n - j0 : 4;
        for (int64_t r = 0; r < rows; r++) {
            const int8_t *xr = xq + r * kp;
            const float *dr = dx + r * blocks;
            const int32_t *sr = xsum + r * blocks;
            float *yr = y + r * y_stride + j0;
#ifdef FMFORGE_AVX2
            if (count == 4) {
                dot4_q4(xr, dr, sr, w + j0 * (kp / 2), scales + j0 * blocks, kp, blocks, yr);
                continue;
            }
#endif
            for (int64_t c = 0; c < count; c++)
                yr[c] = dot_row_q4(xr, dr, sr, w + (j0 + c) * (kp / 2), scales + (j0 + c) * blocks,
                                   blocks);
        }
    }
}
