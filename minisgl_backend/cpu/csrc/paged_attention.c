/* Attention straight from the paged KV pool, on the CPU, float32, for decode rows and short
 * extends alike.
 *
 * Batch row b (page-table row rows[b], seq_lens[b] positions after this step) brings extend_lens[b]
 * new query tokens, flat tokens q_starts[b] ... q_starts[b] + extend_lens[b] - 1 of q and out. Its
 * i-th one, at position p = seq_lens[b] - extend_lens[b] + i, attends causally: for query head h
 *   out[t, h] = softmax_j(scale * q[t, h] . K[slot(b, j), h / group]) @ V[slot(b, j), h / group]
 * over j <= p, where slot(b, j) = table[rows[b] * table_width + j]. A decode row is extend 1.
 *
 * Each key and value row is read where it lies (no gather into a padded copy); the softmax is
 * two-pass (scores, then max / exp / weighted sum) in float32. Built with -ffast-math so that the
 * exp loop vectorizes (glibc's libmvec); nothing here relies on infinities.
 *
 * Memory decides the speed here: between two steps the other layers' K/V pass through the cache,
 * so a row's keys come from L3 or DRAM. One work item is one query token with all its heads, so each
 * slot's K (and V) row, every KV head at once, is read once and whole; and the rows PREFETCH_SLOTS
 * ahead are prefetched, because a page of 16 slots is often exactly one 4 KiB OS page, where the
 * hardware prefetcher stops. (Items of one (row, KV head) each, reading half of every slot row,
 * took 140-200 us a layer in the engine against 100-120 us for this, at 48 rows of ~100 positions.)
 * Query tokens go to torch's OpenMP threads (loaded after torch, the library uses torch's own
 * libgomp), dynamically: their lengths differ. The queries of one extend read the same keys, which
 * the first of them brought into the cache.
 *
 * Built for a CPU with AVX-512 and a head_dim that is a multiple of 16, the scores of 16 slots
 * are summed in one transpose-and-add tree instead of one horizontal sum each, and each head's
 * output stays in registers (one row of 80 positions, 4 heads, single thread: 1.5-2.5x at
 * head_dim 16, 1.5x at 32, 1.1-1.2x at 64 and 128, where memory is the limit).
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define PREFETCH_SLOTS 16

static inline void prefetch_floats(const float *p, int64_t n)
{
    for (int64_t off = 0; off < n; off += 16) __builtin_prefetch(p + off); /* one 64-byte line */
}

#if defined(__AVX512F__)
#include <immintrin.h>
#define HAVE_AVX512 1 /* -march=native on a CPU with AVX-512: the paths below for head_dim % 16 == 0 */

/* The 16 horizontal sums of v[0..15], in order, in one vector: a transpose-and-add tree
 * (45 shuffles and adds for 16 sums, against ~8 instructions for each sum on its own). */
static inline __m512 sum16(__m512 v[16])
{
    __m512 w[8], x[4], y[2];
    for (int k = 0; k < 8; ++k) /* per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] */
        w[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
    for (int k = 0; k < 4; ++k) { /* per 128-bit lane: the partial sums of 4 vectors, in order */
        const __m512d a = _mm512_castps_pd(w[2 * k]), b = _mm512_castps_pd(w[2 * k + 1]);
        x[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    for (int k = 0; k < 2; ++k) /* 128-bit lanes 0+1 and 2+3 of x[2k], then of x[2k+1] */
        y[k] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * k], x[2 * k + 1], 0x88), _mm512_shuffle_f32x4(x[2 * k], x[2 * k + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], 0x88), _mm512_shuffle_f32x4(y[0], y[1], 0xDD));
}

/* row_scores for head_dim a multiple of 16: sixteen slots at a time, their products summed by sum16 */
static int64_t row_scores_avx512(const float *qb, int64_t q_stride_h, const float *k_pool, const int32_t *slots,
                                 int64_t len, int64_t num_q_heads, int64_t group, int64_t head_dim,
                                 int64_t kv_row, float scale, float *scores)
{
    const __m512 vscale = _mm512_set1_ps(scale);
    int64_t j = 0;
    for (; j + 16 <= len; j += 16) {
        const float *k[16];
        for (int u = 0; u < 16; ++u) {
            k[u] = k_pool + (int64_t)slots[j + u] * kv_row;
            if (j + u + PREFETCH_SLOTS < len) prefetch_floats(k_pool + (int64_t)slots[j + u + PREFETCH_SLOTS] * kv_row, kv_row);
        }
        for (int64_t h = 0; h < num_q_heads; ++h) {
            const float *qv = qb + h * q_stride_h;
            const int64_t o = (h / group) * head_dim;
            __m512 acc[16];
            const __m512 q0 = _mm512_loadu_ps(qv);
            for (int u = 0; u < 16; ++u) acc[u] = _mm512_mul_ps(q0, _mm512_loadu_ps(k[u] + o));
            for (int64_t d = 16; d < head_dim; d += 16) {
                const __m512 qd = _mm512_loadu_ps(qv + d);
                for (int u = 0; u < 16; ++u) acc[u] = _mm512_fmadd_ps(qd, _mm512_loadu_ps(k[u] + o + d), acc[u]);
            }
            _mm512_storeu_ps(scores + h * len + j, _mm512_mul_ps(sum16(acc), vscale));
        }
    }
    return j; /* the slots before j are done */
}

/* row_values for head_dim a multiple of 16 (at most 256): each head's output in registers */
static void row_values_avx512(const float *p, const float *v_pool, const int32_t *slots, int64_t len,
                              int64_t num_q_heads, int64_t group, int64_t head_dim, int64_t kv_row, float *o)
{
    const int64_t chunks = head_dim / 16;
    for (int64_t h = 0; h < num_q_heads; ++h) {
        const float *ph = p + h * len;
        const int64_t off = (h / group) * head_dim;
        for (int64_t c0 = 0; c0 < chunks; c0 += 4) { /* four 16-wide chunks (64 dims) per pass */
            const int64_t n = chunks - c0 < 4 ? chunks - c0 : 4;
            __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            for (int64_t j = 0; j < len; ++j) {
                if (h == 0 && c0 == 0 && j + PREFETCH_SLOTS < len)
                    prefetch_floats(v_pool + (int64_t)slots[j + PREFETCH_SLOTS] * kv_row, kv_row);
                const float *vv = v_pool + (int64_t)slots[j] * kv_row + off + c0 * 16;
                const __m512 w = _mm512_set1_ps(ph[j]);
                for (int64_t c = 0; c < n; ++c) acc[c] = _mm512_fmadd_ps(w, _mm512_loadu_ps(vv + c * 16), acc[c]);
            }
            for (int64_t c = 0; c < n; ++c) _mm512_storeu_ps(o + h * head_dim + (c0 + c) * 16, acc[c]);
        }
    }
}
#endif

/* scores[h * len + j] = scale * q[h] . K[slot j, kv head of h]; four slots at a time, so that four
 * independent sums hide each other's latency */
static void row_scores(const float *qb, int64_t q_stride_h, const float *k_pool, const int32_t *slots,
                       int64_t len, int64_t num_q_heads, int64_t group, int64_t head_dim, int64_t kv_row,
                       float scale, float *scores)
{
    int64_t j = 0;
#ifdef HAVE_AVX512
    if (head_dim % 16 == 0)
        j = row_scores_avx512(qb, q_stride_h, k_pool, slots, len, num_q_heads, group, head_dim, kv_row, scale, scores);
#endif
    for (; j + 4 <= len; j += 4) {
        for (int64_t u = j + PREFETCH_SLOTS; u < j + PREFETCH_SLOTS + 4 && u < len; ++u)
            prefetch_floats(k_pool + (int64_t)slots[u] * kv_row, kv_row);
        const float *k0 = k_pool + (int64_t)slots[j] * kv_row, *k1 = k_pool + (int64_t)slots[j + 1] * kv_row;
        const float *k2 = k_pool + (int64_t)slots[j + 2] * kv_row, *k3 = k_pool + (int64_t)slots[j + 3] * kv_row;
        for (int64_t h = 0; h < num_q_heads; ++h) {
            const float *qv = qb + h * q_stride_h;
            const int64_t o = (h / group) * head_dim;
            float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
            for (int64_t d = 0; d < head_dim; ++d) {
                s0 += qv[d] * k0[o + d];
                s1 += qv[d] * k1[o + d];
                s2 += qv[d] * k2[o + d];
                s3 += qv[d] * k3[o + d];
            }
            float *sc = scores + h * len + j;
            sc[0] = s0 * scale;
            sc[1] = s1 * scale;
            sc[2] = s2 * scale;
            sc[3] = s3 * scale;
        }
    }
    for (; j < len; ++j) {
        const float *kr = k_pool + (int64_t)slots[j] * kv_row;
        for (int64_t h = 0; h < num_q_heads; ++h) {
            const float *qv = qb + h * q_stride_h, *kv = kr + (h / group) * head_dim;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < head_dim; ++d) s += qv[d] * kv[d];
            scores[h * len + j] = s * scale;
        }
    }
}

static void softmax_in_place(float *sc, int64_t len)
{
    float m = -FLT_MAX, total = 0.f;
    for (int64_t j = 0; j < len; ++j) m = sc[j] > m ? sc[j] : m;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < len; ++j) {
        sc[j] = expf(sc[j] - m);
        total += sc[j];
    }
    const float inv = 1.f / total; /* >= 1: the largest score contributes exp(0) */
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) sc[j] *= inv;
}

/* o[h] = sum_j p[h * len + j] * V[slot j, kv head of h] */
static void row_values(const float *p, const float *v_pool, const int32_t *slots, int64_t len,
                       int64_t num_q_heads, int64_t group, int64_t head_dim, int64_t kv_row, float *o)
{
    for (int64_t i = 0; i < num_q_heads * head_dim; ++i) o[i] = 0.f;
    for (int64_t j = 0; j < len; ++j) {
        if (j + PREFETCH_SLOTS < len) prefetch_floats(v_pool + (int64_t)slots[j + PREFETCH_SLOTS] * kv_row, kv_row);
        const float *vr = v_pool + (int64_t)slots[j] * kv_row;
        for (int64_t h = 0; h < num_q_heads; ++h) {
            const float w = p[h * len + j], *vv = vr + (h / group) * head_dim;
            float *oh = o + h * head_dim;
#pragma omp simd
            for (int64_t d = 0; d < head_dim; ++d) oh[d] += w * vv[d];
        }
    }
}

/* The row of the batch that flat query token t belongs to: the last b with q_starts[b] <= t. */
static int64_t row_of_token(const int64_t *q_starts, int64_t batch, int64_t t)
{
    int64_t lo = 0, hi = batch - 1;
    while (lo < hi) {
        const int64_t mid = (lo + hi + 1) / 2;
        if (q_starts[mid] <= t) lo = mid; else hi = mid - 1;
    }
    return lo;
}

int paged_attention_f32(
    const float *q, int64_t q_stride_t, int64_t q_stride_h,
    const float *k_pool, const float *v_pool,
    const int32_t *table, int64_t table_width,
    const int64_t *rows, const int64_t *seq_lens, const int64_t *q_starts, const int64_t *extend_lens,
    int64_t batch, int64_t tokens, int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
    float scale, float *out)
{
    const int64_t group = num_q_heads / num_kv_heads;
    const int64_t kv_row = num_kv_heads * head_dim;
    int64_t max_len = 1; /* the score buffers' length, from the lengths they will hold */
    for (int64_t b = 0; b < batch; ++b) max_len = seq_lens[b] > max_len ? seq_lens[b] : max_len;
    int failed = 0;
#pragma omp parallel
    {
        float *scores = (float *)malloc(sizeof(float) * (size_t)(num_q_heads * max_len));
        if (scores == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tokens; ++t) {
            if (scores == NULL) continue;
            const int64_t b = row_of_token(q_starts, batch, t);
            /* the query at position seq_lens[b] - extend_lens[b] + i sees the keys up to itself */
            const int64_t len = seq_lens[b] - extend_lens[b] + (t - q_starts[b]) + 1;
            const int32_t *slots = table + rows[b] * table_width;
            row_scores(q + t * q_stride_t, q_stride_h, k_pool, slots, len, num_q_heads, group, head_dim,
                       kv_row, scale, scores);
            for (int64_t h = 0; h < num_q_heads; ++h) softmax_in_place(scores + h * len, len);
#ifdef HAVE_AVX512
            if (head_dim % 16 == 0)
                row_values_avx512(scores, v_pool, slots, len, num_q_heads, group, head_dim, kv_row,
                                  out + t * num_q_heads * head_dim);
            else
#endif
                row_values(scores, v_pool, slots, len, num_q_heads, group, head_dim, kv_row,
                           out + t * num_q_heads * head_dim);
        }
        free(scores);
    }
    return failed;
}

/* The new tokens' K and V rows ([T, Hkv * D] at row strides k_stride / v_stride, e.g. views of
 * the qkv output) into their slots of the pool: one call instead of an indexed write each. */
void store_kv_f32(const float *k, int64_t k_stride, const float *v, int64_t v_stride, int64_t tokens,
                  int64_t kv_row, const int64_t *slots, float *k_pool, float *v_pool)
{
    for (int64_t t = 0; t < tokens; ++t) {
        float *kd = k_pool + slots[t] * kv_row, *vd = v_pool + slots[t] * kv_row;
        const float *ks = k + t * k_stride, *vs = v + t * v_stride;
#pragma omp simd
        for (int64_t i = 0; i < kv_row; ++i) kd[i] = ks[i];
#pragma omp simd
        for (int64_t i = 0; i < kv_row; ++i) vd[i] = vs[i];
    }
}
