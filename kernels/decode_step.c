/* One decode step of a LLaMA whose seven projections and output head hold int8 (or int4) weights: every layer of
 * every row in one call, so a token costs one crossing from Python instead of ~2,600 small ATen ops. The same
 * call takes a prompt's tokens (T per row, each attending up to its own slot), so prompts prefill here too.
 *
 * Numerics are the int_mm path's (kernels/int8_linear.py) row by row: each activation row is quantized to
 * int8 per row (kernels/reference.py's rounding, bit for bit), features with |x| > threshold are taken out
 * first and multiplied in fp32 against the dequantized weight column (LLM.int8's outliers, decided per row
 * here so a row's result never depends on its batch), the int32 dot product is exact, and the output is
 * (acc * row scale) * channel scale + the outliers' part. Two dot-product kernels give the same int32:
 * AVX-512 VNNI (vpdpbusd on x + 128, minus 128 * the weight row's sum) and AVX2 (vpmaddubsw on |x| and
 * the weight with x's sign). On VNNI, products read a packed copy of each weight where native_decode.py made
 * one: tiles of 32 weight rows x 8 (4, 2, 1) activation rows, no sums across lanes (batch 8 7.65 -> 6.44 ms a
 * step, prompts 27% faster, one row 3-5%; Zen 4, same-process A/B). Otherwise weights are read in their stored
 * (N, K) layout, each thread one contiguous range: for one row, one weight row after another (measured 30 GB/s
 * on 2 Zen 4 cores against 18 GB/s when four rows are read side by side); for a batch, tiles of four weight
 * rows x four activation rows, the tiles ahead prefetched: 0.5 loads per vpdpbusd instead of 1.25, and 16 sums
 * scaled as one vector (batch 8: 13.2 -> 9.9 ms a step). A tile adds the outliers of its four rows by their union
 * (a batch's rows share most outlier features), each feature's weights read once: batch 8 8.9 -> 7.9 ms. On
 * AVX2, whole groups of four rows multiply in tiles of two weight rows (|x| once per row and chunk, eight sums
 * reduced as one vector): batch 8 15.8 -> 14.0 ms with VNNI hidden on the same Zen 4.
 *
 * Threads: one OpenMP region per step (the runtime torch loaded; see native.py): products split their
 * output rows, attention its (token, head) pairs, normalisation, quantization, RoPE and SwiGLU their rows.
 * Built at first use by kernels/native.py; tests compare it with the same step in torch.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* per layer, in this order, in the pointer table handed over by lora_core/native_decode.py */
enum { ATTN_NORM, QKV, QKV_S, QKV_SUM, QKV_P, O, O_S, O_SUM, O_P, MLP_NORM, GATE_UP, GATE_UP_S, GATE_UP_SUM, GATE_UP_P,
       DOWN, DOWN_S, DOWN_SUM, DOWN_P, K_CACHE, V_CACHE, PER_LAYER };
/* the sizes, in this order */
enum { DIM, N_LAYERS, N_HEADS, N_KV_HEADS, HEAD_DIM, HIDDEN, VOCAB, CACHE_LEN, BATCH, SLOT, ISA, TOKENS, N_DIMS };
enum { ISA_AVX2 = 1, ISA_VNNI = 2 };

typedef struct {  /* activation rows quantized for a product */
    int8_t* q;       /* (M, K): int8 (AVX2) or int8 + 128 as uint8 (VNNI) */
    float* scale;    /* (M,) */
    int32_t* n_out;  /* (M,) outlier features per row */
    int32_t* out_i;  /* (M, K) their indices */
    float* out_x;    /* (M, K) their values */
    int32_t* g_n;    /* (M / 4 rounded up,) for each group of four rows (a batch tile's), the union of their outliers: */
    int32_t* g_i;    /* (groups, K) its features, increasing */
    float* g_x;      /* (groups, K, 4) each row's value there, 0 where that row has none */
} Act;

static inline float hsum8(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    return _mm_cvtss_f32(_mm_add_ss(lo, _mm_movehdup_ps(lo)));
}

static inline float hmax8(__m256 v) {
    __m128 lo = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_max_ps(lo, _mm_movehl_ps(lo, lo));
    return _mm_cvtss_f32(_mm_max_ss(lo, _mm_movehdup_ps(lo)));
}

/* row m of x (M, K) into row m of a; 8 lanes at a time, each lane the scalar formula */
static void quantize(const float* x, int64_t m, int64_t K, float eps, float threshold, int isa, Act* a) {
    const float* xr = x + m * K;
    int8_t* q = a->q + m * K;
    int32_t* out_i = a->out_i + m * K;
    float* out_x = a->out_x + m * K;
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 limit = _mm256_set1_ps(threshold > 0.0f ? threshold : INFINITY);  /* |x| above it: an outlier */
    int32_t n = 0;
    __m256 vmax = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        const __m256 mag = _mm256_and_ps(_mm256_loadu_ps(xr + k), abs_mask);
        const __m256 outlier = _mm256_cmp_ps(mag, limit, _CMP_GT_OQ);
        for (int bits = _mm256_movemask_ps(outlier); bits; bits &= bits - 1) {
            const int i = __builtin_ctz(bits);
            out_i[n] = (int32_t)(k + i), out_x[n] = xr[k + i], n++;
        }
        vmax = _mm256_max_ps(_mm256_andnot_ps(outlier, mag), vmax);  /* a NaN lane keeps vmax, as `mag > amax` */
    }
    float amax = hmax8(vmax);
    for (; k < K; k++) {
        const float v = xr[k], mag = fabsf(v);
        if (threshold > 0.0f && (v > threshold || v < -threshold)) out_i[n] = (int32_t)k, out_x[n] = v, n++;
        else if (mag > amax) amax = mag;
    }
    if (amax < eps) amax = eps;
    const float inv = 127.0f / amax;
    const __m256 vinv = _mm256_set1_ps(inv), half = _mm256_set1_ps(0.5f), hi = _mm256_set1_ps(127.0f),
                 lo = _mm256_set1_ps(-127.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7), flip = _mm256_set1_epi8(isa == ISA_VNNI ? -128 : 0);
    k = 0;
    for (; k + 32 <= K; k += 32) {  /* 32 values -> 32 bytes: round, clamp, pack, put the 4-byte groups in order */
        __m256i r[4];
        for (int j = 0; j < 4; j++) {
            __m256 v = _mm256_loadu_ps(xr + k + 8 * j);
            v = _mm256_andnot_ps(_mm256_cmp_ps(_mm256_and_ps(v, abs_mask), limit, _CMP_GT_OQ), v);  /* outliers: 0 */
            const __m256 f = _mm256_floor_ps(_mm256_add_ps(_mm256_mul_ps(v, vinv), half));
            r[j] = _mm256_cvtps_epi32(_mm256_max_ps(_mm256_min_ps(f, hi), lo));
        }
        const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
        _mm256_storeu_si256((__m256i*)(q + k), _mm256_xor_si256(_mm256_permutevar8x32_epi32(bytes, order), flip));
    }
    for (int32_t j = 0; k < K; k++) {
        float v = xr[k];
        while (j < n && out_i[j] < k) j++;
        if (j < n && out_i[j] == k) v = 0.0f;
        float r = floorf(v * inv + 0.5f);
        r = r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r;
        q[k] = (int8_t)((int)r + (isa == ISA_VNNI ? 128 : 0));  /* VNNI: the uint8 x + 128 */
    }
    a->scale[m] = amax / 127.0f;
    a->n_out[m] = n;
}

/* the outliers of rows 4g..4g+3 merged into group g's union (a batch tile adds them for four rows at once: the
 * rows of a batch mostly share their outlier features, so the union is far shorter than the four lists) */
static void group_outliers(Act* a, int64_t g, int64_t M, int64_t K) {
    const int64_t m0 = 4 * g, rows = M - m0 < 4 ? M - m0 : 4;
    int32_t at[4] = {0, 0, 0, 0}, n = 0;
    int32_t* gi = a->g_i + g * K;
    float* gx = a->g_x + g * K * 4;
    for (;;) {
        int32_t c = INT32_MAX;
        for (int64_t j = 0; j < rows; j++)
            if (at[j] < a->n_out[m0 + j] && a->out_i[(m0 + j) * K + at[j]] < c) c = a->out_i[(m0 + j) * K + at[j]];
        if (c == INT32_MAX) break;
        gi[n] = c;
        for (int64_t j = 0; j < 4; j++) {
            const int here = j < rows && at[j] < a->n_out[m0 + j] && a->out_i[(m0 + j) * K + at[j]] == c;
            gx[4 * n + j] = here ? a->out_x[(m0 + j) * K + at[j]++] : 0.0f;
        }
        n++;
    }
    a->g_n[g] = n;
}

__attribute__((target("avx512f,avx512bw,avx512vnni")))
static int32_t dot_vnni(const uint8_t* x, const int8_t* w, int64_t K) {  /* sum (x + 128) * w */
    __m512i a0 = _mm512_setzero_si512(), a1 = a0;
    int64_t k = 0;
    for (; k + 128 <= K; k += 128) {
        a0 = _mm512_dpbusd_epi32(a0, _mm512_loadu_si512(x + k), _mm512_loadu_si512(w + k));
        a1 = _mm512_dpbusd_epi32(a1, _mm512_loadu_si512(x + k + 64), _mm512_loadu_si512(w + k + 64));
    }
    for (; k < K; k += 64) {
        const __mmask64 m = K - k >= 64 ? ~0ULL : (1ULL << (K - k)) - 1;
        a0 = _mm512_dpbusd_epi32(a0, _mm512_maskz_loadu_epi8(m, x + k), _mm512_maskz_loadu_epi8(m, w + k));
    }
    return _mm512_reduce_add_epi32(_mm512_add_epi32(a0, a1));
}

static int32_t dot_avx2(const int8_t* x, const int8_t* w, int64_t K) {  /* sum x * w, |x| <= 127 */
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i a0 = _mm256_setzero_si256(), a1 = a0;
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        __m256i xv = _mm256_loadu_si256((const __m256i*)(x + k));
        __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(xv), _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)(w + k)), xv));
        a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(p, ones));  /* pairs <= 2 * 127 * 127: no saturation */
        xv = _mm256_loadu_si256((const __m256i*)(x + k + 32));
        p = _mm256_maddubs_epi16(_mm256_abs_epi8(xv), _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)(w + k + 32)), xv));
        a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(p, ones));
    }
    for (; k + 32 <= K; k += 32) {
        const __m256i xv = _mm256_loadu_si256((const __m256i*)(x + k));
        const __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(xv), _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)(w + k)), xv));
        a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(p, ones));
    }
    a0 = _mm256_add_epi32(a0, a1);
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a0), _mm256_extracti128_si256(a0, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    int32_t sum = _mm_cvtsi128_si32(s);
    for (; k < K; k++) sum += (int32_t)x[k] * w[k];
    return sum;
}

static float dot_f32(const float* a, const float* b, int64_t n) {  /* 2 x 8 lanes, then the lanes summed */
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), a1);
    }
    for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
    float sum = hsum8(_mm256_add_ps(a0, a1));
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

static void axpy(float* restrict o, float p, const float* restrict v, int64_t n) {  /* o += p * v */
    const __m256 pv = _mm256_set1_ps(p);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(o + i, _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + i), _mm256_loadu_ps(o + i)));
    for (; i < n; i++) o[i] += p * v[i];
}

static inline float outliers(const Act* a, int64_t m, int64_t K, const int8_t* wr, float sn) {  /* row m's fp32 part */
    float o = 0.0f;
    for (int32_t j = 0; j < a->n_out[m]; j++) o += a->out_x[m * K + j] * ((float)wr[a->out_i[m * K + j]] * sn);
    return o;
}

enum { TILE_AHEAD = 2 };  /* batch tiles prefetch weight rows this many tiles ahead (1, 2, 4, 8 measured: 2 and 4 best) */
/* 16 accumulators (row j of x, row i of w at [4 * j + i]) -> one vector whose lane 4 * j + i is the sum of theirs */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static inline __m512i sum_tile(const __m512i acc[16]) {
    __m512i u[4];
    for (int j = 0; j < 4; j++) {  /* each 128-bit lane of u[j]: partial sums for w rows 0..3 */
        const __m512i* r = acc + 4 * j;
        const __m512i s01 = _mm512_add_epi32(_mm512_unpacklo_epi32(r[0], r[1]), _mm512_unpackhi_epi32(r[0], r[1]));
        const __m512i s23 = _mm512_add_epi32(_mm512_unpacklo_epi32(r[2], r[3]), _mm512_unpackhi_epi32(r[2], r[3]));
        u[j] = _mm512_add_epi32(_mm512_unpacklo_epi64(s01, s23), _mm512_unpackhi_epi64(s01, s23));
    }
    const __m512i p = _mm512_add_epi32(_mm512_shuffle_i64x2(u[0], u[1], 0x88), _mm512_shuffle_i64x2(u[0], u[1], 0xdd));
    const __m512i q = _mm512_add_epi32(_mm512_shuffle_i64x2(u[2], u[3], 0x88), _mm512_shuffle_i64x2(u[2], u[3], 0xdd));
    return _mm512_add_epi32(_mm512_shuffle_i64x2(p, q, 0x88), _mm512_shuffle_i64x2(p, q, 0xdd));
}

/* y[m0..m0+3, n0..n0+3] (+)= the int8 product for a tile of four activation rows and four weight rows: each
 * 64-byte chunk of the eight rows loaded once for 16 vpdpbusd, the 16 sums reduced and scaled as one vector.
 * Rows past M or N repeat the last real one and are not stored. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
static void tile4x4_vnni(const Act* a, int64_t m0, int64_t M, int64_t K, const int8_t* w, const float* s,
                         const int32_t* rowsum, int64_t n0, int64_t N, float* y, int accumulate) {
    const uint8_t* x[4];
    const int8_t* wr[4];
    int32_t rs[4];
    float sn[4];
    for (int j = 0; j < 4; j++) {
        const int64_t m = m0 + j < M ? m0 + j : M - 1, n = n0 + j < N ? n0 + j : N - 1;
        x[j] = (const uint8_t*)a->q + m * K, wr[j] = w + n * K, rs[j] = 128 * rowsum[n], sn[j] = s[n];
    }
    __m512i acc[16];
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        __m512i wv[4];
        for (int i = 0; i < 4; i++) {
            if (m0 == 0)  /* the later row groups find this tile in L1; T0 and no prefetch measured slower */
                _mm_prefetch((const char*)(wr[i] + TILE_AHEAD * 4 * K + k), _MM_HINT_T2);
            wv[i] = _mm512_loadu_si512(wr[i] + k);
        }
        for (int j = 0; j < 4; j++) {
            const __m512i xv = _mm512_loadu_si512(x[j] + k);
            for (int i = 0; i < 4; i++) acc[4 * j + i] = _mm512_dpbusd_epi32(acc[4 * j + i], xv, wv[i]);
        }
    }
    if (k < K) {  /* the last K % 64 */
        const __mmask64 mask = (1ULL << (K - k)) - 1;
        __m512i wv[4];
        for (int i = 0; i < 4; i++) wv[i] = _mm512_maskz_loadu_epi8(mask, wr[i] + k);
        for (int j = 0; j < 4; j++) {
            const __m512i xv = _mm512_maskz_loadu_epi8(mask, x[j] + k);
            for (int i = 0; i < 4; i++) acc[4 * j + i] = _mm512_dpbusd_epi32(acc[4 * j + i], xv, wv[i]);
        }
    }
    /* lane 4j + i: ((float)(sum - 128 * rowsum) * row scale) * channel scale, the scalar formula's roundings */
    const __m512i sums = _mm512_sub_epi32(sum_tile(acc), _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)rs)));
    const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);  /* lane 4j + i: j */
    const __m512 row_scale = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_loadu_ps(a->scale + m0)));
    __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(sums), row_scale), _mm512_broadcast_f32x4(_mm_loadu_ps(sn)));
    const int32_t nu = a->g_n[m0 / 4];
    if (nu) {  /* the group's outliers, each feature's four weights read once for the four rows: lane by lane the
                * scalar sum (a row's zeros between its own features change nothing but the sign of a zero) */
        const int32_t* ui = a->g_i + m0 / 4 * K;
        const float* ux = a->g_x + m0 / 4 * K * 4;
        const __m512 channel = _mm512_broadcast_f32x4(_mm_loadu_ps(sn));
        __m512 o = _mm512_setzero_ps();
        for (int32_t u = 0; u < nu; u++) {
            const int32_t c = ui[u];
            const __m512 wv = _mm512_broadcast_f32x4(_mm_cvtepi32_ps(_mm_setr_epi32(wr[0][c], wr[1][c], wr[2][c], wr[3][c])));
            const __m512 xv = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_loadu_ps(ux + 4 * u)));
            o = _mm512_add_ps(o, _mm512_mul_ps(xv, _mm512_mul_ps(wv, channel)));
        }
        v = _mm512_add_ps(v, o);
    }
    const __mmask8 cols = N - n0 >= 4 ? 0xf : (1u << (N - n0)) - 1;
    float out[16];
    _mm512_storeu_ps(out, v);
    for (int j = 0; j < 4 && m0 + j < M; j++) {
        float* yr = y + (m0 + j) * N + n0;
        __m128 r = _mm_loadu_ps(out + 4 * j);
        if (accumulate) r = _mm_add_ps(_mm_maskz_loadu_ps(cols, yr), r);
        _mm_mask_storeu_ps(yr, cols, r);
    }
}

/* y[m0..m0+3, n0..n0+1] (+)= the int8 product for a tile of four activation rows and two weight rows on AVX2 (16
 * registers: eight accumulators): each 32-byte chunk of the six rows loaded once, |x| once per activation row,
 * the eight int32 sums (dot_avx2's, exact) reduced into one vector, then tile4x4_vnni's epilogue on eight lanes
 * (lane 2j + i: activation row j, weight row i). The four rows exist (product() sends whole groups); a weight row
 * past N repeats the last real one and is not stored. */
static void tile4x2_avx2(const Act* a, int64_t m0, int64_t K, const int8_t* w, const float* s,
                         int64_t n0, int64_t N, float* y, int accumulate) {
    const int8_t* x[4];
    const int8_t* wr[2];
    float sn[2];
    for (int j = 0; j < 4; j++) x[j] = a->q + (m0 + j) * K;
    for (int i = 0; i < 2; i++) {
        const int64_t n = n0 + i < N ? n0 + i : N - 1;
        wr[i] = w + n * K, sn[i] = s[n];
    }
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[8];
    for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_si256();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        const __m256i w0 = _mm256_loadu_si256((const __m256i*)(wr[0] + k)), w1 = _mm256_loadu_si256((const __m256i*)(wr[1] + k));
        for (int j = 0; j < 4; j++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i*)(x[j] + k)), ax = _mm256_abs_epi8(xv);
            acc[2 * j] = _mm256_add_epi32(acc[2 * j], _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w0, xv)), ones));
            acc[2 * j + 1] = _mm256_add_epi32(acc[2 * j + 1], _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w1, xv)), ones));
        }
    }
    const __m256i t0 = _mm256_hadd_epi32(acc[0], acc[1]), t1 = _mm256_hadd_epi32(acc[2], acc[3]);
    const __m256i t2 = _mm256_hadd_epi32(acc[4], acc[5]), t3 = _mm256_hadd_epi32(acc[6], acc[7]);
    const __m256i u0 = _mm256_hadd_epi32(t0, t1), u1 = _mm256_hadd_epi32(t2, t3);
    int32_t sums[8];
    _mm256_storeu_si256((__m256i*)sums, _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20),
                                                         _mm256_permute2x128_si256(u0, u1, 0x31)));
    for (; k < K; k++)  /* the last K % 32 */
        for (int j = 0; j < 4; j++)
            for (int i = 0; i < 2; i++) sums[2 * j + i] += (int32_t)x[j][k] * wr[i][k];
    const __m256i pair = _mm256_setr_epi32(0, 1, 0, 1, 0, 1, 0, 1), row = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
    const __m256 channel = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_castsi128_ps(_mm_loadl_epi64((const __m128i*)sn))), pair);
    const __m256 row_scale = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(a->scale + m0)), row);
    __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i*)sums)), row_scale), channel);
    const int32_t nu = a->g_n[m0 / 4];
    if (nu) {  /* the group's outliers, as in tile4x4_vnni */
        const int32_t* ui = a->g_i + m0 / 4 * K;
        const float* ux = a->g_x + m0 / 4 * K * 4;
        __m256 o = _mm256_setzero_ps();
        for (int32_t u = 0; u < nu; u++) {
            const int32_t c = ui[u];
            const __m256 wv = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_cvtepi32_ps(_mm_setr_epi32(wr[0][c], wr[1][c], 0, 0))), pair);
            const __m256 xv = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(ux + 4 * u)), row);
            o = _mm256_add_ps(o, _mm256_mul_ps(xv, _mm256_mul_ps(wv, channel)));
        }
        v = _mm256_add_ps(v, o);
    }
    float out[8];
    _mm256_storeu_ps(out, v);
    for (int j = 0; j < 4; j++)
        for (int i = 0; i < 2 && n0 + i < N; i++) {
            float* yr = y + (m0 + j) * N + n0 + i;
            *yr = accumulate ? *yr + out[2 * j + i] : out[2 * j + i];
        }
}

/* The VNNI-packed copy of an int8 weight (N, K), which products read where lora_core/native_decode.py made one:
 * blocks of 16 rows (N padded with zero rows to a multiple of 32), each (K / 4, 16, 4): for every four
 * features, the 16 rows' four bytes side by side (K padded with zeros to a multiple of 4). One vpdpbusd then
 * takes four features of one activation row, broadcast, against 16 weight rows: every lane holds one output's
 * sum, so nothing is reduced across lanes, and each 64 bytes of weight serve all the rows of the tile. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"), always_inline))
static inline void packed_tile(const Act* a, int64_t m0, int64_t M, int64_t K, const int8_t* wp, const float* s,
                               const int32_t* rowsum, int64_t b0, int64_t N, float* y, int accumulate, const int MR) {
    const int64_t K4 = (K + 3) / 4;
    const uint8_t* x[8];
    for (int j = 0; j < MR; j++) x[j] = (const uint8_t*)a->q + (m0 + j < M ? m0 + j : M - 1) * K;
    const int8_t* w[2] = {wp + b0 * 64 * K4, wp + (b0 + 1) * 64 * K4};
    __m512i acc[16];
    for (int i = 0; i < 2 * MR; i++) acc[i] = _mm512_setzero_si512();
    for (int64_t k = 0; k < K4; k++) {
        if (m0 == 0)  /* the block pair after next; later row groups find this one in cache */
            for (int h = 0; h < 2; h++) _mm_prefetch((const char*)(w[h] + 4 * 64 * K4 + 64 * k), _MM_HINT_T2);
        const __m512i w0 = _mm512_loadu_si512(w[0] + 64 * k), w1 = _mm512_loadu_si512(w[1] + 64 * k);
        for (int j = 0; j < MR; j++) {
            int32_t four;
            memcpy(&four, x[j] + 4 * k, 4);  /* past K: bytes of the next row (or the slack), times zero weights */
            const __m512i xv = _mm512_set1_epi32(four);
            acc[2 * j] = _mm512_dpbusd_epi32(acc[2 * j], xv, w0);
            acc[2 * j + 1] = _mm512_dpbusd_epi32(acc[2 * j + 1], xv, w1);
        }
    }
    for (int h = 0; h < 2; h++) {  /* ((float)(sum - 128 * rowsum) * row scale) * channel scale (+ outliers) */
        const int64_t n0 = (b0 + h) * 16;
        if (n0 >= N) break;
        const __mmask16 cols = N - n0 >= 16 ? 0xffff : (__mmask16)((1u << (N - n0)) - 1);
        const __m512i rs = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(cols, rowsum + n0), 7);
        const __m512 sn = _mm512_maskz_loadu_ps(cols, s + n0);
        for (int j = 0; j < MR && m0 + j < M; j++) {
            const int64_t m = m0 + j;
            __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[2 * j + h], rs)),
                                                   _mm512_set1_ps(a->scale[m])), sn);
            if (a->n_out[m]) {  /* the row's outliers in its order: each feature's 16 weights from one 64-byte line */
                __m512 o = _mm512_setzero_ps();
                for (int32_t u = 0; u < a->n_out[m]; u++) {
                    const int32_t c = a->out_i[m * K + u];
                    const __m512i line = _mm512_loadu_si512(w[h] + 64 * (c / 4));
                    const __m512i wc = _mm512_srai_epi32(_mm512_sllv_epi32(line, _mm512_set1_epi32(24 - 8 * (c % 4))), 24);
                    o = _mm512_add_ps(o, _mm512_mul_ps(_mm512_set1_ps(a->out_x[m * K + u]),
                                                       _mm512_mul_ps(_mm512_cvtepi32_ps(wc), sn)));
                }
                v = _mm512_add_ps(v, o);
            }
            float* yr = y + m * N + n0;
            if (accumulate) v = _mm512_add_ps(_mm512_maskz_loadu_ps(cols, yr), v);
            _mm512_mask_storeu_ps(yr, cols, v);
        }
    }
}

#define PACKED_TILE(MR)                                                                                               \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))                                                  \
    static void packed_tile##MR(const Act* a, int64_t m0, int64_t M, int64_t K, const int8_t* wp, const float* s,    \
                                const int32_t* rowsum, int64_t b0, int64_t N, float* y, int accumulate) {             \
        packed_tile(a, m0, M, K, wp, s, rowsum, b0, N, y, accumulate, MR);                                          \
    }
PACKED_TILE(8)
PACKED_TILE(4)
PACKED_TILE(2)
PACKED_TILE(1)

/* y (M, N) (+)= x @ dequant(w (N, K), s (N,))^T; call inside a parallel region (splits the rows n) */
static void product(const Act* a, int64_t M, int64_t K, const int8_t* w, const float* s, const int32_t* rowsum,
                    const int8_t* packed, int64_t N, float* y, int accumulate, int isa) {
    if (isa == ISA_VNNI && packed) {  /* 32 weight rows x 8 (or 4, 2, 1) activation rows at a time */
        #pragma omp for schedule(static)
        for (int64_t b0 = 0; b0 < (N + 15) / 16; b0 += 2)
            for (int64_t m0 = 0; m0 < M; m0 += 8) {
                if (M - m0 > 4) packed_tile8(a, m0, M, K, packed, s, rowsum, b0, N, y, accumulate);
                else if (M - m0 > 2) packed_tile4(a, m0, M, K, packed, s, rowsum, b0, N, y, accumulate);
                else if (M - m0 > 1) packed_tile2(a, m0, M, K, packed, s, rowsum, b0, N, y, accumulate);
                else packed_tile1(a, m0, M, K, packed, s, rowsum, b0, N, y, accumulate);
            }
        return;
    }
    if (isa == ISA_VNNI && M > 1) {  /* tiles of four weight rows x four activation rows */
        #pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < N; n0 += 4)
            for (int64_t m0 = 0; m0 < M; m0 += 4) tile4x4_vnni(a, m0, M, K, w, s, rowsum, n0, N, y, accumulate);
        return;
    }
    const int64_t full = isa == ISA_AVX2 ? M / 4 * 4 : 0;  /* AVX2: whole groups of four rows in tiles of two weight
                                                          * rows x four activation rows, the rest one dot at a time */
    #pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int8_t* wr = w + n * K;
        if (n % 2 == 0)
            for (int64_t m0 = 0; m0 < full; m0 += 4) tile4x2_avx2(a, m0, K, w, s, n, N, y, accumulate);
        for (int64_t m = full; m < M; m++) {
            const int32_t acc = isa == ISA_VNNI ? dot_vnni((const uint8_t*)a->q + m * K, wr, K) - 128 * rowsum[n]
                                                : dot_avx2(a->q + m * K, wr, K);
            float v = ((float)acc * a->scale[m]) * s[n];
            if (a->n_out[m]) v = v + outliers(a, m, K, wr, s[n]);
            y[m * N + n] = accumulate ? y[m * N + n] + v : v;
        }
    }
}

/* ---- int4 weights: groups of `group` (a multiple of 32) along K share a scale s and a minimum lo, w = q * s + lo
 * with q in 0..15; each 32 weights are 16 bytes, byte j holding weight j in its low nibble and weight 16 + j in
 * its high nibble (llama.cpp's Q4 layout). Activations are quantized per 32 (a scale each, and their fp32 sum
 * for the lo term), as llama.cpp's Q8 blocks: y = sum over blocks of (s * xs) * (q . xq) + lo * sum(x). */

typedef struct {
    int8_t* q;    /* (M, K) */
    float* scale; /* (M, K/32) */
    float* sum;   /* (M, K/32) */
} Act4;

static void quantize_blocks(const float* x, int64_t m, int64_t K, float eps, Act4* a) {  /* row m of x (M, K) */
    for (int64_t b = 0; b < K / 32; b++) {
        const float* xb = x + m * K + b * 32;
        float amax = 0.0f, sum = 0.0f;
        for (int i = 0; i < 32; i++) {
            const float mag = fabsf(xb[i]);
            if (mag > amax) amax = mag;
            sum += xb[i];
        }
        if (amax < eps) amax = eps;
        const float inv = 127.0f / amax;
        for (int i = 0; i < 32; i++) {
            float r = floorf(xb[i] * inv + 0.5f);
            a->q[m * K + b * 32 + i] = (int8_t)(r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r);
        }
        a->scale[m * (K / 32) + b] = amax / 127.0f;
        a->sum[m * (K / 32) + b] = sum;
    }
}

static inline __m256i nibbles(const uint8_t* w) {  /* 16 bytes -> the 32 weights 0..15 as bytes, in order */
    const __m128i packed = _mm_loadu_si128((const __m128i*)w);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), _mm256_set1_epi8(0x0f));
}

/* one weight row (K/2 bytes, K/group scales and minima) against one quantized activation row */
static float dot_int4_avx2(const uint8_t* w, const float* ws, const float* wlo, int64_t group, const int8_t* x,
                           const float* xs, const float* xsum, int64_t K) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    float lo = 0.0f;
    for (int64_t b = 0; b < K / 32; b++) {
        const int64_t g = b * 32 / group;
        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(nibbles(w + b * 16),  /* pairs <= 2 * 15 * 127 */
                                                                 _mm256_loadu_si256((const __m256i*)(x + b * 32))), ones);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(ws[g] * xs[b]), acc);
        lo += wlo[g] * xsum[b];
    }
    return hsum8(acc) + lo;
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
static float dot_int4_vnni(const uint8_t* w, const float* ws, const float* wlo, int64_t group, const int8_t* x,
                           const float* xs, const float* xsum, int64_t K) {  /* the same int32 sums, one instruction */
    __m256 acc = _mm256_setzero_ps();
    float lo = 0.0f;
    for (int64_t b = 0; b < K / 32; b++) {
        const int64_t g = b * 32 / group;
        const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), nibbles(w + b * 16),
                                              _mm256_loadu_si256((const __m256i*)(x + b * 32)));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(ws[g] * xs[b]), acc);
        lo += wlo[g] * xsum[b];
    }
    return hsum8(acc) + lo;
}

/* four activation rows against one int4 weight row, each 32 weights widened once: out[j] = dot_int4(x_j) */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
static void dot4_int4_vnni(const uint8_t* w, const float* ws, const float* wlo, int64_t group, const Act4* a,
                           int64_t K, const int64_t rows[4], float out[4]) {
    const int64_t nb = K / 32;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    float lo[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t b = 0; b < nb; b++) {
        const int64_t g = b * 32 / group;
        const __m256i q = nibbles(w + b * 16);
        for (int j = 0; j < 4; j++) {
            const int64_t m = rows[j];
            const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), q,
                                                  _mm256_loadu_si256((const __m256i*)(a->q + m * K + b * 32)));
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(ws[g] * a->scale[m * nb + b]), acc[j]);
            lo[j] += wlo[g] * a->sum[m * nb + b];
        }
    }
    for (int j = 0; j < 4; j++) out[j] = hsum8(acc[j]) + lo[j];
}

/* The VNNI-packed copy of an int4 weight (lora_core/native_decode.py packs it): for each block of 16 rows (N padded
 * with zero rows to a multiple of 16) and each 32 features, 4 x 64 bytes: byte 4r + i of part c holds row r's
 * weight 4c + i in its low nibble and 16 + 4c + i in its high nibble; then the scales and the minima, each
 * (N / 16, K / group, 16). One vpdpbusd takes four features of one row against 16 weight rows; each 32 features'
 * int32 sums are scaled as one vector, y = sum over blocks of (s * xs) * (q . xq) + sum of lo * xsum. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"), always_inline))
static inline void packed4_tile(const Act4* a, int64_t m0, int64_t M, int64_t K, const uint8_t* wp, int64_t group,
                                int64_t r0, int64_t N, float* y, int accumulate, const int MR) {
    const int64_t nb = K / 32, G = K / group, N16 = (N + 15) / 16 * 16;
    const uint8_t* w = wp + r0 * nb * 256;
    const float* ws = (const float*)(wp + N16 * K / 2) + r0 * G * 16;
    const float* wlo = ws + N16 * G;
    const int8_t* x[4];
    const float *xs[4], *xsum[4];
    for (int j = 0; j < MR; j++) {
        const int64_t m = m0 + j < M ? m0 + j : M - 1;
        x[j] = a->q + m * K, xs[j] = a->scale + m * nb, xsum[j] = a->sum + m * nb;
    }
    const __m512i low = _mm512_set1_epi8(0x0f);
    __m512 f[4], l[4];
    for (int j = 0; j < MR; j++) f[j] = l[j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const int64_t g = b * 32 / group;
        __m512i acc[4];
        for (int j = 0; j < MR; j++) acc[j] = _mm512_setzero_si512();
        for (int c = 0; c < 4; c++) {
            const uint8_t* part = w + b * 256 + c * 64;
            if (m0 == 0) _mm_prefetch((const char*)(part + 2 * nb * 256), _MM_HINT_T2);
            const __m512i v = _mm512_loadu_si512(part);
            const __m512i lo4 = _mm512_and_si512(v, low), hi4 = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            for (int j = 0; j < MR; j++) {
                int32_t first, second;
                memcpy(&first, x[j] + b * 32 + 4 * c, 4), memcpy(&second, x[j] + b * 32 + 16 + 4 * c, 4);
                acc[j] = _mm512_dpbusd_epi32(acc[j], lo4, _mm512_set1_epi32(first));
                acc[j] = _mm512_dpbusd_epi32(acc[j], hi4, _mm512_set1_epi32(second));
            }
        }
        const __m512 sg = _mm512_loadu_ps(ws + g * 16), lg = _mm512_loadu_ps(wlo + g * 16);
        for (int j = 0; j < MR; j++) {
            f[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[j]), _mm512_mul_ps(sg, _mm512_set1_ps(xs[j][b])), f[j]);
            l[j] = _mm512_fmadd_ps(lg, _mm512_set1_ps(xsum[j][b]), l[j]);
        }
    }
    const int64_t n0 = r0 * 16;
    const __mmask16 cols = N - n0 >= 16 ? 0xffff : (__mmask16)((1u << (N - n0)) - 1);
    for (int j = 0; j < MR && m0 + j < M; j++) {
        float* yr = y + (m0 + j) * N + n0;
        __m512 v = _mm512_add_ps(f[j], l[j]);
        if (accumulate) v = _mm512_add_ps(_mm512_maskz_loadu_ps(cols, yr), v);
        _mm512_mask_storeu_ps(yr, cols, v);
    }
}

#define PACKED4_TILE(MR)                                                                                              \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))                                                  \
    static void packed4_tile##MR(const Act4* a, int64_t m0, int64_t M, int64_t K, const uint8_t* wp, int64_t group,  \
                                 int64_t r0, int64_t N, float* y, int accumulate) {                                   \
        packed4_tile(a, m0, M, K, wp, group, r0, N, y, accumulate, MR);                                             \
    }
PACKED4_TILE(4)
PACKED4_TILE(2)
PACKED4_TILE(1)

/* y (M, N) (+)= x @ dequant(int4 w)^T; inside a parallel region (splits the rows n) */
static void product_int4(const Act4* a, int64_t M, int64_t K, const uint8_t* w, const float* ws, const float* wlo,
                         const uint8_t* packed, int64_t group, int64_t N, float* y, int accumulate, int isa) {
    if (isa == ISA_VNNI && packed) {  /* 16 weight rows x 4 (2, 1) activation rows at a time */
        #pragma omp for schedule(static)
        for (int64_t r0 = 0; r0 < (N + 15) / 16; r0++)
            for (int64_t m0 = 0; m0 < M; m0 += 4) {
                if (M - m0 > 2) packed4_tile4(a, m0, M, K, packed, group, r0, N, y, accumulate);
                else if (M - m0 > 1) packed4_tile2(a, m0, M, K, packed, group, r0, N, y, accumulate);
                else packed4_tile1(a, m0, M, K, packed, group, r0, N, y, accumulate);
            }
        return;
    }
    const int64_t G = K / group;
    #pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        int64_t m = 0;
        if (isa == ISA_VNNI)
            for (; m + 4 <= M; m += 4) {
                const int64_t rows[4] = {m, m + 1, m + 2, m + 3};
                float v[4];
                dot4_int4_vnni(w + n * (K / 2), ws + n * G, wlo + n * G, group, a, K, rows, v);
                for (int j = 0; j < 4; j++) y[(m + j) * N + n] = accumulate ? y[(m + j) * N + n] + v[j] : v[j];
            }
        for (; m < M; m++) {
            const int8_t* x = a->q + m * K;
            const float *xs = a->scale + m * (K / 32), *xsum = a->sum + m * (K / 32);
            const float v = isa == ISA_VNNI ? dot_int4_vnni(w + n * (K / 2), ws + n * G, wlo + n * G, group, x, xs, xsum, K)
                                            : dot_int4_avx2(w + n * (K / 2), ws + n * G, wlo + n * G, group, x, xs, xsum, K);
            y[m * N + n] = accumulate ? y[m * N + n] + v : v;
        }
    }
}

static Act4 act4_alloc(int64_t M, int64_t K) {
    return (Act4){malloc(M * K), malloc(sizeof(float) * M * (K / 32)), malloc(sizeof(float) * M * (K / 32))};
}

static void act4_free(Act4* a) { free(a->q), free(a->scale), free(a->sum); }

static void act_free(Act* a) {  /* out_x lives in the step's scratch */
    free(a->q), free(a->scale), free(a->n_out), free(a->out_i), free(a->g_n), free(a->g_i), free(a->g_x);
}

/* Int4Linear's product for few rows (lora_core/int4.py): y (M, N) = x (M, K) @ dequant(w)^T; 0, or 1 when out
 * of memory */
int int4_product(const float* x, int64_t M, int64_t K, const uint8_t* w, const float* ws, const float* wlo,
                  int64_t N, int64_t group, float* y, float eps, int64_t isa) {
    Act4 a = act4_alloc(M, K);
    if (!a.q || !a.scale || !a.sum) {
        act4_free(&a);
        return 1;
    }
    for (int64_t m = 0; m < M; m++) quantize_blocks(x, m, K, eps, &a);
    #pragma omp parallel
    product_int4(&a, M, K, w, ws, wlo, NULL, group, N, y, 0, (int)isa);
    act4_free(&a);
    return 0;
}

static void rms_norm(const float* x, const float* weight, float* out, int64_t M, int64_t D, float eps) {
    for (int64_t m = 0; m < M; m++) {
        const float* xr = x + m * D;
        float ss = 0.0f;
        for (int64_t i = 0; i < D; i++) ss += xr[i] * xr[i];
        const float r = 1.0f / sqrtf(ss / (float)D + eps);
        for (int64_t i = 0; i < D; i++) out[m * D + i] = weight[i] * (xr[i] * r);
    }
}

static void rope(float* x, const float* table, int64_t heads, int64_t hd) {  /* Meta's interleaved pairs */
    for (int64_t h = 0; h < heads; h++) {
        float* p = x + h * hd;
        for (int64_t i = 0; i < hd / 2; i++) {
            const float c = table[2 * i], sn = table[2 * i + 1], x0 = p[2 * i], x1 = p[2 * i + 1];
            p[2 * i] = x0 * c - x1 * sn;
            p[2 * i + 1] = x0 * sn + x1 * c;
        }
    }
}

/* e^x for 8 lanes: Cephes' expf (range reduction by ln 2 in two parts, degree-5 polynomial), within 2 ulp of expf
 * over [-87.3, 88.7]; 0 below, e^88.7 above */
static inline __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.3365447504f);
    const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.7228390520f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

/* out (n) = silu(g) * u = g / (1 + e^-g) * u */
static void swiglu(const float* g, const float* u, float* out, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0f), e)),
                                                _mm256_loadu_ps(u + i)));
    }
    for (; i < n; i++) out[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* one query: o (hd) = softmax over the valid s <= last of (q . k_s) * scale, times v_s; sc: (last + 1) scratch */
static void attend(const float* q, const float* k, const float* v, const uint8_t* valid, int64_t last, int64_t hd,
                   float scale, float* sc, float* o) {
    float mx = -INFINITY, sum = 0.0f;
    for (int64_t s = 0; s <= last; s++) {
        sc[s] = valid[s] ? dot_f32(q, k + s * hd, hd) * scale : -INFINITY;  /* e^-inf: 0 below */
        if (sc[s] > mx) mx = sc[s];
    }
    if (mx == -INFINITY) {  /* no valid key: a padding token of a prompt, whose output nothing reads */
        memset(o, 0, sizeof(float) * hd);
        return;
    }
    int64_t s = 0;
    __m256 acc = _mm256_setzero_ps();
    for (; s + 8 <= last + 1; s += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sc + s), _mm256_set1_ps(mx)));
        _mm256_storeu_ps(sc + s, e);
        acc = _mm256_add_ps(acc, e);
    }
    sum = hsum8(acc);
    for (; s <= last; s++) {
        sc[s] = valid[s] ? expf(sc[s] - mx) : 0.0f;
        sum += sc[s];
    }
    for (s = 0; s <= last; s++) sc[s] = valid[s] ? sc[s] / sum : 0.0f;
    int64_t i0 = 0;
    for (; i0 + 64 <= hd; i0 += 64) {  /* 64 outputs held in registers across the positions */
        __m256 a[8];
        for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();
        for (int64_t s = 0; s <= last; s++) {
            if (!valid[s]) continue;
            const __m256 p = _mm256_set1_ps(sc[s]);
            const float* vs = v + s * hd + i0;
            for (int j = 0; j < 8; j++) a[j] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vs + 8 * j), a[j]);
        }
        for (int j = 0; j < 8; j++) _mm256_storeu_ps(o + i0 + 8 * j, a[j]);
    }
    if (i0 < hd) {  /* head_dim % 64 */
        for (int64_t i = i0; i < hd; i++) o[i] = 0.0f;
        for (int64_t s = 0; s <= last; s++)
            if (valid[s]) axpy(o + i0, sc[s], v + s * hd + i0, hd - i0);
    }
}

typedef struct {  /* what the products of a step share: quantized activations and how to quantize */
    Act a;
    Act4 a4;
    int isa;
    float q_eps, threshold, norm_eps;
} Shared;

/* y (M, N) (+)= x (M, K) @ W^T for weight P = {q, scale, row sums} (kind 0: int8) or {packed, scale, lo} (kind:
 * the int4 group size). Row by row: x RMS-normalised into `normed` first when `norm` is given, then quantized as
 * the kind wants; then W's rows split between threads. */
static void linear(const float* x, const float* norm, float* normed, int64_t M, int64_t K, void* const* P,
                   int64_t kind, int64_t N, float* y, int accumulate, Shared* sh) {
    /* tiles of the weights as stored read the outliers by groups of four rows; packed tiles read each row's own */
    const int tiles = !kind && M > 1 && !(sh->isa == ISA_VNNI && P[3]);
    #pragma omp for schedule(static)
    for (int64_t g = 0; g < (M + 3) / 4; g++) {  /* groups of four rows split between threads */
        for (int64_t m = 4 * g; m < 4 * g + 4 && m < M; m++) {
            const float* xm = x;
            if (norm) rms_norm(x + m * K, norm, normed + m * K, 1, K, sh->norm_eps), xm = normed;
            if (kind) quantize_blocks(xm, m, K, sh->q_eps, &sh->a4);
            else quantize(xm, m, K, sh->q_eps, sh->threshold, sh->isa, &sh->a);
        }
        if (tiles) group_outliers(&sh->a, g, M, K);
    }
    if (kind) product_int4(&sh->a4, M, K, P[0], P[1], P[2], P[3], kind, N, y, accumulate, sh->isa);
    else product(&sh->a, M, K, P[0], P[1], P[2], P[3], N, y, accumulate, sh->isa);
}

/* T new tokens per row through every layer: h (B * T, dim) holds their embeddings (row b's token t at b * T + t)
 * and is overwritten; token t is written at cache slot slot + t with RoPE position positions[b * T + t] and attends
 * the valid keys (key_valid (B, S)) at slots up to its own. logits (B, vocab): each row's last token. T = 1 is a
 * decode step; a prompt is T tokens at once (or in chunks, with the same results). kinds: per layer, the kind of
 * q|k|v, o, gate|up and down (0 int8, else int4 with that group size); the head is int8. Returns 0, or 1 when the
 * scratch memory could not be allocated (nothing computed). */
int decode_step(const int64_t* d, void* const* layers, const int64_t* kinds, const float* final_norm,
                 void* const* head, float* h, const int64_t* positions, const uint8_t* key_valid,
                 const float* rope_table, float* logits, float norm_eps, float q_eps, float threshold) {
    const int64_t dim = d[DIM], nh = d[N_HEADS], nkv = d[N_KV_HEADS], hd = d[HEAD_DIM], hidden = d[HIDDEN];
    const int64_t S = d[CACHE_LEN], B = d[BATCH], slot = d[SLOT], T = d[TOKENS], M = B * T;
    const int64_t nqkv = (nh + 2 * nkv) * hd, attn_dim = nh * hd;
    const int64_t kmax = dim > attn_dim ? (dim > hidden ? dim : hidden) : (attn_dim > hidden ? attn_dim : hidden);
#ifdef _OPENMP
    const int64_t threads = omp_get_max_threads();
#else
    const int64_t threads = 1;
#endif
    float* x = malloc(sizeof(float) * (M * (dim + nqkv + attn_dim + 3 * hidden + kmax) + threads * S + B * dim));
    const int64_t groups = (M + 3) / 4;  /* q: 64 bytes of slack, as packed tiles read four bytes at a time */
    Shared sh = {{malloc(M * kmax + 64), calloc(M + 4, sizeof(float)), malloc(sizeof(int32_t) * M),
                  malloc(sizeof(int32_t) * M * kmax), NULL, malloc(sizeof(int32_t) * groups),
                  malloc(sizeof(int32_t) * groups * kmax), malloc(sizeof(float) * groups * kmax * 4)},
                 act4_alloc(M, kmax), (int)d[ISA], q_eps, threshold, norm_eps};
    if (!x || !sh.a.q || !sh.a.scale || !sh.a.n_out || !sh.a.out_i || !sh.a.g_n || !sh.a.g_i || !sh.a.g_x
        || !sh.a4.q || !sh.a4.scale || !sh.a4.sum) {
        free(x), act_free(&sh.a), act4_free(&sh.a4);
        return 1;
    }
    float *qkv = x + M * dim, *attn = qkv + M * nqkv, *gu = attn + M * attn_dim, *act = gu + M * 2 * hidden;
    sh.a.out_x = act + M * hidden;
    float *scores = sh.a.out_x + M * kmax, *last = scores + threads * S;  /* scores: one row of S per thread */
    const float softmax_scale = 1.0f / sqrtf((float)hd);
    const int64_t group = nh / nkv;
    /* attention's (token, head) pairs per thread: for one token per row, one block each (a row's heads together, so
     * each key and value block is read by one thread); for a prompt, by turns (later tokens attend more keys) */
    const int64_t spread = T == 1 ? (M * nh + threads - 1) / threads : 1;
    #pragma omp parallel
    {
#ifdef _OPENMP
        float* sc = scores + omp_get_thread_num() * S;
#else
        float* sc = scores;
#endif
        for (int64_t l = 0; l < d[N_LAYERS]; l++) {
            void* const* L = layers + l * PER_LAYER;
            const int64_t* kind = kinds + 4 * l;
            float *kc = L[K_CACHE], *vc = L[V_CACHE];
            linear(h, L[ATTN_NORM], x, M, dim, L + QKV, kind[0], nqkv, qkv, 0, &sh);
            #pragma omp for schedule(static)
            for (int64_t m = 0; m < M; m++) {  /* RoPE, and the new key and value into their cache slot */
                const int64_t b = m / T, s = slot + m % T;
                float* r = qkv + m * nqkv;
                rope(r, rope_table + positions[m] * hd, nh + nkv, hd);
                for (int64_t g = 0; g < nkv; g++) {
                    memcpy(kc + ((b * nkv + g) * S + s) * hd, r + (nh + g) * hd, sizeof(float) * hd);
                    memcpy(vc + ((b * nkv + g) * S + s) * hd, r + (nh + nkv + g) * hd, sizeof(float) * hd);
                }
            }
            #pragma omp for schedule(static, spread)
            for (int64_t mh = 0; mh < M * nh; mh++) {
                const int64_t m = mh / nh, b = m / T, hq = mh % nh, g = hq / group;
                attend(qkv + m * nqkv + hq * hd, kc + (b * nkv + g) * S * hd, vc + (b * nkv + g) * S * hd,
                       key_valid + b * S, slot + m % T, hd, softmax_scale, sc, attn + m * attn_dim + hq * hd);
            }
            linear(attn, NULL, NULL, M, attn_dim, L + O, kind[1], dim, h, 1, &sh);
            linear(h, L[MLP_NORM], x, M, dim, L + GATE_UP, kind[2], 2 * hidden, gu, 0, &sh);
            #pragma omp for schedule(static)
            for (int64_t c = 0; c < M * 4; c++) {  /* each row in four parts */
                const int64_t m = c / 4, i0 = hidden * (c % 4) / 4 / 8 * 8, i1 = c % 4 == 3 ? hidden : hidden * (c % 4 + 1) / 4 / 8 * 8;
                swiglu(gu + m * 2 * hidden + i0, gu + m * 2 * hidden + hidden + i0, act + m * hidden + i0, i1 - i0);
            }
            linear(act, NULL, NULL, M, hidden, L + DOWN, kind[3], dim, h, 1, &sh);
        }
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) memcpy(last + b * dim, h + (b * T + T - 1) * dim, sizeof(float) * dim);
        linear(last, final_norm, x, B, dim, head, 0, d[VOCAB], logits, 0, &sh);
    }
    free(x), act_free(&sh.a), act4_free(&sh.a4);
    return 0;
}
