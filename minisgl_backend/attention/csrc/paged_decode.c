/* Decode attention straight from the paged KV pool, on the CPU, float32.
 *
 * For batch row b (page-table row rows[b], seq_lens[b] positions) and query head h:
 *   out[b, h] = softmax_j(scale * q[b, h] . K[slot(b, j), h / group]) @ V[slot(b, j), h / group]
 * over j < seq_lens[b], where slot(b, j) = table[rows[b] * table_width + j].
 *
 * Each key and value row is read where it lies (no gather into a padded copy); the softmax is
 * two-pass (scores, then max / exp / weighted sum) in float32. Built with -ffast-math so that the
 * exp loop vectorizes (glibc's libmvec); nothing here relies on infinities. (row, KV head) pairs
 * are split over the OpenMP threads; loaded after torch, the library uses torch's own libgomp
 * (same soname): torch's threads and count.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

int paged_decode_attention_f32(
    const float *q, int64_t q_stride_b, int64_t q_stride_h,
    const float *k_pool, const float *v_pool,
    const int32_t *table, int64_t table_width,
    const int64_t *rows, const int64_t *seq_lens,
    int64_t batch, int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
    float scale, int64_t max_len, float *out)
{
    const int64_t group = num_q_heads / num_kv_heads;
    const int64_t kv_row = num_kv_heads * head_dim;
    int failed = 0;
#pragma omp parallel
    {
        float *scores = (float *)malloc(sizeof(float) * (size_t)(group * (max_len > 0 ? max_len : 1)));
        if (scores == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t bk = 0; bk < batch * num_kv_heads; ++bk) {
            if (scores == NULL) continue;
            const int64_t b = bk / num_kv_heads, kvh = bk % num_kv_heads, len = seq_lens[b];
            const int32_t *slots = table + rows[b] * table_width;
            for (int64_t g = 0; g < group; ++g) {
                const float *qv = q + b * q_stride_b + (kvh * group + g) * q_stride_h;
                float *sc = scores + g * len;
                int64_t j = 0;
                /* four keys at a time: four independent reductions overlap their latencies */
                for (; j + 4 <= len; j += 4) {
                    const float *k0 = k_pool + (int64_t)slots[j] * kv_row + kvh * head_dim;
                    const float *k1 = k_pool + (int64_t)slots[j + 1] * kv_row + kvh * head_dim;
                    const float *k2 = k_pool + (int64_t)slots[j + 2] * kv_row + kvh * head_dim;
                    const float *k3 = k_pool + (int64_t)slots[j + 3] * kv_row + kvh * head_dim;
                    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
                    for (int64_t d = 0; d < head_dim; ++d) {
                        s0 += qv[d] * k0[d];
                        s1 += qv[d] * k1[d];
                        s2 += qv[d] * k2[d];
                        s3 += qv[d] * k3[d];
                    }
                    sc[j] = s0 * scale;
                    sc[j + 1] = s1 * scale;
                    sc[j + 2] = s2 * scale;
                    sc[j + 3] = s3 * scale;
                }
                for (; j < len; ++j) {
                    const float *kv = k_pool + (int64_t)slots[j] * kv_row + kvh * head_dim;
                    float s = 0.f;
#pragma omp simd reduction(+ : s)
                    for (int64_t d = 0; d < head_dim; ++d) s += qv[d] * kv[d];
                    sc[j] = s * scale;
                }
            }
            for (int64_t g = 0; g < group; ++g) {
                float *sc = scores + g * len;
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
            float *o = out + (b * num_q_heads + kvh * group) * head_dim;
            for (int64_t i = 0; i < group * head_dim; ++i) o[i] = 0.f;
            for (int64_t j = 0; j < len; ++j) {
                const float *vv = v_pool + (int64_t)slots[j] * kv_row + kvh * head_dim;
                for (int64_t g = 0; g < group; ++g) {
                    const float p = scores[g * len + j];
                    float *og = o + g * head_dim;
#pragma omp simd
                    for (int64_t d = 0; d < head_dim; ++d) og[d] += p * vv[d];
                }
            }
        }
        free(scores);
    }
    return failed;
}
