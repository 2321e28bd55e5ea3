/* One decode step of a LLaMA whose seven projections and output head hold int8 weights: every layer of
 * every row in one call, so a token costs one crossing from Python instead of ~2,600 small ATen ops.
 *
 * Numerics are the int_mm path's (kernels/int8_linear.py) row by row: each activation row is quantized to
 * int8 per row (kernels/reference.py's rounding, bit for bit), features with |x| > threshold are taken out
 * first and multiplied in fp32 against the dequantized weight column (LLM.int8's outliers, decided per row
 * here so a row's result never depends on its batch), the int32 dot product is exact, and the output is
 * (acc * row scale) * channel scale + the outliers' part. Two dot-product kernels give the same int32:
 * AVX-512 VNNI (vpdpbusd on x + 128, minus 128 * the weight row's sum) and AVX2 (vpmaddubsw on |x| and
 * the weight with x's sign). Weights are read in their stored (N, K) layout, one row after another, so
 * each thread streams one contiguous range: measured 30 GB/s on 2 Zen 4 cores against 18 GB/s when four
 * rows are read side by side.
 *
 * Threads: one OpenMP region per step (the runtime torch loaded; see native.py): products split their
 * output rows, attention its (row, head) pairs, the small per-row work runs on one thread.
 * Built at first use by kernels/native.py; tests compare it with the same step in torch.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* per layer, in this order, in the pointer table handed over by lora_core/native_decode.py */
enum { ATTN_NORM, QKV, QKV_S, QKV_SUM, O, O_S, O_SUM, MLP_NORM, GATE_UP, GATE_UP_S, GATE_UP_SUM,
       DOWN, DOWN_S, DOWN_SUM, K_CACHE, V_CACHE, PER_LAYER };
/* the sizes, in this order */
enum { DIM, N_LAYERS, N_HEADS, N_KV_HEADS, HEAD_DIM, HIDDEN, VOCAB, CACHE_LEN, BATCH, SLOT, ISA, N_DIMS };
enum { ISA_AVX2 = 1, ISA_VNNI = 2 };

typedef struct {  /* activation rows quantized for a product */
    int64_t M, K;
    int8_t* q;       /* (M, K): int8 (AVX2) or int8 + 128 as uint8 (VNNI) */
    float* scale;    /* (M,) */
    int32_t* n_out;  /* (M,) outlier features per row */
    int32_t* out_i;  /* (M, K) their indices */
    float* out_x;    /* (M, K) their values */
} Act;

static void quantize(const float* x, int64_t M, int64_t K, float eps, float threshold, int isa, Act* a) {
    a->M = M, a->K = K;
    for (int64_t m = 0; m < M; m++) {
        const float* xr = x + m * K;
        int8_t* q = a->q + m * K;
        int32_t n = 0;
        float amax = 0.0f;
        for (int64_t k = 0; k < K; k++) {
            const float v = xr[k], mag = fabsf(v);
            if (threshold > 0.0f && (v > threshold || v < -threshold)) {
                a->out_i[m * K + n] = (int32_t)k, a->out_x[m * K + n] = v, n++;
            } else if (mag > amax) {
                amax = mag;
            }
        }
        if (amax < eps) amax = eps;
        const float inv = 127.0f / amax;
        int32_t j = 0;
        for (int64_t k = 0; k < K; k++) {
            float v = xr[k];
            if (j < n && a->out_i[m * K + j] == k) v = 0.0f, j++;
            float r = floorf(v * inv + 0.5f);
            r = r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r;
            q[k] = (int8_t)((int)r + (isa == ISA_VNNI ? 128 : 0));  /* VNNI: the uint8 x + 128 */
        }
        a->scale[m] = amax / 127.0f;
        a->n_out[m] = n;
    }
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

/* four rows of x against one weight row (the weight read once per chunk): out[j] = sum x_j * w */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void dot4_vnni(const uint8_t* const x[4], const int8_t* w, int64_t K, int32_t out[4]) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K; k += 64) {
        const __mmask64 m = K - k >= 64 ? ~0ULL : (1ULL << (K - k)) - 1;
        const __m512i wv = _mm512_maskz_loadu_epi8(m, w + k);
        a0 = _mm512_dpbusd_epi32(a0, _mm512_maskz_loadu_epi8(m, x[0] + k), wv);
        a1 = _mm512_dpbusd_epi32(a1, _mm512_maskz_loadu_epi8(m, x[1] + k), wv);
        a2 = _mm512_dpbusd_epi32(a2, _mm512_maskz_loadu_epi8(m, x[2] + k), wv);
        a3 = _mm512_dpbusd_epi32(a3, _mm512_maskz_loadu_epi8(m, x[3] + k), wv);
    }
    out[0] = _mm512_reduce_add_epi32(a0), out[1] = _mm512_reduce_add_epi32(a1);
    out[2] = _mm512_reduce_add_epi32(a2), out[3] = _mm512_reduce_add_epi32(a3);
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

static float dot_f32(const float* a, const float* b, int64_t n) {  /* 8 lanes, then the lanes summed */
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    float sum = _mm_cvtss_f32(_mm_add_ss(lo, _mm_movehdup_ps(lo)));
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* y (M, N) (+)= x @ dequant(w (N, K), s (N,))^T; call inside a parallel region (splits the rows n) */
static void product(const Act* a, const int8_t* w, const float* s, const int32_t* rowsum, int64_t N,
                    float* y, int accumulate, int isa) {
    const int64_t M = a->M, K = a->K;
    #pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int8_t* wr = w + n * K;
        int32_t four[4];
        for (int64_t m = 0; m < M; m++) {
            int32_t acc;
            if (isa == ISA_VNNI && M > 1 && m % 4 == 0) {  /* rows m..m+3 at once, kept for the next three m */
                const uint8_t* x[4];
                for (int j = 0; j < 4; j++) x[j] = (const uint8_t*)a->q + (m + j < M ? m + j : m) * K;
                dot4_vnni(x, wr, K, four);
            }
            if (isa == ISA_VNNI)
                acc = (M > 1 ? four[m % 4] : dot_vnni((const uint8_t*)a->q + m * K, wr, K)) - 128 * rowsum[n];
            else
                acc = dot_avx2(a->q + m * K, wr, K);
            float v = ((float)acc * a->scale[m]) * s[n];
            if (a->n_out[m]) {
                float o = 0.0f;
                for (int32_t j = 0; j < a->n_out[m]; j++) o += a->out_x[m * K + j] * ((float)wr[a->out_i[m * K + j]] * s[n]);
                v = v + o;
            }
            y[m * N + n] = accumulate ? y[m * N + n] + v : v;
        }
    }
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

/* h (B, dim): the new tokens' embeddings in, overwritten; logits (B, vocab) out. */
void decode_step(const int64_t* d, void* const* layers, const float* final_norm, const int8_t* head_q,
                 const float* head_s, const int32_t* head_sum, float* h, const int64_t* positions,
                 const uint8_t* key_valid, const float* rope_table, float* logits, float norm_eps, float q_eps, float threshold) {
    const int64_t dim = d[DIM], nh = d[N_HEADS], nkv = d[N_KV_HEADS], hd = d[HEAD_DIM], hidden = d[HIDDEN];
    const int64_t S = d[CACHE_LEN], B = d[BATCH], slot = d[SLOT], isa = d[ISA];
    const int64_t nqkv = (nh + 2 * nkv) * hd, kmax = hidden > nh * hd ? (hidden > dim ? hidden : dim) : nh * hd;
    float* x = malloc(sizeof(float) * B * (dim + nqkv + nh * hd + 3 * hidden + nh * S + B * kmax));
    float *qkv = x + B * dim, *attn = qkv + B * nqkv, *gu = attn + B * nh * hd, *act = gu + B * 2 * hidden;
    float *scores = act + B * hidden, *out_x = scores + B * nh * S;
    Act a = {0, 0, malloc(B * kmax), malloc(sizeof(float) * B), malloc(sizeof(int32_t) * B),
             malloc(sizeof(int32_t) * B * kmax), out_x};
    const float softmax_scale = 1.0f / sqrtf((float)hd);
    const int64_t group = nh / nkv;
    #pragma omp parallel
    {
        for (int64_t l = 0; l < d[N_LAYERS]; l++) {
            void* const* L = layers + l * PER_LAYER;
            float *kc = L[K_CACHE], *vc = L[V_CACHE];
            #pragma omp single
            {
                rms_norm(h, L[ATTN_NORM], x, B, dim, norm_eps);
                quantize(x, B, dim, q_eps, threshold, isa, &a);
            }
            product(&a, L[QKV], L[QKV_S], L[QKV_SUM], nqkv, qkv, 0, isa);
            #pragma omp single
            for (int64_t b = 0; b < B; b++) {  /* RoPE, and the new key and value into the cache slot */
                float* r = qkv + b * nqkv;
                const float* t = rope_table + positions[b] * hd;
                rope(r, t, nh + nkv, hd);
                for (int64_t g = 0; g < nkv; g++) {
                    memcpy(kc + ((b * nkv + g) * S + slot) * hd, r + (nh + g) * hd, sizeof(float) * hd);
                    memcpy(vc + ((b * nkv + g) * S + slot) * hd, r + (nh + nkv + g) * hd, sizeof(float) * hd);
                }
            }
            #pragma omp for schedule(static)
            for (int64_t bh = 0; bh < B * nh; bh++) {
                const int64_t b = bh / nh, hq = bh % nh, g = hq / group;
                const float* q = qkv + b * nqkv + hq * hd;
                const float* kb = kc + (b * nkv + g) * S * hd;
                const float* vb = vc + (b * nkv + g) * S * hd;
                const uint8_t* valid = key_valid + b * S;
                float* sc = scores + bh * S;
                float mx = -INFINITY;
                for (int64_t s = 0; s <= slot; s++) {
                    if (!valid[s]) continue;
                    sc[s] = dot_f32(q, kb + s * hd, hd) * softmax_scale;
                    if (sc[s] > mx) mx = sc[s];
                }
                float sum = 0.0f;
                for (int64_t s = 0; s <= slot; s++) {
                    if (!valid[s]) continue;
                    sc[s] = expf(sc[s] - mx);
                    sum += sc[s];
                }
                float* o = attn + b * nh * hd + hq * hd;
                for (int64_t i = 0; i < hd; i++) o[i] = 0.0f;
                for (int64_t s = 0; s <= slot; s++) {
                    if (!valid[s]) continue;
                    const float p = sc[s] / sum;
                    for (int64_t i = 0; i < hd; i++) o[i] += p * vb[s * hd + i];
                }
            }
            #pragma omp single
            quantize(attn, B, nh * hd, q_eps, threshold, isa, &a);
            product(&a, L[O], L[O_S], L[O_SUM], dim, h, 1, isa);
            #pragma omp single
            {
                rms_norm(h, L[MLP_NORM], x, B, dim, norm_eps);
                quantize(x, B, dim, q_eps, threshold, isa, &a);
            }
            product(&a, L[GATE_UP], L[GATE_UP_S], L[GATE_UP_SUM], 2 * hidden, gu, 0, isa);
            #pragma omp single
            {
                for (int64_t b = 0; b < B; b++)
                    for (int64_t i = 0; i < hidden; i++) {
                        const float g = gu[b * 2 * hidden + i];
                        act[b * hidden + i] = g / (1.0f + expf(-g)) * gu[b * 2 * hidden + hidden + i];
                    }
                quantize(act, B, hidden, q_eps, threshold, isa, &a);
            }
            product(&a, L[DOWN], L[DOWN_S], L[DOWN_SUM], dim, h, 1, isa);
        }
        #pragma omp single
        {
            rms_norm(h, final_norm, x, B, dim, norm_eps);
            quantize(x, B, dim, q_eps, threshold, isa, &a);
        }
        product(&a, head_q, head_s, head_sum, d[VOCAB], logits, 0, isa);
    }
    free(x), free(a.q), free(a.scale), free(a.n_out), free(a.out_i);
}
