/* The elementwise ops of a decoder layer on the CPU, float32, one pass over the data each:
 * RMSNorm, residual add + RMSNorm, neox rope in place, SiLU-and-mul. Each replaces 3 to 10 torch
 * ops (and their temporaries) of the reference in `models/fused.py`; at decode sizes those cost
 * more in dispatch than in arithmetic. Rows are split over torch's OpenMP threads only when there
 * are enough of them to pay for waking the threads (prefill); decode batches stay on the caller.
 * The statistics are float32 as in the reference; sums are reassociated (-ffast-math), so results
 * differ from torch's in the last bits.
 */
#include <math.h>
#include <stdint.h>

#define PARALLEL_MIN_ELEMENTS 65536

static inline float inv_rms(const float *x, int64_t dim, float eps)
{
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t d = 0; d < dim; ++d) ss += x[d] * x[d];
    return 1.f / sqrtf(ss / (float)dim + eps);
}

/* out[t, h] = x[t, h] * rsqrt(mean(x[t, h]^2) + eps) * w over [T, H, D] (strided rows and heads,
 * unit stride in D); out may be x (each row is read whole before it is written). */
void rms_norm_f32(const float *x, int64_t tokens, int64_t heads, int64_t x_st, int64_t x_sh,
                  float *out, int64_t o_st, int64_t o_sh, int64_t dim, const float *w, float eps)
{
#pragma omp parallel for schedule(static) if (tokens * heads * dim >= PARALLEL_MIN_ELEMENTS)
    for (int64_t th = 0; th < tokens * heads; ++th) {
        const int64_t t = th / heads, h = th % heads;
        const float *xr = x + t * x_st + h * x_sh;
        float *orow = out + t * o_st + h * o_sh;
        const float r = inv_rms(xr, dim, eps);
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) orow[d] = xr[d] * r * w[d];
    }
}

/* residual += x; x = rms_norm(residual) * w, row by row ([T, D], unit stride in D). */
void add_rms_norm_f32(float *x, int64_t x_st, float *residual, int64_t r_st, int64_t tokens,
                      int64_t dim, const float *w, float eps)
{
#pragma omp parallel for schedule(static) if (tokens * dim >= PARALLEL_MIN_ELEMENTS)
    for (int64_t t = 0; t < tokens; ++t) {
        float *xr = x + t * x_st, *rr = residual + t * r_st;
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) rr[d] += xr[d];
        const float r = inv_rms(rr, dim, eps);
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) xr[d] = rr[d] * r * w[d];
    }
}

static inline void rotate_neox(float *x, const float *cos_half, const float *sin_half, int64_t half)
{
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
        const float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * cos_half[i] - x2 * sin_half[i];
        x[i + half] = x2 * cos_half[i] + x1 * sin_half[i];
    }
}

/* Neox rope in place on q [T, Hq, D] and k [T, Hkv, D] (strided rows and heads), with
 * cos_sin[positions[t]] = [cos(p * inv_freq) | sin(p * inv_freq)], D / 2 each. */
void rope_neox_f32(float *q, int64_t q_st, int64_t q_sh, int64_t q_heads,
                   float *k, int64_t k_st, int64_t k_sh, int64_t k_heads,
                   const int64_t *positions, int64_t tokens, const float *cos_sin, int64_t dim)
{
    const int64_t half = dim / 2;
#pragma omp parallel for schedule(static) if (tokens * (q_heads + k_heads) * dim >= PARALLEL_MIN_ELEMENTS)
    for (int64_t t = 0; t < tokens; ++t) {
        const float *c = cos_sin + positions[t] * dim, *s = c + half;
        for (int64_t h = 0; h < q_heads; ++h) rotate_neox(q + t * q_st + h * q_sh, c, s, half);
        for (int64_t h = 0; h < k_heads; ++h) rotate_neox(k + t * k_st + h * k_sh, c, s, half);
    }
}

/* out[t] = silu(x[t, :d]) * x[t, d:] for x [T, 2d] (row stride x_st), out [T, d] contiguous. */
void silu_and_mul_f32(const float *x, int64_t x_st, int64_t tokens, int64_t d, float *out)
{
#pragma omp parallel for schedule(static) if (tokens * d >= PARALLEL_MIN_ELEMENTS)
    for (int64_t t = 0; t < tokens; ++t) {
        const float *g = x + t * x_st, *u = g + d;
        float *o = out + t * d;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) /* clamped: -ffast-math assumes no infinities (silu(-80) ~ -1e-33) */
            o[i] = g[i] / (1.f + expf(fminf(-g[i], 80.f))) * u[i];
    }
}

/* One head row of the attention prologue: optional RMSNorm (w != NULL), then neox rope, src -> dst. */
static inline void prologue_row(const float *src, float *dst, const float *w, float eps,
                                const float *c, const float *s, int64_t dim)
{
    const int64_t half = dim / 2;
    const float r = w != 0 ? inv_rms(src, dim, eps) : 1.f;
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
        const float x1 = w != 0 ? src[i] * r * w[i] : src[i];
        const float x2 = w != 0 ? src[i + half] * r * w[i + half] : src[i + half];
        dst[i] = x1 * c[i] - x2 * s[i];
        dst[i + half] = x2 * c[i] + x1 * s[i];
    }
}

/* The attention prologue of a layer in one call: q [T, Hq, D] -> q_out (contiguous), normed with
 * q_w (when not NULL) and rotated; k [T, Hkv, D] normed with k_w and rotated, and v, written to
 * k_pool / v_pool [slots, Hkv, D] at slots[t]. Heads of a token sit side by side (stride D). */
void attention_prologue_f32(const float *q, int64_t q_st, int64_t q_heads,
                            const float *k, int64_t k_st, const float *v, int64_t v_st, int64_t kv_heads,
                            int64_t tokens, int64_t dim, const float *q_w, const float *k_w, float eps,
                            const int64_t *positions, const float *cos_sin,
                            float *q_out, float *k_pool, float *v_pool, const int64_t *slots)
{
    const int64_t half = dim / 2;
#pragma omp parallel for schedule(static) if (tokens * (q_heads + kv_heads) * dim >= PARALLEL_MIN_ELEMENTS)
    for (int64_t t = 0; t < tokens; ++t) {
        const float *c = cos_sin + positions[t] * dim, *s = c + half;
        for (int64_t h = 0; h < q_heads; ++h)
            prologue_row(q + t * q_st + h * dim, q_out + (t * q_heads + h) * dim, q_w, eps, c, s, dim);
        float *kd = k_pool + slots[t] * kv_heads * dim, *vd = v_pool + slots[t] * kv_heads * dim;
        for (int64_t h = 0; h < kv_heads; ++h)
            prologue_row(k + t * k_st + h * dim, kd + h * dim, k_w, eps, c, s, dim);
        const float *vs = v + t * v_st;
#pragma omp simd
        for (int64_t i = 0; i < kv_heads * dim; ++i) vd[i] = vs[i];
    }
}
