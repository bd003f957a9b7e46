/* Variable-length attention on the CPU with bfloat16 dot products (AVX512_BF16), for the int8
 * forward (rerank_kernels/attention_bf16.py loads it with ctypes; the reference is
 * rerank_kernels.attention.varlen_attention_torch).
 *
 * Q, K, V come in as float32 (the QKV GEMM's epilogue) and are rounded to bfloat16 (nearest
 * even) as they are packed; scores, softmax and the output accumulate in float32. One work item
 * is one (sequence, head): its keys and values are packed once into the layouts VDPBF16PS reads
 * (pairs of adjacent elements in one 32-bit lane), then its queries are processed four rows at a
 * time: scores for every key (float32), exact softmax over the row (max, exp, sum), the
 * probabilities rounded to bfloat16, times V. An item is computed alone with the same
 * instructions whatever else is in the batch (batch invariance); items are shared out over
 * torch's OpenMP threads (see int8_rows.c).
 */
#include <stdint.h>
#include <stdlib.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#include <math.h>

#define RK_BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma")))
#ifndef ROWS
#define ROWS 8 /* query rows per tile */
#endif
#define KEYS 16     /* keys per vector */
#ifndef TILE
#define TILE 2 /* vectors per row in a tile: ROWS * TILE accumulators (measured: 8 x 2 ~ 8 x 3 > 6 x 4 > 4 x 4 > 2 x 8) */
#endif

int rk_attention_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512bf16");
}

/* 2 * n floats (n <= 16 pairs) -> lanes i < n holding the bf16 pair (x[2i], x[2i+1]), rounded
 * to nearest even; lanes from n on are 0 */
static inline RK_BF16 __m512i bf16_pairs(const float *x, int64_t n) {
    const __mmask16 lo = n >= 8 ? 0xFFFF : (__mmask16)((1u << (2 * n)) - 1u);
    const __mmask16 hi = n >= 16 ? 0xFFFF : n > 8 ? (__mmask16)((1u << (2 * (n - 8))) - 1u) : 0;
    return (__m512i)_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, x + 16), _mm512_maskz_loadu_ps(lo, x));
}

/* exp(x) for x <= 0: 2^n * p(f), f in [-1/2, 1/2], degree-6 polynomial; 0 below -87 */
static inline RK_BF16 __m512 exp_ps(__m512 x) {
    const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
    const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(1.44269504088896341f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.69314718055994531f)); /* f ln 2 */
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_maskz_scalef_ps((__mmask16)~tiny, p, n);
}

/* scores[r][t * 16 + l] = scale * sum_d q[r] . K[key t * 16 + l] for TILE vectors of keys */
static inline RK_BF16 void score_tile(uint32_t qpair[ROWS][128 + 16], const uint32_t *kp, int64_t keys, int64_t pairs,
                                      float scale, float *scores, int64_t ld) {
    __m512 acc[ROWS][TILE];
    for (int r = 0; r < ROWS; ++r)
        for (int t = 0; t < TILE; ++t) acc[r][t] = _mm512_setzero_ps();
    for (int64_t d = 0; d < pairs; ++d) {
        __m512bh kv[TILE];
        for (int t = 0; t < TILE; ++t) kv[t] = (__m512bh)_mm512_loadu_si512(kp + d * keys + t * KEYS);
        for (int r = 0; r < ROWS; ++r) {
            const __m512bh qv = (__m512bh)_mm512_set1_epi32((int)qpair[r][d]);
            for (int t = 0; t < TILE; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], qv, kv[t]);
        }
    }
    for (int r = 0; r < ROWS; ++r)
        for (int t = 0; t < TILE; ++t)
            _mm512_storeu_ps(scores + r * ld + t * KEYS, _mm512_mul_ps(acc[r][t], _mm512_set1_ps(scale)));
}

static inline RK_BF16 void score_vector(uint32_t qpair[ROWS][128 + 16], const uint32_t *kp, int64_t keys,
                                        int64_t pairs, float scale, float *scores, int64_t ld) {
    __m512 acc[ROWS];
    for (int r = 0; r < ROWS; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t d = 0; d < pairs; ++d) {
        const __m512bh kv = (__m512bh)_mm512_loadu_si512(kp + d * keys);
        for (int r = 0; r < ROWS; ++r)
            acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32((int)qpair[r][d]), kv);
    }
    for (int r = 0; r < ROWS; ++r) _mm512_storeu_ps(scores + r * ld, _mm512_mul_ps(acc[r], _mm512_set1_ps(scale)));
}

/* out[r][t * 16 + l] = inv_sum[r] * sum_j P[r][j] V[j][dim t * 16 + l], for the first ``rows`` rows */
static inline RK_BF16 void pv_tile(const uint32_t *probs, int64_t stride, const uint32_t *vp, int64_t dim,
                                   int64_t key_pairs, const float *inv_sum, int64_t rows, float *out, int64_t ld_out) {
    __m512 acc[ROWS][TILE];
    for (int r = 0; r < ROWS; ++r)
        for (int t = 0; t < TILE; ++t) acc[r][t] = _mm512_setzero_ps();
    for (int64_t j = 0; j < key_pairs; ++j) {
        __m512bh vv[TILE];
        for (int t = 0; t < TILE; ++t) vv[t] = (__m512bh)_mm512_loadu_si512(vp + j * dim + t * 16);
        for (int r = 0; r < ROWS; ++r) {
            const __m512bh pv = (__m512bh)_mm512_set1_epi32((int)probs[r * stride + j]);
            for (int t = 0; t < TILE; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], pv, vv[t]);
        }
    }
    for (int r = 0; r < rows; ++r)
        for (int t = 0; t < TILE; ++t)
            _mm512_storeu_ps(out + r * ld_out + t * 16, _mm512_mul_ps(acc[r][t], _mm512_set1_ps(inv_sum[r])));
}

static inline RK_BF16 void pv_vector(const uint32_t *probs, int64_t stride, const uint32_t *vp, int64_t dim,
                                     int64_t key_pairs, const float *inv_sum, int64_t rows, float *out,
                                     int64_t ld_out) {
    __m512 acc[ROWS];
    for (int r = 0; r < ROWS; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t j = 0; j < key_pairs; ++j) {
        const __m512bh vv = (__m512bh)_mm512_loadu_si512(vp + j * dim);
        for (int r = 0; r < ROWS; ++r)
            acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32((int)probs[r * stride + j]), vv);
    }
    for (int r = 0; r < rows; ++r) _mm512_storeu_ps(out + r * ld_out, _mm512_mul_ps(acc[r], _mm512_set1_ps(inv_sum[r])));
}

/* one (sequence, head): q rows [0, len_q), keys [0, len_k); rows of q/k/v/out are ld floats apart */
static RK_BF16 void attend_item(const float *q, int64_t ld_q, const float *k, const float *v, int64_t ld, int64_t dim,
                                int64_t len_q, int64_t len_k, float scale, float *out, int64_t ld_out,
                                uint32_t *kp, uint32_t *vp, float *scores, uint32_t *probs) {
    const int64_t keys = (len_k + KEYS - 1) / KEYS * KEYS; /* padded to whole vectors */
    const int64_t pairs = dim / 2, key_pairs = (len_k + 1) / 2, dvecs = dim / 16;
    /* K as (dim/2, keys) 32-bit lanes holding (K[j, 2d], K[j, 2d+1]): each key's row rounded to
     * bf16 pairs (16 pairs per vector), scattered to its column; padded keys are 0 */
    const __m512i column = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                              _mm512_set1_epi32((int)keys));
    for (int64_t j = 0; j < keys; ++j)
        for (int64_t d = 0; d < pairs; d += 16) {
            const int64_t n = pairs - d < 16 ? pairs - d : 16;
            const __m512i bf = j < len_k ? bf16_pairs(k + j * ld + 2 * d, n) : _mm512_setzero_si512();
            _mm512_mask_i32scatter_epi32(kp + d * keys + j, n == 16 ? 0xFFFF : (__mmask16)((1u << n) - 1u), column,
                                         bf, 4);
        }
    /* V as (key pairs, dim) lanes holding (V[2j, d], V[2j+1, d]); a missing odd key is 0 */
    for (int64_t j = 0; j < key_pairs; ++j)
        for (int64_t d = 0; d < dim; d += 16) {
            const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(v + 2 * j * ld + d)));
            const __m512i hi = 2 * j + 1 < len_k
                ? _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(v + (2 * j + 1) * ld + d)))
                : _mm512_setzero_si512();
            _mm512_storeu_si512(vp + j * dim + d, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
    for (int64_t i0 = 0; i0 < len_q; i0 += ROWS) {
        const int64_t rows = len_q - i0 < ROWS ? len_q - i0 : ROWS;
        uint32_t qpair[ROWS][128 + 16]; /* dim <= 256, and a whole vector's room */
        for (int64_t r = 0; r < ROWS; ++r)
            for (int64_t d = 0; d < pairs; d += 16)
                _mm512_storeu_si512(qpair[r] + d, bf16_pairs(q + (i0 + (r < rows ? r : 0)) * ld_q + 2 * d,
                                                             pairs - d < 16 ? pairs - d : 16));
        /* scores: ROWS x keys. TILE vectors of 16 keys at a time give ROWS * TILE independent
         * accumulators (four chains would each wait out the dot product's latency); the
         * leftover vectors go one at a time. Separate functions keep each tile in registers. */
        int64_t j = 0;
        for (; j + KEYS * TILE <= keys; j += KEYS * TILE) score_tile(qpair, kp + j, keys, pairs, scale, scores + j, keys);
        for (; j < keys; j += KEYS) score_vector(qpair, kp + j, keys, pairs, scale, scores + j, keys);
        /* softmax per row over the len_k real keys; probabilities to bf16 pairs */
        float inv_sum[ROWS];
        for (int r = 0; r < ROWS; ++r) {
            float *s = scores + r * keys;
            __m512 m = _mm512_set1_ps(-INFINITY);
            for (int64_t j = 0; j < keys; j += KEYS) {
                const __mmask16 valid = len_k - j >= KEYS ? 0xFFFF : (__mmask16)((1u << (len_k - j)) - 1u);
                m = _mm512_mask_max_ps(m, valid, m, _mm512_loadu_ps(s + j));
            }
            const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
            __m512 sum = _mm512_setzero_ps();
            for (int64_t j = 0; j < keys; j += KEYS) {
                const __mmask16 valid = len_k - j >= KEYS ? 0xFFFF : (__mmask16)((1u << (len_k - j)) - 1u);
                const __m512 e = _mm512_maskz_mov_ps(valid, exp_ps(_mm512_sub_ps(_mm512_loadu_ps(s + j), mx)));
                sum = _mm512_add_ps(sum, e);
                _mm512_storeu_ps(s + j, e);
            }
            inv_sum[r] = 1.0f / _mm512_reduce_add_ps(sum);
            /* pairs of probabilities (keys 2j, 2j+1) in one lane, for the P x V dot products */
            for (int64_t j = 0; j < keys; j += 32) {
                const __m512 a = _mm512_loadu_ps(s + j);
                const __m512 b = j + 16 < keys ? _mm512_loadu_ps(s + j + 16) : _mm512_setzero_ps();
                /* cvtne2ps_pbh(b, a): a -> low 16 bf16, b -> high 16; lanes then hold (p[2i], p[2i+1]) */
                _mm512_storeu_si512(probs + r * (keys / 2 + 16) + j / 2, (__m512i)_mm512_cvtne2ps_pbh(b, a));
            }
        }
        /* out = P V / sum: ROWS x dim, TILE vectors of 16 dims at a time, then one at a time */
        const int64_t stride = keys / 2 + 16;
        int64_t dv = 0;
        for (; dv + TILE <= dvecs; dv += TILE)
            pv_tile(probs, stride, vp + dv * 16, dim, key_pairs, inv_sum, rows, out + i0 * ld_out + dv * 16, ld_out);
        for (; dv < dvecs; ++dv)
            pv_vector(probs, stride, vp + dv * 16, dim, key_pairs, inv_sum, rows, out + i0 * ld_out + dv * 16, ld_out);
    }
}

/* Every (sequence, head) of ``sequences`` sequences. q, k, v:
 * (tokens, heads, dim) views with rows ld_q (q) and ld (k, v) floats apart (heads and dim
 * contiguous); out
 * (total_q, heads, dim) with rows ld_out floats apart. dim: a multiple of 16, at most 256.
 * Returns 0, or -1 when a buffer could not be allocated. */
RK_BF16 int rk_attention_bf16(const float *q, int64_t ld_q, const float *k, const float *v, int64_t ld, int64_t heads,
                              int64_t dim, const int32_t *cu_q, const int32_t *cu_k, int64_t sequences,
                              int64_t max_len_k, float scale, float *out, int64_t ld_out) {
    const int64_t keys = (max_len_k + KEYS - 1) / KEYS * KEYS + KEYS;
    int status = 0;
    /* items differ in cost (lengths): handed out one at a time, to whichever thread is free */
#pragma omp parallel
    {
        uint32_t *kp = aligned_alloc(64, (size_t)(dim / 2) * keys * 4 + 64);
        uint32_t *vp = aligned_alloc(64, (size_t)(keys / 2 + 1) * dim * 4 + 64);
        float *scores = aligned_alloc(64, (size_t)ROWS * keys * 4 + 64);
        uint32_t *probs = aligned_alloc(64, (size_t)ROWS * (keys / 2 + 16) * 4 + 64);
        const int ok = kp && vp && scores && probs;
        if (!ok) {
#pragma omp atomic write
            status = -1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < sequences * heads; ++item) {
            const int64_t s = item / heads, h = item % heads;
            const int64_t q0 = cu_q[s], k0 = cu_k[s];
            const int64_t len_q = cu_q[s + 1] - q0, len_k = cu_k[s + 1] - k0;
            if (!ok || len_q == 0 || len_k == 0) continue;
            attend_item(q + q0 * ld_q + h * dim, ld_q, k + k0 * ld + h * dim, v + k0 * ld + h * dim, ld, dim, len_q,
                        len_k, scale, out + q0 * ld_out + h * dim, ld_out, kp, vp, scores, probs);
        }
        free(kp);
        free(vp);
        free(scores);
        free(probs);
    }
    return status;
}

#else
int rk_attention_supported(void) { return 0; }
#endif
