/* fmforge's CPU kernels for one-token decode steps (fp32).
 *
 * Matrix-vector products: y (B, N) = x (B, K) @ W.
 *
 * W is packed as (N / BW, K, BW): column block j holds columns j*BW .. j*BW + BW - 1, row by
 * row, in one contiguous run of memory. A thread takes whole blocks, keeps the BW partial sums
 * of a row in vector registers and streams its blocks front to back, so the product runs at
 * memory bandwidth on every thread (torch's batch-1 matmul uses one thread on CPU).
 * For B > 1 each block is re-read per row from the core's L2 cache (a block is K * BW floats).
 *
 * Built at first use by fmforge/model/native/__init__.py with the system C compiler and
 * -fopenmp; inside a torch process the OpenMP runtime is torch's own (same libgomp.so.1), so
 * these threads and torch's are one pool.
 */
#include <math.h>
#include <stdint.h>

#define DEFINE_GEMV(BW)                                                                       \
    void fmforge_gemv_##BW(const float *x, const float *w, float *y, int64_t rows, int64_t k, \
                           int64_t n, int threads) {                                         \
        const int64_t blocks = n / BW;                                                        \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                    \
        for (int64_t block = 0; block < blocks; block++) {                                    \
            const float *wb = w + block * k * BW;                                             \
            for (int64_t r = 0; r < rows; r++) {                                              \
                const float *xr = x + r * k;                                                  \
                float acc[BW] = {0};                                                          \
                for (int64_t i = 0; i < k; i++) {                                             \
                    const float xi = xr[i];                                                   \
                    const float *wi = wb + i * BW;                                            \
                    for (int j = 0; j < BW; j++) acc[j] += xi * wi[j];                        \
                }                                                                             \
                float *yr = y + r * n + block * BW;                                           \
                for (int j = 0; j < BW; j++) yr[j] = acc[j];                                  \
            }                                                                                 \
        }                                                                                     \
    }

DEFINE_GEMV(8)
DEFINE_GEMV(16)
DEFINE_GEMV(32)
DEFINE_GEMV(64)

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

/* One decode step of attention for one layer, for each of `rows` sequences:
 *   qkv (rows, h + 2 * kv, d): the fused projection; q and k heads are rotated in place (RoPE,
 *     rotate-half layout) by cos/sin rows (rows or 1 of them: cs_stride is d or 0);
 *   the k and v heads are written to the layer's cache (rows, kv, max_len, d) at `slot`;
 *   out (rows, h * d) = softmax(q k^T / sqrt(d)) v over cache positions 0..slot, skipping
 *     positions where mask (rows, mask_stride) is 0 (mask may be NULL).
 * Query head i reads key/value head i / (h / kv) (grouped-query attention). */
void fmforge_attend_one(float *qkv, const float *cos, const float *sin, int64_t cs_stride,
                        float *k_cache, float *v_cache, const uint8_t *mask, int64_t mask_stride,
                        float *out, int64_t rows, int64_t h, int64_t kv, int64_t d,
                        int64_t max_len, int64_t slot, int threads) {
    const int64_t heads = h + 2 * kv, half = d / 2, length = slot + 1;
    const float scale = 1.0f / sqrtf((float)d);
    for (int64_t r = 0; r < rows; r++) {
        const float *cr = cos + r * cs_stride, *sr = sin + r * cs_stride;
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
            float *kc = k_cache + ((r * kv + g) * max_len + slot) * d;
            float *vc = v_cache + ((r * kv + g) * max_len + slot) * d;
            for (int64_t j = 0; j < d; j++) {
                kc[j] = k[j];
                vc[j] = v[j];
            }
        }
    }
    _Pragma("omp parallel for schedule(static) num_threads(threads)")
    for (int64_t task = 0; task < rows * h; task++) {
        const int64_t r = task / h, head = task % h, g = head / (h / kv);
        const float *q = qkv + (r * heads + head) * d;
        const float *keys = k_cache + (r * kv + g) * max_len * d;
        const float *values = v_cache + (r * kv + g) * max_len * d;
        const uint8_t *m = mask ? mask + r * mask_stride : 0;
        float scores[length];
        float best = -INFINITY;
        for (int64_t s = 0; s < length; s++) {
            if (m && !m[s]) {
                scores[s] = -INFINITY;
                continue;
            }
            float dot = 0.0f;
            for (int64_t j = 0; j < d; j++) dot += q[j] * keys[s * d + j];
            scores[s] = dot * scale;
            if (scores[s] > best) best = scores[s];
        }
        float total = 0.0f;
        for (int64_t s = 0; s < length; s++) {
            scores[s] = (scores[s] == -INFINITY) ? 0.0f : expf(scores[s] - best);
            total += scores[s];
        }
        float acc[d];
        for (int64_t j = 0; j < d; j++) acc[j] = 0.0f;
        for (int64_t s = 0; s < length; s++) {
            const float p = scores[s] / total;
            if (p == 0.0f) continue;
            for (int64_t j = 0; j < d; j++) acc[j] += p * values[s * d + j];
        }
        float *o = out + r * h * d + head * d;
        for (int64_t j = 0; j < d; j++) o[j] = acc[j];
    }
}
