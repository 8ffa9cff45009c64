/* fmforge's CPU kernels for decode steps (fp32): B rows per step, each weight read once.
 *
 * Built at first use by fmforge/model/native/__init__.py with the system C compiler and
 * -fopenmp; inside a torch process the OpenMP runtime is torch's own (same libgomp.so.1), so
 * these threads and torch's are one pool.
 *
 * A step's rows are independent sequences (or consecutive tokens of one prompt chunk): every
 * kernel computes each row with the same instructions in the same order whatever the other rows
 * are, so a row's results are bitwise equal whether it runs alone or among B rows.
 */
#include <math.h>
#include <stdint.h>

/* One SIMD register of floats: AVX-512, AVX2+FMA, or a plain float elsewhere. Every dot product
 * accumulates in its own register with fused multiply-adds, in index order; the lanes are summed
 * by one fixed function, then the tail (k % LANES) is added with fmaf. */
#if defined(__AVX512F__)
#include <immintrin.h>
typedef __m512 vec;
#define LANES 16
#define ROW_TILE 4
#define VZERO() _mm512_setzero_ps()
#define VLOAD(p) _mm512_loadu_ps(p)
#define VFMA(a, b, acc) _mm512_fmadd_ps(a, b, acc)
static inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
typedef __m256 vec;
#define LANES 8
#define ROW_TILE 2
#define VZERO() _mm256_setzero_ps()
#define VLOAD(p) _mm256_loadu_ps(p)
#define VFMA(a, b, acc) _mm256_fmadd_ps(a, b, acc)
static inline float vsum(vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#else
typedef float vec;
#define LANES 1
#define ROW_TILE 2
#define VZERO() 0.0f
#define VLOAD(p) (*(p))
#define VFMA(a, b, acc) fmaf(a, b, acc)
static inline float vsum(vec v) { return v; }
#endif

/* y[r, j..j+count) = x[r] . w[j + c] for R rows of x and up to 4 weight rows w (c < count):
 * the 4 weight rows are loaded once per step of LANES and used for all R rows. */
#define DEFINE_TILE(R)                                                                          \
    static void tile_##R(const float *x, const float *w, float *y, int64_t k, int64_t count,   \
                         int64_t y_stride) {                                                    \
        const float *w0 = w, *w1 = count > 1 ? w + k : w0;                                      \
        const float *w2 = count > 2 ? w + 2 * k : w0, *w3 = count > 3 ? w + 3 * k : w0;        \
        vec acc[R][4];                                                                          \
        for (int r = 0; r < R; r++)                                                             \
            for (int c = 0; c < 4; c++) acc[r][c] = VZERO();                                    \
        int64_t i = 0;                                                                          \
        for (; i + LANES <= k; i += LANES) {                                                    \
            const vec a = VLOAD(w0 + i), b = VLOAD(w1 + i), c = VLOAD(w2 + i),                  \
                      d = VLOAD(w3 + i);                                                        \
            for (int r = 0; r < R; r++) {                                                       \
                const vec xr = VLOAD(x + r * k + i);                                            \
                acc[r][0] = VFMA(xr, a, acc[r][0]);                                             \
                acc[r][1] = VFMA(xr, b, acc[r][1]);                                             \
                acc[r][2] = VFMA(xr, c, acc[r][2]);                                             \
                acc[r][3] = VFMA(xr, d, acc[r][3]);                                             \
            }                                                                                   \
        }                                                                                       \
        const float *ws[4] = {w0, w1, w2, w3};                                                  \
        for (int r = 0; r < R; r++) {                                                           \
            const float *xr = x + r * k;                                                        \
            for (int c = 0; c < count; c++) {                                                   \
                float s = vsum(acc[r][c]);                                                      \
                for (int64_t t = i; t < k; t++) s = fmaf(xr[t], ws[c][t], s);                   \
                y[r * y_stride + c] = s;                                                        \
            }                                                                                   \
        }                                                                                       \
    }

DEFINE_TILE(1)
DEFINE_TILE(2)
#if ROW_TILE > 2
DEFINE_TILE(3)
DEFINE_TILE(4)
#endif

/* y[r, 0..count) = x[r] . w[0..count) for all rows of x, in tiles of ROW_TILE rows. */
static void rows_times_group(const float *x, const float *wg, float *y, int64_t rows, int64_t k,
                             int64_t count, int64_t y_stride) {
    int64_t r = 0;
    for (; r + ROW_TILE <= rows; r += ROW_TILE) {
#if ROW_TILE > 2
        tile_4(x + r * k, wg, y + r * y_stride, k, count, y_stride);
#else
        tile_2(x + r * k, wg, y + r * y_stride, k, count, y_stride);
#endif
    }
    const float *xr = x + r * k;
    float *yr = y + r * y_stride;
    switch (rows - r) {
        case 1: tile_1(xr, wg, yr, k, count, y_stride); break;
#if ROW_TILE > 2
        case 2: tile_2(xr, wg, yr, k, count, y_stride); break;
        case 3: tile_3(xr, wg, yr, k, count, y_stride); break;
#endif
        default: break;
    }
}

/* A small-batch GEMM on nn.Linear weights in place: y[r, j] = sum_i x[r, i] * w[j, i] for
 * r < rows, j < n; x (rows, k) and w (n, k) row-major, y rows y_stride apart. Threads split the
 * weight rows in groups of 4; each group is streamed from memory once and applied to every row of
 * x in tiles of ROW_TILE rows (re-read from the core's cache), so a step of B rows costs one read
 * of the weights, not B. */
void fmforge_gemm_rows(const float *x, const float *w, float *y, int64_t rows, int64_t k,
                       int64_t n, int64_t y_stride, int threads) {
    const int64_t groups = (n + 3) / 4;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t g = 0; g < groups; g++) {
        const int64_t j = g * 4;
        rows_times_group(x, w + j * k, y + j, rows, k, n - j < 4 ? n - j : 4, y_stride);
    }
}

/* fmforge_gemm_rows for `count` matrices sharing the input x (q, k and v; gate and up): their
 * outputs land side by side in y, in one parallel region (one thread barrier, not `count`). */
void fmforge_gemm_group(const float *x, const float *const *ws, const int64_t *ns, int64_t count,
                        float *y, int64_t rows, int64_t k, int64_t y_stride, int threads) {
    int64_t first[count + 1], column[count + 1];  // first 4-row group and output column of each
    first[0] = column[0] = 0;
    for (int64_t m = 0; m < count; m++) {
        first[m + 1] = first[m] + (ns[m] + 3) / 4;
        column[m + 1] = column[m] + ns[m];
    }
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t g = 0; g < first[count]; g++) {
        int64_t m = 0;
        while (g >= first[m + 1]) m++;
        const int64_t j = (g - first[m]) * 4, n = ns[m];
        rows_times_group(x, ws[m] + j * k, y + column[m] + j, rows, k, n - j < 4 ? n - j : 4,
                         y_stride);
    }
}

/* x (rows, c) += delta (when not NULL), then y = weight * (x * rsqrt(mean(x^2) + eps)), the
 * order of operations of HF's LlamaRMSNorm. */
void fmforge_add_rmsnorm(float *x, const float *delta, const float *weight, float eps, float *y,
                         int64_t rows, int64_t c) {
    for (int64_t r = 0; r < rows; r++) {
        float *xr = x + r * c;
        float *yr = y + r * c;
        if (delta) {
            const float *dr = delta + r * c;
            for (int64_t j = 0; j < c; j++) xr[j] += dr[j];
        }
        float sum = 0.0f;
        for (int64_t j = 0; j < c; j++) sum += xr[j] * xr[j];
        const float scale = 1.0f / sqrtf(sum / (float)c + eps);
        for (int64_t j = 0; j < c; j++) yr[j] = weight[j] * (xr[j] * scale);
    }
}

/* gate_up (rows, 2f) holds gate then up; out (rows, f) = silu(gate) * up. */
void fmforge_silu_mul(const float *gate_up, float *out, int64_t rows, int64_t f) {
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gate_up + r * 2 * f;
        const float *u = g + f;
        float *o = out + r * f;
        for (int64_t j = 0; j < f; j++) o[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
    }
}

/* One step of attention for one layer, for each of `rows` query rows:
 *   qkv (rows, h + 2 * kv, d): the fused projection; q and k heads are rotated in place (RoPE,
 *     rotate-half layout) by cos/sin rows (rows or 1 of them: cs_stride is d or 0);
 *   row r reads and writes cache row cache_rows[r] (r when NULL) of the layer's cache
 *     (B_cache, kv, max_len, d): its k and v heads are written at position positions[r] (`slot`
 *     when NULL), then out[r] (h * d) = softmax(q k^T / sqrt(d)) v over positions 0..positions[r].
 * All writes happen before any read, so the consecutive tokens of a prompt chunk (rows sharing
 * a cache row) see each other causally. Query head i reads key/value head i / (h / kv). */
static int64_t attended_rows;

void fmforge_attend_rows(float *qkv, const float *cos, const float *sin, int64_t cs_stride,
                         float *k_cache, float *v_cache, const int64_t *cache_rows,
                         const int64_t *positions, float *out, int64_t rows, int64_t h,
                         int64_t kv, int64_t d, int64_t max_len, int64_t slot, int threads) {
    const int64_t heads = h + 2 * kv, half = d / 2;
    __atomic_fetch_add(&attended_rows, rows, __ATOMIC_RELAXED);
    const float scale = 1.0f / sqrtf((float)d);
    for (int64_t r = 0; r < rows; r++) {
        const float *cr = cos + r * cs_stride, *sr = sin + r * cs_stride;
        const int64_t row = cache_rows ? cache_rows[r] : r;
        const int64_t pos = positions ? positions[r] : slot;
        for (int64_t head = 0; head < h + kv; head++) {
            float *x = qkv + (r * heads + head) * d;
            float rotated[d];
            for (int64_t j = 0; j < half; j++) {
                rotated[j] = x[j] * cr[j] - x[j + half] * sr[j];
                rotated[j + half] = x[j + half] * cr[j + half] + x[j] * sr[j + half];
            }
            for (int64_t j = 0; j < d; j++) x[j] = rotated[j];
        }
        for (int64_t g = 0; g < kv; g++) {
            const float *k = qkv + (r * heads + h + g) * d;
            const float *v = qkv + (r * heads + h + kv + g) * d;
            float *kc = k_cache + ((row * kv + g) * max_len + pos) * d;
            float *vc = v_cache + ((row * kv + g) * max_len + pos) * d;
            for (int64_t j = 0; j < d; j++) {
                kc[j] = k[j];
                vc[j] = v[j];
            }
        }
    }
    _Pragma("omp parallel for schedule(dynamic, 4) num_threads(threads)")
    for (int64_t task = 0; task < rows * h; task++) {
        const int64_t r = task / h, head = task % h, g = head / (h / kv);
        const int64_t row = cache_rows ? cache_rows[r] : r;
        const int64_t length = (positions ? positions[r] : slot) + 1;
        const float *q = qkv + (r * heads + head) * d;
        const float *keys = k_cache + (row * kv + g) * max_len * d;
        const float *values = v_cache + (row * kv + g) * max_len * d;
        float scores[length];
        float best = -INFINITY;
        for (int64_t s = 0; s < length; s++) {
            const float *key = keys + s * d;
            float dot = 0.0f;
            #pragma omp simd reduction(+ : dot)
            for (int64_t j = 0; j < d; j++) dot += q[j] * key[j];
            scores[s] = dot * scale;
            if (scores[s] > best) best = scores[s];
        }
        float total = 0.0f;
        for (int64_t s = 0; s < length; s++) {
            scores[s] = expf(scores[s] - best);
            total += scores[s];
        }
        float acc[d];
        for (int64_t j = 0; j < d; j++) acc[j] = 0.0f;
        for (int64_t s = 0; s < length; s++) {
            const float p = scores[s] / total;
            const float *value = values + s * d;
            #pragma omp simd
            for (int64_t j = 0; j < d; j++) acc[j] += p * value[j];
        }
        float *o = out + r * h * d + head * d;
        for (int64_t j = 0; j < d; j++) o[j] = acc[j];
    }
}

/* Rows run through fmforge_attend_rows since the library was loaded (all layers): tests read it
 * to show that the library and the server decode through these kernels. */
int64_t fmforge_attended_rows(void) { return __atomic_load_n(&attended_rows, __ATOMIC_RELAXED); }
