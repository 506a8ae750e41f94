/* tokenworks' native CPU kernels: 4-bit matrix products and a whole decode step of the Llama family.

   Built on the machine that runs it (cc -O3 -march=native -fopenmp; see __init__.py) and called through
   ctypes. AVX2 + FMA are required (the Python side checks before building).

   4-bit weights keep GGUF's Q4 block layout: per row and group of 32 inputs, 16 bytes whose low nibbles
   are inputs 0..15 and high nibbles inputs 16..31, a scale d and a minimum m (w = d * q + m; Q4_0 is
   m = -8 d). Activations are quantized per group of 32 to int16 (scale sx = max |x| / 32767) with their
   exact float sum kept, so that one group's contribution is
       d * sx * sum(q * xq) + m * sum(x)
   and the integer dot product runs on madd_epi16. (int8 activations, as llama.cpp uses with maddubs, were
   measured here: 0.8 % worse perplexity and 93 % top-1 agreement with float32 on the default model; int16
   keeps float32's quality.) */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define GROUP 32

typedef struct {
    int64_t n, k;          /* output rows, inputs (k % 32 == 0) */
    const uint8_t *codes;  /* (n, k / 2) GGUF nibbles */
    const float *d, *m;    /* (n, k / 32) */
    const float *bias;     /* (n) or NULL */
} Q4Mat;

typedef struct {
    int64_t n, k;          /* output rows, inputs (k % 32 == 0) */
    const int8_t *codes;   /* (n, k) GGUF Q8_0 values */
    const float *d;        /* (n, k / 32): w = d * q */
} Q8Mat;

typedef struct {
    const float *input_norm, *post_norm, *q_norm, *k_norm; /* q/k norms: NULL unless the model has them */
    Q4Mat qkv, o, gate_up, down;
} Layer;

typedef struct {
    int64_t hidden, num_heads, num_kv_heads, head_dim, inter, num_layers, block_size;
    float eps, scale;
    const float *cos, *sin;   /* (positions, head_dim / 2) */
    const float *final_norm;
    const Layer *layers;
    float *kv;                /* the KV pool; a token's heads and dims contiguous */
    int64_t stride_block, stride_layer, stride_kv, stride_token;  /* in floats */
} Net;

/* -- activations ------------------------------------------------------------------------------- */

typedef struct {
    int16_t *q;   /* (rows, k) */
    float *sx;    /* (rows, k / 32) */
    float *sum;   /* (rows, k / 32) */
} QAct;

static void quantize_row(const float *x, int64_t k, int16_t *q, float *sx, float *sum) {
    for (int64_t g = 0; g < k / GROUP; g++) {
        const float *v = x + g * GROUP;
        float amax = 0.f, s = 0.f;
        for (int i = 0; i < GROUP; i++) {
            float a = fabsf(v[i]);
            amax = a > amax ? a : amax;
            s += v[i];
        }
        float scale = amax / 32767.f, inv = scale > 0.f ? 1.f / scale : 0.f;
        for (int i = 0; i < GROUP; i++) q[g * GROUP + i] = (int16_t)lrintf(v[i] * inv);
        sx[g] = scale;
        sum[g] = s;
    }
}

void tw_quantize(const float *x, int64_t rows, int64_t k, int16_t *q, float *sx, float *sum) {
    for (int64_t r = 0; r < rows; r++)
        quantize_row(x + r * k, k, q + r * k, sx + r * (k / GROUP), sum + r * (k / GROUP));
}

/* -- 4-bit matrix products --------------------------------------------------------------------- */

static inline float hsum(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_movehdup_ps(a));
    return _mm_cvtss_f32(a);
}

static inline __m256 group_dot(const uint8_t *p, __m256i x0, __m256i x1, float scale, __m256 acc) {
    const __m128i low = _mm_set1_epi8(0x0F);
    __m128i b = _mm_loadu_si128((const __m128i *)p);
    __m256i q0 = _mm256_cvtepu8_epi16(_mm_and_si128(b, low));                    /* inputs 0..15 */
    __m256i q1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(b, 4), low)); /* inputs 16..31 */
    __m256i s = _mm256_add_epi32(_mm256_madd_epi16(q0, x0), _mm256_madd_epi16(q1, x1));
    return _mm256_fmadd_ps(_mm256_set1_ps(scale), _mm256_cvtepi32_ps(s), acc);
}

static inline float min_dot(const float *m, const float *sum, int64_t groups) {
    __m256 a = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= groups; g += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(m + g), _mm256_loadu_ps(sum + g), a);
    float s = hsum(a);
    for (; g < groups; g++) s += m[g] * sum[g];
    return s;
}

/* Four weight rows, widened to int16 in `wide` (4 * k values, L1-resident), against every activation row:
   each row then costs loads and multiply-adds only. `m` may be NULL (no minimum: Q8_0). */
static void wide_tile(const int16_t *wide, const float *d, const float *m, int64_t k, const QAct *x, int64_t rows,
                      float *y, int64_t ldy, int64_t n) {
    const int64_t G = k / GROUP;
    for (int64_t r = 0; r < rows; r++) {
        const int16_t *xq = x->q + r * k;
        const float *sx = x->sx + r * G;
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t g = 0; g < G; g++) {
            __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + g * GROUP));
            __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + g * GROUP + 16));
            for (int j = 0; j < 4; j++) {
                const int16_t *q = wide + j * k + g * GROUP;
                __m256i s = _mm256_add_epi32(_mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)q), x0),
                                             _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)(q + 16)), x1));
                acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(d[j * G + g] * sx[g]), _mm256_cvtepi32_ps(s), acc[j]);
            }
        }
        for (int j = 0; j < 4; j++)
            y[r * ldy + n + j] = hsum(acc[j]) + (m ? min_dot(m + j * G, x->sum + r * G, G) : 0.f);
    }
}

static void widen_q4(const Q4Mat *w, int64_t n, int16_t *wide) {
    const int64_t G = w->k / GROUP, rb = w->k / 2;
    const __m128i low = _mm_set1_epi8(0x0F);
    for (int j = 0; j < 4; j++)
        for (int64_t g = 0; g < G; g++) {
            __m128i b = _mm_loadu_si128((const __m128i *)(w->codes + (n + j) * rb + g * 16));
            int16_t *dst = wide + j * w->k + g * GROUP;
            _mm256_storeu_si256((__m256i *)dst, _mm256_cvtepu8_epi16(_mm_and_si128(b, low)));
            _mm256_storeu_si256((__m256i *)(dst + 16), _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(b, 4), low)));
        }
}

/* Rows [n0, n1) of y = x W^T (+ bias) for `rows` activation rows; y has row stride ldy. Weight rows go
   four at a time (four independent accumulators) and each tile serves every activation row while it is
   in L1; from WIDE_ROWS activation rows on, the tile's codes are widened once for all of them. */
#define WIDE_ROWS 4
static void q4_rows(const Q4Mat *w, const QAct *x, int64_t rows, float *y, int64_t ldy, int64_t n0, int64_t n1) {
    const int64_t G = w->k / GROUP, rb = w->k / 2;
    int64_t n = n0;
    if (rows >= WIDE_ROWS) {
        int16_t *wide = malloc(4 * w->k * sizeof(int16_t));
        if (wide) {
            for (; n + 4 <= n1; n += 4) {
                widen_q4(w, n, wide);
                wide_tile(wide, w->d + n * G, w->m + n * G, w->k, x, rows, y, ldy, n);
            }
            free(wide);
        }
    }
    for (; n + 4 <= n1; n += 4) {
        const uint8_t *p = w->codes + n * rb;
        const float *d = w->d + n * G;
        for (int64_t r = 0; r < rows; r++) {
            const int16_t *xq = x->q + r * w->k;
            const float *sx = x->sx + r * G;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t g = 0; g < G; g++) {
                __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + g * GROUP));
                __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + g * GROUP + 16));
                float s = sx[g];
                a0 = group_dot(p + g * 16, x0, x1, d[g] * s, a0);
                a1 = group_dot(p + rb + g * 16, x0, x1, d[G + g] * s, a1);
                a2 = group_dot(p + 2 * rb + g * 16, x0, x1, d[2 * G + g] * s, a2);
                a3 = group_dot(p + 3 * rb + g * 16, x0, x1, d[3 * G + g] * s, a3);
            }
            const float *sum = x->sum + r * G;
            float *out = y + r * ldy + n;
            out[0] = hsum(a0) + min_dot(w->m + n * G, sum, G);
            out[1] = hsum(a1) + min_dot(w->m + (n + 1) * G, sum, G);
            out[2] = hsum(a2) + min_dot(w->m + (n + 2) * G, sum, G);
            out[3] = hsum(a3) + min_dot(w->m + (n + 3) * G, sum, G);
        }
    }
    for (; n < n1; n++) {
        for (int64_t r = 0; r < rows; r++) {
            const int16_t *xq = x->q + r * w->k;
            __m256 a = _mm256_setzero_ps();
            for (int64_t g = 0; g < G; g++)
                a = group_dot(w->codes + n * rb + g * 16, _mm256_loadu_si256((const __m256i *)(xq + g * GROUP)),
                              _mm256_loadu_si256((const __m256i *)(xq + g * GROUP + 16)),
                              w->d[n * G + g] * x->sx[r * G + g], a);
            y[r * ldy + n] = hsum(a) + min_dot(w->m + n * G, x->sum + r * G, G);
        }
    }
    if (w->bias)
        for (int64_t r = 0; r < rows; r++)
            for (int64_t j = n0; j < n1; j++) y[r * ldy + j] += w->bias[j];
}

/* The share of weight rows (multiples of 4) of thread `t` of `nt`. */
static void share(int64_t n, int t, int nt, int64_t *a, int64_t *b) {
    int64_t tiles = (n + 3) / 4, per = tiles / nt, extra = tiles % nt;
    int64_t lo = t * per + (t < extra ? t : extra), hi = lo + per + (t < extra);
    *a = lo * 4 < n ? lo * 4 : n;
    *b = hi * 4 < n ? hi * 4 : n;
}

/* Called inside a parallel region by every thread. */
static void q4_matmul_shared(const Q4Mat *w, const QAct *x, int64_t rows, float *y, int t, int nt) {
    int64_t a, b;
    share(w->n, t, nt, &a, &b);
    if (a < b) q4_rows(w, x, rows, y, w->n, a, b);
}

/* y (rows, n) = x (rows, k) W^T + bias, float32 in and out, on `threads` threads. */
void tw_q4_matmul(const Q4Mat *w, const float *x, int64_t rows, float *y, int threads) {
    int64_t G = w->k / GROUP;
    QAct q = {malloc(rows * w->k * sizeof(int16_t)), malloc(rows * G * sizeof(float)), malloc(rows * G * sizeof(float))};
    tw_quantize(x, rows, w->k, q.q, q.sx, q.sum);
    #pragma omp parallel num_threads(threads)
    {
        int t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        q4_matmul_shared(w, &q, rows, y, t, nt);
    }
    free(q.q);
    free(q.sx);
    free(q.sum);
}

/* y (rows, n) = x (rows, k) W^T for a Q8_0 W, float32 in and out, on `threads` threads. */
void tw_q8_matmul(const Q8Mat *w, const float *x, int64_t rows, float *y, int threads) {
    int64_t G = w->k / GROUP;
    QAct q = {malloc(rows * w->k * sizeof(int16_t)), malloc(rows * G * sizeof(float)), malloc(rows * G * sizeof(float))};
    tw_quantize(x, rows, w->k, q.q, q.sx, q.sum);
    #pragma omp parallel num_threads(threads)
    {
        int t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        int64_t a, b;
        share(w->n, t, nt, &a, &b);
        int16_t *wide = malloc(4 * w->k * sizeof(int16_t));
        int64_t n = a;
        for (; wide && n + 4 <= b; n += 4) {
            for (int j = 0; j < 4; j++)
                for (int64_t i = 0; i < w->k; i += 16)
                    _mm256_storeu_si256((__m256i *)(wide + j * w->k + i),
                                        _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w->codes + (n + j) * w->k + i))));
            wide_tile(wide, w->d + n * G, NULL, w->k, &q, rows, y, w->n, n);
        }
        for (; n < b; n++)  /* the last rows (n % 4), or all of them if the buffer could not be had */
            for (int64_t r = 0; r < rows; r++) {
                float s = 0.f;
                for (int64_t i = 0; i < w->k; i++)
                    s += w->d[n * G + i / GROUP] * q.sx[r * G + i / GROUP] * (float)w->codes[n * w->k + i] * (float)q.q[r * w->k + i];
                y[r * w->n + n] = s;
            }
        free(wide);
    }
    free(q.q);
    free(q.sx);
    free(q.sum);
}

/* -- the decode step --------------------------------------------------------------------------- */

static void rms_norm(const float *x, const float *w, int64_t n, float eps, float *out) {
    float s = 0.f;
    for (int64_t i = 0; i < n; i++) s += x[i] * x[i];
    float inv = 1.f / sqrtf(s / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * inv * w[i];
}

static void rope(float *x, const float *cos, const float *sin, int64_t half) {
    for (int64_t i = 0; i < half; i++) {
        float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * cos[i] - x2 * sin[i];
        x[i + half] = x2 * cos[i] + x1 * sin[i];
    }
}

static float *kv_at(const Net *net, int64_t layer, int which, int64_t block, int64_t offset) {
    return net->kv + block * net->stride_block + layer * net->stride_layer + which * net->stride_kv +
           offset * net->stride_token;
}

/* One query head of one row against its context through the block table; `scores` holds ctx floats. */
static void attend(const Net *net, int64_t layer, const float *q, int64_t kv_head, const int32_t *table,
                   int64_t ctx, float *scores, float *out) {
    const int64_t D = net->head_dim, bs = net->block_size;
    float mx = -INFINITY;
    for (int64_t t = 0; t < ctx; t++) {
        const float *k = kv_at(net, layer, 0, table[t / bs], t % bs) + kv_head * D;
        float s = 0.f;
        for (int64_t i = 0; i < D; i++) s += q[i] * k[i];
        s *= net->scale;
        scores[t] = s;
        mx = s > mx ? s : mx;
    }
    float total = 0.f;
    for (int64_t t = 0; t < ctx; t++) {
        scores[t] = expf(scores[t] - mx);
        total += scores[t];
    }
    for (int64_t i = 0; i < D; i++) out[i] = 0.f;
    for (int64_t t = 0; t < ctx; t++) {
        const float *v = kv_at(net, layer, 1, table[t / bs], t % bs) + kv_head * D;
        float p = scores[t] / total;
        for (int64_t i = 0; i < D; i++) out[i] += p * v[i];
    }
}

/* One decode step of `rows` sequences, every layer: h (rows, hidden) holds the tokens' embeddings and
   returns the final normed hidden states. Each row's K/V is written at its slot before attention, which
   reads `context_lens[r]` tokens through `tables` (rows, table_width). Returns 0, or -1 if out of memory. */
int tw_decode_step(const Net *net, int64_t rows, float *h, const int32_t *positions, const int32_t *slot_blocks,
                   const int32_t *slot_offsets, const int32_t *tables, int64_t table_width,
                   const int32_t *context_lens, int threads) {
    const int64_t H = net->hidden, D = net->head_dim, nh = net->num_heads, nkv = net->num_kv_heads;
    const int64_t qkv_n = (nh + 2 * nkv) * D, I = net->inter;
    int64_t kmax = H > nh * D ? H : nh * D;
    kmax = kmax > I ? kmax : I;
    const int64_t gmax = kmax / GROUP, per_kv = nh / nkv;
    int64_t max_ctx = 0;
    for (int64_t r = 0; r < rows; r++) max_ctx = context_lens[r] > max_ctx ? context_lens[r] : max_ctx;
    float *x = malloc(rows * kmax * sizeof(float));
    float *qkv = malloc(rows * qkv_n * sizeof(float));
    float *attn = malloc(rows * nh * D * sizeof(float));
    float *gu = malloc(rows * 2 * I * sizeof(float));
    float *proj = malloc(rows * H * sizeof(float));
    float *scores = malloc((size_t)threads * (max_ctx + 1) * sizeof(float));
    QAct q = {malloc(rows * kmax * sizeof(int16_t)), malloc(rows * gmax * sizeof(float)), malloc(rows * gmax * sizeof(float))};
    int ok = x && qkv && attn && gu && proj && scores && q.q && q.sx && q.sum;
    if (ok) {
        #pragma omp parallel num_threads(threads)
        {
            int t = 0, nt = 1;
#ifdef _OPENMP
            t = omp_get_thread_num();
            nt = omp_get_num_threads();
#endif
            for (int64_t l = 0; l < net->num_layers; l++) {
                const Layer *L = &net->layers[l];
                #pragma omp for schedule(static)
                for (int64_t r = 0; r < rows; r++) {
                    rms_norm(h + r * H, L->input_norm, H, net->eps, x + r * H);
                    quantize_row(x + r * H, H, q.q + r * H, q.sx + r * (H / GROUP), q.sum + r * (H / GROUP));
                }
                q4_matmul_shared(&L->qkv, &q, rows, qkv, t, nt);
                #pragma omp barrier
                #pragma omp for schedule(static)
                for (int64_t r = 0; r < rows; r++) {
                    float *row = qkv + r * qkv_n;
                    const float *c = net->cos + (int64_t)positions[r] * (D / 2), *s = net->sin + (int64_t)positions[r] * (D / 2);
                    for (int64_t j = 0; j < nh + nkv; j++) {
                        float *v = row + j * D;
                        if (L->q_norm) rms_norm(v, j < nh ? L->q_norm : L->k_norm, D, net->eps, v);
                        rope(v, c, s, D / 2);
                    }
                    memcpy(kv_at(net, l, 0, slot_blocks[r], slot_offsets[r]), row + nh * D, nkv * D * sizeof(float));
                    memcpy(kv_at(net, l, 1, slot_blocks[r], slot_offsets[r]), row + (nh + nkv) * D, nkv * D * sizeof(float));
                }
                #pragma omp for schedule(dynamic)
                for (int64_t rh = 0; rh < rows * nh; rh++) {
                    int64_t r = rh / nh, head = rh % nh;
                    attend(net, l, qkv + r * qkv_n + head * D, head / per_kv, tables + r * table_width, context_lens[r],
                           scores + (int64_t)t * (max_ctx + 1), attn + r * nh * D + head * D);
                }
                #pragma omp for schedule(static)
                for (int64_t r = 0; r < rows; r++)
                    quantize_row(attn + r * nh * D, nh * D, q.q + r * nh * D, q.sx + r * (nh * D / GROUP),
                                 q.sum + r * (nh * D / GROUP));
                q4_matmul_shared(&L->o, &q, rows, proj, t, nt);
                #pragma omp barrier
                #pragma omp for schedule(static)
                for (int64_t r = 0; r < rows; r++) {
                    for (int64_t i = 0; i < H; i++) h[r * H + i] += proj[r * H + i];
                    rms_norm(h + r * H, L->post_norm, H, net->eps, x + r * H);
                    quantize_row(x + r * H, H, q.q + r * H, q.sx + r * (H / GROUP), q.sum + r * (H / GROUP));
                }
                q4_matmul_shared(&L->gate_up, &q, rows, gu, t, nt);
                #pragma omp barrier
                #pragma omp for schedule(static)
                for (int64_t r = 0; r < rows; r++) {
                    const float *g = gu + r * 2 * I, *u = g + I;
                    float *a = x + r * I;
                    for (int64_t i = 0; i < I; i++) a[i] = g[i] / (1.f + expf(-g[i])) * u[i];
                    quantize_row(a, I, q.q + r * I, q.sx + r * (I / GROUP), q.sum + r * (I / GROUP));
                }
                q4_matmul_shared(&L->down, &q, rows, proj, t, nt);
                #pragma omp barrier
                #pragma omp for schedule(static)
                for (int64_t r = 0; r < rows; r++)
                    for (int64_t i = 0; i < H; i++) h[r * H + i] += proj[r * H + i];
            }
            #pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; r++) rms_norm(h + r * H, net->final_norm, H, net->eps, h + r * H);
        }
    }
    free(x); free(qkv); free(attn); free(gu); free(proj); free(scores);
    free(q.q); free(q.sx); free(q.sum);
    return ok ? 0 : -1;
}
