/* fmforge's CPU kernels for one-token decode steps (fp32).
 *
 * Built at first use by fmforge/model/native/__init__.py with the system C compiler and
 * -fopenmp; inside a torch process the OpenMP runtime is torch's own (same libgomp.so.1), so
 * these threads and torch's are one pool.
 */
#include <math.h>
#include <stdint.h>

/* Matrix-vector products on nn.Linear weights in place: y[r, j] = sum_i x[r, i] * w[j, i] for
 * j < n, w (n, k) row-major, y rows y_stride apart (so q, k and v can land side by side in one
 * buffer). Threads take groups of 4 weight rows and stream them front to back with vectorised
 * dot products, so the product runs at memory bandwidth on every thread (torch's batch-1 matmul
 * uses one thread on CPU). For rows > 1 each group is re-read per row from the core's cache. */
void fmforge_gemv_rows(const float *x, const float *w, float *y, int64_t rows, int64_t k,
                       int64_t n, int64_t y_stride, int threads) {
    const int64_t groups = (n + 3) / 4;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t g = 0; g < groups; g++) {
        const int64_t j = g * 4;
        const int64_t count = n - j < 4 ? n - j : 4;
        for (int64_t r = 0; r < rows; r++) {
            const float *xr = x + r * k;
            float *yr = y + r * y_stride + j;
            if (count == 4) {
                const float *w0 = w + j * k, *w1 = w0 + k, *w2 = w1 + k, *w3 = w2 + k;
                float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
                #pragma omp simd reduction(+ : s0, s1, s2, s3)
                for (int64_t i = 0; i < k; i++) {
                    s0 += xr[i] * w0[i];
                    s1 += xr[i] * w1[i];
                    s2 += xr[i] * w2[i];
                    s3 += xr[i] * w3[i];
                }
                yr[0] = s0; yr[1] = s1; yr[2] = s2; yr[3] = s3;
            } else {
                for (int64_t c = 0; c < count; c++) {
                    const float *wc = w + (j + c) * k;
                    float s = 0.0f;
                    #pragma omp simd reduction(+ : s)
                    for (int64_t i = 0; i < k; i++) s += xr[i] * wc[i];
                    yr[c] = s;
                }
            }
        }
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
