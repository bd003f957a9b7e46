/* The row-wise glue of the int8 GEMMs (rerank_kernels/int8_rows.py loads this with ctypes):
 * per-row quantization of activations, and the epilogue that turns a GEMM's sums into the
 * layer's output (scales, bias, exact GELU), optionally quantizing each output row for the next
 * GEMM while it is still in the cache. The torch versions in rerank_kernels/linear_int8.py make
 * three to eight passes over memory where these make one.
 *
 * Every function works on each row alone, with the same instructions whatever the row count, so a
 * row's bytes never depend on the rest of its batch (batch invariance). The rows are split over
 * OpenMP threads: the same runtime and team as torch's (its libgomp.so.1, already loaded), so
 * torch's threads, spinning after its last parallel region, are the ones that take the work
 * instead of competing with another pool for the cores.
 *
 * Built by CMake into the wheel; AVX-512 (F, BW, DQ, VL) in the kernels, checked at run time by
 * rk_cpu_supported(). Elsewhere only rk_cpu_supported() exists and says 0.
 */
#include <stdint.h>
#include <stdlib.h>

#define RK_INT8_MAX 127
#define RK_OFFSET 128 /* uint8 activations with zero point 128 (oneDNN's fast int8 path) */
#define MIN_PARALLEL_ROWS 16 /* fewer rows run on the calling thread: waking the team costs more */

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <float.h>
#include <immintrin.h>

#define RK_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))

int rk_cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}

static inline RK_AVX512 __mmask16 tail_mask(int64_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
}

/* erf(x) in float32: the rational approximation Eigen and XLA use (odd numerator of degree 13
 * over an even denominator of degree 8, |x| clamped to 4, where erf is 1 to float precision);
 * within a few float32 ulps of erf. */
static inline RK_AVX512 __m512 erf_ps(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-4.0f)), _mm512_set1_ps(4.0f));
    const __m512 x2 = _mm512_mul_ps(x, x);
    __m512 p = _mm512_fmadd_ps(x2, _mm512_set1_ps(-2.72614225801306e-10f), _mm512_set1_ps(2.77068142495902e-08f));
    p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(-2.10102402082508e-06f));
    p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(-5.69250639462346e-05f));
    p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(-7.34990630326855e-04f));
    p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(-2.95459980854025e-03f));
    p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(-1.60960333262415e-02f));
    p = _mm512_mul_ps(x, p);
    __m512 q = _mm512_fmadd_ps(x2, _mm512_set1_ps(-1.45660718464996e-05f), _mm512_set1_ps(-2.13374055278905e-04f));
    q = _mm512_fmadd_ps(x2, q, _mm512_set1_ps(-1.68282697438203e-03f));
    q = _mm512_fmadd_ps(x2, q, _mm512_set1_ps(-7.37332916720468e-03f));
    q = _mm512_fmadd_ps(x2, q, _mm512_set1_ps(-1.42647390514189e-02f));
    /* p / q as p * (1 / q): the reciprocal's 14-bit estimate and one Newton step (~2^-28 relative
     * error) cost a fraction of a division, the slowest instruction here */
    __m512 r = _mm512_rcp14_ps(q);
    r = _mm512_mul_ps(r, _mm512_fnmadd_ps(q, r, _mm512_set1_ps(2.0f)));
    return _mm512_mul_ps(p, r);
}

/* exact GELU: x/2 * (1 + erf(x / sqrt(2))) */
static inline RK_AVX512 __m512 gelu_ps(__m512 x) {
    const __m512 e = erf_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f)));
    return _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5f)), _mm512_add_ps(e, _mm512_set1_ps(1.0f)));
}

/* One row of n floats with absolute maximum amax -> int8 (or uint8 + 128) and its scale (amax /
 * 127; the smallest normal float for an all-zero row). q = round(x * (1 / scale)), ties to even. */
static inline RK_AVX512 void quantize_row_max(const float *x, int64_t n, float amax, int8_t *q, float *scale,
                                              int offset) {
    float s = amax / (float)RK_INT8_MAX;
    if (s < FLT_MIN) s = FLT_MIN;
    *scale = s;
    const __m512 inv = _mm512_set1_ps(1.0f / s);
    const __m512i lo = _mm512_set1_epi32(-RK_INT8_MAX), hi = _mm512_set1_epi32(RK_INT8_MAX);
    const __m512i shift = _mm512_set1_epi32(offset ? RK_OFFSET : 0);
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = tail_mask(n - j);
        __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + j), inv)); /* nearest even */
        v = _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(v, lo), hi), shift);
        /* narrowed in a register, then stored: VPMOVDB straight to memory is slow on AMD's Zen 4 */
        _mm_mask_storeu_epi8(q + j, m, _mm512_cvtepi32_epi8(v));
    }
}

static inline RK_AVX512 void quantize_row(const float *x, int64_t n, int8_t *q, float *scale, int offset) {
    __m512 amax = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16)
        amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_maskz_loadu_ps(tail_mask(n - j), x + j)));
    quantize_row_max(x, n, _mm512_reduce_max_ps(amax), q, scale, offset);
}

/* x (rows, ld) float32 -> q (rows, cols) int8 (uint8 + 128 with offset), scale (rows,). */
RK_AVX512 void rk_quantize_rows(const float *x, int64_t ld, int64_t cols, int64_t rows, int8_t *q, float *scale,
                                int offset) {
#pragma omp parallel for schedule(static) if (rows >= MIN_PARALLEL_ROWS)
    for (int64_t r = 0; r < rows; ++r) quantize_row(x + r * ld, cols, q + r * cols, scale + r, offset);
}

/* A thread's buffer for one row of cols floats (whole vectors), or NULL. */
static float *row_buffer(int64_t cols) { return (float *)aligned_alloc(64, (size_t)((cols + 15) / 16) * 64); }

/* One row of a GEMM's epilogue: y[j] = act((acc[j] * col_scale[j]) * rs + bias[j]); acc int32
 * or float32, col_scale and bias NULL for none. Returns the row's absolute maximum. */
static inline RK_AVX512 float epilogue_row(const void *acc, int acc_int32, int64_t cols, float row_scale,
                                           const float *col_scale, const float *bias, int gelu, float *y) {
    const __m512 rs = _mm512_set1_ps(row_scale);
    __m512 amax = _mm512_setzero_ps();
    for (int64_t j = 0; j < cols; j += 16) {
        const __mmask16 m = tail_mask(cols - j);
        __m512 v = acc_int32 ? _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(m, (const int32_t *)acc + j))
                             : _mm512_maskz_loadu_ps(m, (const float *)acc + j);
        if (col_scale) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, col_scale + j));
        v = bias ? _mm512_fmadd_ps(v, rs, _mm512_maskz_loadu_ps(m, bias + j)) : _mm512_mul_ps(v, rs);
        if (gelu) v = gelu_ps(v);
        _mm512_mask_storeu_ps(y + j, m, v);
        amax = _mm512_max_ps(amax, _mm512_abs_ps(v)); /* lanes past the row are 0 (masked loads) */
    }
    return _mm512_reduce_max_ps(amax);
}

/* The epilogue of one GEMM over its rows:
 *   y[r, j] = act((acc[r, j] * col_scale[j]) * row_scale[r] + bias[j])
 * acc: int32 sums (acc_int32) or float32 (col_scale already applied: pass col_scale NULL);
 * col_scale, bias: NULL for none; gelu: act = exact GELU, else identity.
 * Output: y into out (rows, cols) float32 (may be acc itself when acc is float32), or with
 * qout the row quantized into qout (rows, cols) int8 (uint8 + 128 with qoffset) and qscale. */
RK_AVX512 int rk_epilogue(const void *acc, int acc_int32, int64_t cols, int64_t rows, const float *row_scale,
                          const float *col_scale, const float *bias, int gelu, float *out, int8_t *qout,
                          float *qscale, int qoffset) {
    const size_t width = acc_int32 ? sizeof(int32_t) : sizeof(float);
    int status = 0;
#pragma omp parallel if (rows >= MIN_PARALLEL_ROWS)
    {
        float *row = qout ? row_buffer(cols) : NULL;
        if (qout && !row) {
#pragma omp atomic write
            status = -1;
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r) {
            if (qout && !row) continue;
            float *y = qout ? row : out + r * cols;
            const float amax = epilogue_row((const char *)acc + (size_t)(r * cols) * width, acc_int32, cols,
                                            row_scale[r], col_scale, bias, gelu, y);
            if (qout) quantize_row_max(row, cols, amax, qout + r * cols, qscale + r, qoffset);
        }
        free(row);
    }
    return status;
}

/* The epilogue of a GEMM whose output joins the residual stream, over its rows:
 *   out[r] = LayerNorm(act(acc[r] ...) + residual[r]) * gamma + beta
 * with the epilogue's arguments as in rk_epilogue (no GELU here), the statistics in float32 over
 * the row held in a buffer (mean, then the mean squared deviation). out may be residual itself
 * (rows ld apart in both); with qout the normalized row is also quantized for the next GEMM. */
RK_AVX512 int rk_epilogue_layernorm(const void *acc, int acc_int32, int64_t cols, int64_t rows,
                                    const float *row_scale, const float *col_scale, const float *bias,
                                    const float *residual, int64_t ld, const float *gamma, const float *beta,
                                    float eps, float *out, int8_t *qout, float *qscale, int qoffset) {
    const size_t width = acc_int32 ? sizeof(int32_t) : sizeof(float);
    int status = 0;
#pragma omp parallel if (rows >= MIN_PARALLEL_ROWS)
    {
    float *row = row_buffer(cols);
    if (!row) {
#pragma omp atomic write
        status = -1;
    }
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        if (!row) continue;
        epilogue_row((const char *)acc + (size_t)(r * cols) * width, acc_int32, cols, row_scale[r], col_scale, bias,
                     0, row);
        const float *res = residual + r * ld;
        __m512 sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < cols; j += 16) {
            const __mmask16 m = tail_mask(cols - j);
            const __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, row + j), _mm512_maskz_loadu_ps(m, res + j));
            _mm512_mask_storeu_ps(row + j, m, v);
            sum = _mm512_add_ps(sum, v);
        }
        const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(sum) / (float)cols);
        __m512 squares = _mm512_setzero_ps();
        for (int64_t j = 0; j < cols; j += 16) {
            const __mmask16 m = tail_mask(cols - j);
            const __m512 d = _mm512_maskz_sub_ps(m, _mm512_loadu_ps(row + j), mean);
            squares = _mm512_fmadd_ps(d, d, squares);
        }
        const float var = _mm512_reduce_add_ps(squares) / (float)cols;
        const __m512 rstd = _mm512_set1_ps(1.0f / _mm_cvtss_f32(_mm_sqrt_ss(_mm_set_ss(var + eps))));
        float *o = out + r * ld;
        __m512 amax = _mm512_setzero_ps();
        for (int64_t j = 0; j < cols; j += 16) {
            const __mmask16 m = tail_mask(cols - j);
            const __m512 d = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + j), mean), rstd);
            const __m512 v = _mm512_maskz_fmadd_ps(m, d, _mm512_maskz_loadu_ps(m, gamma + j),
                                                   _mm512_maskz_loadu_ps(m, beta + j));
            _mm512_mask_storeu_ps(o + j, m, v);
            amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
        }
        if (qout) quantize_row_max(o, cols, _mm512_reduce_max_ps(amax), qout + r * cols, qscale + r, qoffset);
    }
    free(row);
    }
    return status;
}

/* exact GELU of n floats (tests compare erf_ps with torch.erf through it) */
RK_AVX512 void rk_gelu(const float *x, int64_t n, float *out) {
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = tail_mask(n - j);
        _mm512_mask_storeu_ps(out + j, m, gelu_ps(_mm512_maskz_loadu_ps(m, x + j)));
    }
}

#else
int rk_cpu_supported(void) { return 0; }
#endif
