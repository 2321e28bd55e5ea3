/* y (M, N) = (x (M, K) @ q (N, K)^T) * s (N,): an int8-weight, fp32-activation product for few rows.
 *
 * The decode path of CPUs without int8 dot-product units (AVX2 machines such as AMD Zen 3): torch's
 * _int_mm falls back to a reference loop there and _weight_int8pack_mm is not vectorised for them, while
 * a plain fp32 GEMV reads four bytes per weight. Here each weight is read once as a byte, widened to fp32
 * in registers (vpmovsxbd + vcvtdq2ps) and multiplied in fp32, four weight rows by two activation rows per
 * pass, so eight independent FMA chains hide the FMA latency. Accumulation is fp32; the per-channel scale
 * is applied once per output. Threads: OpenMP, sharing the runtime torch already loaded (same soname).
 * Built at first use by kernels/native.py with -mavx2 -mfma; tests compare it with kernels/reference.py.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

static inline float hsum(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    return _mm_cvtss_f32(_mm_add_ss(lo, _mm_movehdup_ps(lo)));
}

static inline __m256 widen8(const int8_t* p) {  /* 8 int8 weights -> 8 fp32 */
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

void int8_gemv(const float* x, const int8_t* q, const float* s, float* y, int64_t M, int64_t K, int64_t N) {
    const int64_t K8 = K & ~(int64_t)7, blocks = (N + 3) / 4;
    #pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n0 = b * 4, nr = N - n0 < 4 ? N - n0 : 4;
        const int8_t* r[4];
        for (int i = 0; i < 4; i++) r[i] = q + (n0 + (i < nr ? i : 0)) * K;  /* a short block repeats a row */
        for (int64_t m0 = 0; m0 < M; m0 += 2) {
            const int two = M - m0 > 1;
            const float* x0 = x + m0 * K;
            const float* x1 = two ? x0 + K : x0;
            __m256 a00 = _mm256_setzero_ps(), a10 = a00, a20 = a00, a30 = a00;
            __m256 a01 = a00, a11 = a00, a21 = a00, a31 = a00;
            int64_t k = 0;
            for (; k < K8; k += 8) {
                const __m256 w0 = widen8(r[0] + k), w1 = widen8(r[1] + k), w2 = widen8(r[2] + k), w3 = widen8(r[3] + k);
                __m256 v = _mm256_loadu_ps(x0 + k);
                a00 = _mm256_fmadd_ps(w0, v, a00); a10 = _mm256_fmadd_ps(w1, v, a10);
                a20 = _mm256_fmadd_ps(w2, v, a20); a30 = _mm256_fmadd_ps(w3, v, a30);
                if (two) {
                    v = _mm256_loadu_ps(x1 + k);
                    a01 = _mm256_fmadd_ps(w0, v, a01); a11 = _mm256_fmadd_ps(w1, v, a11);
                    a21 = _mm256_fmadd_ps(w2, v, a21); a31 = _mm256_fmadd_ps(w3, v, a31);
                }
            }
            const float sums[2][4] = {{hsum(a00), hsum(a10), hsum(a20), hsum(a30)},
                                      {hsum(a01), hsum(a11), hsum(a21), hsum(a31)}};
            for (int j = 0; j <= two; j++) {
                const float* xj = j ? x1 : x0;
                for (int64_t i = 0; i < nr; i++) {
                    float acc = sums[j][i];
                    for (int64_t kk = k; kk < K; kk++) acc += xj[kk] * (float)r[i][kk];  /* K % 8 tail */
                    y[(m0 + j) * N + n0 + i] = acc * s[n0 + i];
                }
            }
        }
    }
}

/* The two passes around torch._int_mm (the int8-units path), fused and threaded; they were a fifth of a
 * training step as separate torch ops. Rounding is kernels/reference.py's, bit for bit (tests compare):
 * q = clamp(floor(x * (127 / absmax) + 0.5), -127, 127), absmax floored at eps; built without FP
 * contraction so x * inv + 0.5 rounds twice, as torch does. */

static inline float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

/* x (M, K) fp32, times cs (K,) per column when cs is not NULL (the backward folds the weight scales in
 * first) -> q (M, K) int8 and scale (M,) = absmax / 127, per row */
void quantize_rows(const float* x, const float* cs, int8_t* q, float* scale, int64_t M, int64_t K, float eps) {
    const int64_t K8 = K & ~(int64_t)7;
    #pragma omp parallel for schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const float* xr = x + m * K;
        int8_t* qr = q + m * K;
        float* scaled = 0;
        if (cs) {  /* x * cs, rounded once as torch's product is */
            scaled = (float*)malloc(K * sizeof(float));
            for (int64_t k = 0; k < K; k++) scaled[k] = xr[k] * cs[k];
            xr = scaled;
        }
        const __m256 sign = _mm256_set1_ps(-0.0f);
        __m256 vmax = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k < K8; k += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(xr + k)));
        float amax = hmax(vmax);
        for (; k < K; k++) {
            const float a = xr[k] < 0 ? -xr[k] : xr[k];
            if (a > amax) amax = a;
        }
        if (amax < eps) amax = eps;
        const float inv = 127.0f / amax;
        const __m256 vinv = _mm256_set1_ps(inv), half = _mm256_set1_ps(0.5f);
        const __m256 hi = _mm256_set1_ps(127.0f), lo = _mm256_set1_ps(-127.0f);
        for (k = 0; k < K8; k += 8) {
            __m256 v = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + k), vinv), half);
            v = _mm256_min_ps(_mm256_max_ps(_mm256_floor_ps(v), lo), hi);
            const __m256i i32 = _mm256_cvttps_epi32(v);
            const __m256i i8 = _mm256_packs_epi16(_mm256_packs_epi32(i32, i32), _mm256_setzero_si256());
            const int32_t first = _mm_cvtsi128_si32(_mm256_castsi256_si128(i8));   /* rows 0-3 */
            const int32_t second = _mm_cvtsi128_si32(_mm256_extracti128_si256(i8, 1));  /* rows 4-7 */
            __builtin_memcpy(qr + k, &first, 4);
            __builtin_memcpy(qr + k + 4, &second, 4);
        }
        for (; k < K; k++) {
            float v = __builtin_floorf(xr[k] * inv + 0.5f);
            qr[k] = (int8_t)(v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v);
        }
        scale[m] = amax / 127.0f;
        free(scaled);
    }
}

/* y (M, N) fp32 = acc (M, N) int32 * sa (M,) (row scales) * sw (N,) (column scales), in that order */
void scale_int32(const int32_t* acc, const float* sa, const float* sw, float* y, int64_t M, int64_t N) {
    #pragma omp parallel for schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const float a = sa[m];
        const int32_t* ar = acc + m * N;
        float* yr = y + m * N;
        for (int64_t n = 0; n < N; n++) yr[n] = ((float)ar[n] * a) * sw[n];
    }
}
