/* tokenworks' native CPU kernels: 4-bit matrix products and a whole step (decode rows and prompt chunks) of the
   Llama family.

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
#include <sched.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define GROUP 32
/* Products of fewer activation rows than this read the codes directly (tile_rows, tile4_rows: direct), without
   the widened scratch copy, which only more rows repay. */
#define DIRECT_ROWS 4

/* AVX-512 VNNI's integer dot products on 256-bit registers: byte products for 4-bit weights against 1-3 activation
   rows (see tile4_rows), and a fused multiply-add of int16 pairs (madd2). */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define TW_VNNI 1
#else
#define TW_VNNI 0
#endif

/* AVX512-BF16's dot products (vdpbf16ps): where the CPU has them but no AMX (AMD Zen 4 and 5), products of
   bf16_from or more activation rows multiply in bfloat16 on vectors (bf16_tile), the numbers of the AMX tiles. */
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define TW_BF16 1
#else
#define TW_BF16 0
#endif

/* q0 x0 + q1 x1 over int16 pairs, added into 32-bit lanes: with VNNI a multiply-add and a fused one (vpdpwssd,
   the same wrapping arithmetic), else two multiply-adds and an add. */
static inline __attribute__((always_inline)) __m256i madd2(__m256i q0, __m256i x0, __m256i q1, __m256i x1) {
#if TW_VNNI
    return _mm256_dpwssd_epi32(_mm256_madd_epi16(q0, x0), q1, x1);
#else
    return _mm256_add_epi32(_mm256_madd_epi16(q0, x0), _mm256_madd_epi16(q1, x1));
#endif
}

/* Scales (and minimums) are GGUF's float16 values, laid out for tiles of four weight rows: (ceil(n / 4),
   k / 32, 4), the four rows of a tile side by side per group (a last, partial tile padded with zeros). */
typedef struct {
    int64_t n, k;          /* output rows, inputs (k % 32 == 0) */
    const uint8_t *codes;  /* (n, k / 2) GGUF nibbles */
    const uint16_t *d, *m; /* w = d * q + m, tile-interleaved */
    const float *bias;     /* (n) or NULL */
    const uint8_t *panels; /* AMX layout (amx.c): (ceil(n / 16), k / 32, 256) codes, or NULL */
    const uint16_t *panel_dm; /* (ceil(n / 16), k / 32, 2, 16): each panel's d, then m, per group */
} Q4Mat;

typedef struct {
    int64_t n, k;          /* output rows, inputs (k % 32 == 0) */
    const int8_t *codes;   /* (n, k) GGUF Q8_0 values */
    const uint16_t *d;     /* w = d * q, tile-interleaved */
    const int8_t *panels;  /* AMX layout (amx.c): (ceil(n / 16), k / 32, 512) codes, or NULL */
    const uint16_t *panel_d; /* (ceil(n / 16), k / 32, 16) */
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
    void *kv;                 /* the KV pool; a token's heads and dims contiguous */
    int64_t stride_block, stride_layer, stride_kv, stride_token;  /* in elements */
    int64_t kv_kind;          /* what the pool holds (KV_F32, KV_F16, KV_I8), converted to and from float32 here */
} Net;

/* -- activations ------------------------------------------------------------------------------- */

/* Activation rows quantized per group of 32: int16 values, their scale and exact float sum. Rows are packed
   for the product at hand: row r of k inputs starts at r k values and r k / 32 scales and sums. */
typedef struct {
    int64_t k;     /* the most inputs a row may have */
    int16_t *q;    /* (rows, k) */
    float *sx;     /* (rows, k / 32) */
    float *sum;    /* (rows, k / 32) */
    int16_t *wide; /* (threads, 4 k): each thread's widened weight tile (see tile_rows) */
    uint8_t *lo;   /* with VNNI and under DIRECT_ROWS rows, else NULL: q's low bytes (q & 255), (rows, k), for
                      tile4_rows' byte products */
    int8_t *hi;    /* and its high bytes (q >> 8): q = 256 hi + lo */
    int way;       /* BY_TILES: the int16 values above; BY_AMX, BY_BF16: the rows rounded to bfloat16 instead, into: */
    uint16_t *bf;  /* (rows rounded up to 16, k), laid out as AMX's A tiles (round_groups_bf16) */
    uint16_t *btiles; /* (threads, 2 k / 32, 512): each thread's two dequantized panels */
} QAct;

/* How a product's activation rows are multiplied: as int16 on the tiles below, on AMX tiles (amx.c), or on
   AVX512-BF16 dot products (bf16_tile). */
enum { BY_TILES = 0, BY_AMX = 1, BY_BF16 = 2 };

/* AMX products from this many activation rows (0: never; set by tw_amx_enable), and AVX512-BF16 ones where AMX
   does not take them (tw_bf16_enable). */
static int64_t amx_from = 0, bf16_from = 0;

#if TW_BF16
/* Activation groups [g0, g1) of row r (x: that row, k inputs) rounded to bfloat16 into xb, laid out as AMX's A
   tiles: rows 16 m .. 16 m + 15 of group g make the tile at (m k / 32 + g) 512, row r % 16 of it at 32 (r % 16).
   (Rows k apart in one matrix would map 16 rows of a tile onto a few L1 sets when 2k bytes is a multiple of
   1 KB.) */
static void round_groups_bf16(const float *x, int64_t k, int64_t g0, int64_t g1, uint16_t *xb, int64_t r) {
    uint16_t *row = xb + (r / 16) * (k / GROUP) * 512 + (r % 16) * 32;
    for (int64_t g = g0; g < g1; g++) {
        const __m512 a = _mm512_loadu_ps(x + g * GROUP), b = _mm512_loadu_ps(x + g * GROUP + 16);
        _mm512_storeu_si512(row + g * 512, (__m512i)_mm512_cvtne2ps_pbh(b, a));
    }
}
#endif

#include "amx.c"

static inline float hsum(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_movehdup_ps(a));
    return _mm_cvtss_f32(a);
}

static inline float hmax(__m256 v) {
    __m128 a = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_max_ps(a, _mm_movehl_ps(a, a));
    a = _mm_max_ss(a, _mm_movehdup_ps(a));
    return _mm_cvtss_f32(a);
}

/* Groups [g0, g1) of activation row r (x: that row, k inputs) into q. Values round to nearest (even), as
   lrintf does. */
static void quantize_groups(const float *x, int64_t k, int64_t g0, int64_t g1, const QAct *q, int64_t r) {
#if TW_BF16
    if (q->way != BY_TILES) {
        round_groups_bf16(x, k, g0, g1, q->bf, r);
        return;
    }
#endif
    const int64_t G = k / GROUP;
    const __m256 sign = _mm256_set1_ps(-0.f);
    int16_t *qr = q->q + r * k;
    for (int64_t g = g0; g < g1; g++) {
        const float *p = x + g * GROUP;
        __m256 v[4], mx = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(p + 8 * i);
            mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[i]));
            sum = _mm256_add_ps(sum, v[i]);
        }
        float scale = hmax(mx) / 32767.f, inv = scale > 0.f ? 1.f / scale : 0.f;
        __m256 iv = _mm256_set1_ps(inv);
        __m256i out[2];
        for (int i = 0; i < 2; i++)  /* packs interleaves 128-bit lanes: the permute puts them back in order */
            out[i] = _mm256_permute4x64_epi64(_mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[2 * i], iv)),
                                                                 _mm256_cvtps_epi32(_mm256_mul_ps(v[2 * i + 1], iv))), 0xD8);
        _mm256_storeu_si256((__m256i *)(qr + g * GROUP), out[0]);
        _mm256_storeu_si256((__m256i *)(qr + g * GROUP + 16), out[1]);
#if TW_VNNI
        if (q->lo) {  /* the value's bytes too, for the direct products: q = 256 hi + lo */
            const __m256i byte = _mm256_set1_epi16(0xFF);
            __m256i lo = _mm256_packus_epi16(_mm256_and_si256(out[0], byte), _mm256_and_si256(out[1], byte));
            __m256i hi = _mm256_packs_epi16(_mm256_srai_epi16(out[0], 8), _mm256_srai_epi16(out[1], 8));
            _mm256_storeu_si256((__m256i *)(q->lo + r * k + g * GROUP), _mm256_permute4x64_epi64(lo, 0xD8));
            _mm256_storeu_si256((__m256i *)(q->hi + r * k + g * GROUP), _mm256_permute4x64_epi64(hi, 0xD8));
        }
#endif
        q->sx[r * G + g] = scale;
        q->sum[r * G + g] = hsum(sum);
    }
}

/* -- 4-bit matrix products --------------------------------------------------------------------- */


/* e^x = 2^n e^r with x = n ln2 + r, |r| <= ln2 / 2: ln2 in two parts for the reduction, and e^r's degree-6
   polynomial (the Cephes expf coefficients, r^2 and up; highest first), for exp8 and exp16 alike. */
#define EXP_LN2_HI 0.693359375f
#define EXP_LN2_LO -2.12194440e-4f
static const float EXP_POLY[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f,
                                  1.6666665459e-1f, 5.0000001201e-1f};

/* e^x for 8 floats: 2^n put into the exponent bits. About 2 ulp; x below -87 gives 0 (a softmax's far tail). */
static inline __m256 exp8(__m256 x) {
    const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-87.3365478515625f);
    __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_HI), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_LO), r);
    __m256 p = _mm256_set1_ps(EXP_POLY[0]);
    for (int i = 1; i < 6; i++) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_POLY[i]));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

#ifdef __AVX512F__
/* e^x on 16 floats: exp8's reduction and polynomial, the power of two applied by vscalefps (overflow goes to
   infinity, so no clamp at the top; x below -87.34 gives e^-87.34, float32's smallest normal, where exp8 gives 0:
   no denormals, and -inf would make r NaN). */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.3365478515625f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_HI), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_LO), r);
    __m512 p = _mm512_set1_ps(EXP_POLY[0]);
    for (int i = 1; i < 6; i++) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_POLY[i]));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, n);
}
#endif

/* The largest of n floats, in vectors (a scalar running maximum waits for each compare in turn). */
static float max_of(const float *x, int64_t n) {
    __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + i));
        m1 = _mm256_max_ps(m1, _mm256_loadu_ps(x + i + 8));
    }
    for (; i + 8 <= n; i += 8) m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + i));
    float m = hmax(_mm256_max_ps(m0, m1));
    for (; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}


/* y[i] = e^(x[i] - shift) for n floats; returns their sum. `wide`: 16 at a time where AVX-512 is (prompt steps
   only: 512-bit arithmetic in a decode step measured 3 % slower steps at one row, the clock it costs outweighing
   what it saves there). */
static inline __attribute__((always_inline)) float exp_shifted_as(float *x, int64_t n, float shift, const int wide) {
    __m256 total = _mm256_setzero_ps(), sh = _mm256_set1_ps(shift);
    int64_t i = 0;
#ifdef __AVX512F__
    if (wide) {
        __m512 total16 = _mm512_setzero_ps();
        for (; i + 16 <= n; i += 16) {
            __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), _mm512_set1_ps(shift)));
            _mm512_storeu_ps(x + i, e);
            total16 = _mm512_add_ps(total16, e);
        }
        total = _mm256_add_ps(_mm512_castps512_ps256(total16),
                              _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(total16), 1)));
    }
#endif
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), sh));
        _mm256_storeu_ps(x + i, e);
        total = _mm256_add_ps(total, e);
    }
    float s = hsum(total);
    for (; i < n; i++) {
        x[i] = expf(x[i] - shift);
        s += x[i];
    }
    return s;
}

static float exp_shifted(float *x, int64_t n, float shift) { return exp_shifted_as(x, n, shift, 0); }
static float exp_shifted_wide(float *x, int64_t n, float shift) { return exp_shifted_as(x, n, shift, 1); }

/* a[i] = SiLU(g[i]) * u[i] = g[i] / (1 + e^-g[i]) * u[i]; wide: as for exp_shifted_as */
static void silu_mul(const float *g, const float *u, int64_t n, float *a, int wide) {
    int64_t i = 0;
#ifdef __AVX512F__
    for (; wide && i + 16 <= n; i += 16) {
        __m512 gv = _mm512_loadu_ps(g + i);
        __m512 den = _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv)));
        _mm512_storeu_ps(a + i, _mm512_mul_ps(_mm512_div_ps(gv, den), _mm512_loadu_ps(u + i)));
    }
#endif
    for (; i + 8 <= n; i += 8) {
        __m256 gv = _mm256_loadu_ps(g + i);
        __m256 den = _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv)));
        _mm256_storeu_ps(a + i, _mm256_mul_ps(_mm256_div_ps(gv, den), _mm256_loadu_ps(u + i)));
    }
    for (; i < n; i++) a[i] = g[i] / (1.f + expf(-g[i])) * u[i];
}

static inline float half(uint16_t h) { return _cvtsh_ss(h); }

static void halves_to_floats(const uint16_t *h, int64_t n, float *f) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
    for (; i < n; i++) f[i] = half(h[i]);
}

/* nr (<= 4) weight rows, widened to int16 in `wide` (nr * k values, L1-resident), against every activation row:
   each row then costs loads and multiply-adds only. d and m: the tile's scales and minimums (tile-interleaved, 4
   per group); m may be NULL (Q8_0). Direct: the rows' Q8_0 codes (`codes8`, k bytes apart) widened in registers
   as they are loaded instead, for 1-3 activation rows, which do not repay the scratch copy's store and load per
   code (2026-11-29, an AVX-512 machine: the output matrix at one row 0.48x the time). */
static inline __attribute__((always_inline)) void tile_rows(const int16_t *wide, const int8_t *codes8,
                                                            const uint16_t *d, const uint16_t *m, int64_t k,
                                                            const QAct *x, int64_t rows, float *y, int64_t ldy,
                                                            int64_t n, const int nr, const int direct) {
    const int64_t G = k / GROUP;
    float dt[4 * G], mt[4 * G];  /* converted once for all activation rows */
    halves_to_floats(d, 4 * G, dt);
    if (m) halves_to_floats(m, 4 * G, mt);
    for (int64_t r = 0; r < rows; r++) {
        const int16_t *xq = x->q + r * k;
        const float *sx = x->sx + r * G, *sum = x->sum + r * G;
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        float mins[4] = {0.f, 0.f, 0.f, 0.f};
        for (int64_t g = 0; g < G; g++) {
            __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + g * GROUP));
            __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + g * GROUP + 16));
            for (int j = 0; j < nr; j++) {
                __m256i q0, q1;
                if (direct) {
                    const int8_t *c = codes8 + j * k + g * GROUP;
                    q0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)c));
                    q1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(c + 16)));
                } else {
                    q0 = _mm256_loadu_si256((const __m256i *)(wide + j * k + g * GROUP));
                    q1 = _mm256_loadu_si256((const __m256i *)(wide + j * k + g * GROUP + 16));
                }
                __m256i s = madd2(q0, x0, q1, x1);
                acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(dt[4 * g + j] * sx[g]), _mm256_cvtepi32_ps(s), acc[j]);
                if (m) mins[j] += mt[4 * g + j] * sum[g];
            }
        }
        for (int j = 0; j < nr; j++) y[r * ldy + n + j] = hsum(acc[j]) + mins[j];
    }
}

/* tile_rows for four 4-bit weight rows (with minimums), with the float work of a group done once for all four:
   the four rows' integer sums are reduced into one register ([rows 0-3, lanes 0-3 | rows 0-3, lanes 4-7]) and
   scaled there, and the minimums' term is accumulated four rows at a time beside it. The codes come widened
   (`wide`, 4 k int16), or (direct) as the GGUF's nibbles (`codes`, rows rb bytes apart), widened in registers as
   they are loaded: the scratch copy costs a store and a load per code, which 1-3 activation rows do not repay.
   (With VNNI, 1-3 rows take tile4_bytes instead.) */
static inline __attribute__((always_inline)) void tile4_rows(const int16_t *wide, const uint8_t *codes, int64_t rb,
                                                             const uint16_t *d, const uint16_t *m, int64_t k,
                                                             const QAct *x, int64_t rows, float *y, int64_t ldy,
                                                             int64_t n, const int direct) {
    const int64_t G = k / GROUP;
    const __m128i low = _mm_set1_epi8(0x0F);
    for (int64_t r = 0; r < rows; r++) {
        const int16_t *xq = x->q + r * k;
        const float *sx = x->sx + r * G, *sum = x->sum + r * G;
        __m256 acc = _mm256_setzero_ps();
        __m128 acc_m = _mm_setzero_ps();
        for (int64_t g = 0; g < G; g++) {
            __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + g * GROUP));
            __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + g * GROUP + 16));
            __m256i s[4];
            for (int j = 0; j < 4; j++) {
                __m256i q0, q1;
                if (direct) {
                    const __m128i b = _mm_loadu_si128((const __m128i *)(codes + j * rb + g * 16));
                    q0 = _mm256_cvtepu8_epi16(_mm_and_si128(b, low));
                    q1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(b, 4), low));
                } else {
                    q0 = _mm256_loadu_si256((const __m256i *)(wide + j * k + g * GROUP));
                    q1 = _mm256_loadu_si256((const __m256i *)(wide + j * k + g * GROUP + 16));
                }
                s[j] = madd2(q0, x0, q1, x1);
            }
            __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(s[0], s[1]), _mm256_hadd_epi32(s[2], s[3]));
            __m128 d4 = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(d + 4 * g)));
            __m256 scale = _mm256_mul_ps(_mm256_set_m128(d4, d4), _mm256_set1_ps(sx[g]));
            acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(h), acc);
            acc_m = _mm_fmadd_ps(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(m + 4 * g))), _mm_set1_ps(sum[g]), acc_m);
        }
        __m128 out = _mm_add_ps(_mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1)), acc_m);
        _mm_storeu_ps(y + r * ldy + n, out);
    }
}

#if TW_VNNI
/* tile4_rows' direct way with VNNI, without widening at all: each activation value q is kept as its bytes too (q =
   256 hi + lo, QAct.lo/.hi), and a group's 32 nibbles (one 16-byte load in both halves of a register, the upper
   half shifted by 4) are multiplied as bytes against them, q c = 256 (hi c) + lo c, with two vpdpbusd: exactly the
   int16 products' sums, without the shuffles that widening takes (2026-11-29: a step of 1 / 2 / 3 rows 0.92 / 0.87
   / 0.89x the time). The groups are the outer loop and the 1-3 activation rows the inner one, so a group's nibbles
   are unpacked once for all the rows (2026-11-30, a Zen 5: a step of 2 / 3 rows 0.88-0.90 / 0.87-0.90x the time of
   rows outside, 1 row the same). A row's result must not depend on its neighbours, yet each row count is compiled
   on its own and the flags allow reassociation, which ordered a row's multiplications and last additions one way
   for one row count and another for another (1 ulp apart): the scale and the halves' sum pass through `pin`, which
   the compiler cannot see into, so every row count computes d sx, its products and its sums in the same order. */
static inline __attribute__((always_inline)) __m256 pin(__m256 v) {
    __asm__("" : "+x"(v));
    return v;
}
static inline __attribute__((always_inline)) __m128 pin128(__m128 v) {
    __asm__("" : "+x"(v));
    return v;
}
static inline __attribute__((always_inline)) void tile4_bytes(const uint8_t *codes, int64_t rb, const uint16_t *d,
                                                              const uint16_t *m, int64_t k, const QAct *x,
                                                              const int rows, float *y, int64_t ldy, int64_t n) {
    const int64_t G = k / GROUP;
    const __m256i shift = _mm256_set_epi64x(4, 4, 0, 0), nibble = _mm256_set1_epi8(0x0F);
    __m256 acc[3];
    __m128 acc_m[3];
    for (int r = 0; r < rows; r++) {
        acc[r] = _mm256_setzero_ps();
        acc_m[r] = _mm_setzero_ps();
    }
    for (int64_t g = 0; g < G; g++) {
        __m256i c[4];
        for (int j = 0; j < 4; j++) {
            const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(codes + j * rb + g * 16)));
            c[j] = _mm256_and_si256(_mm256_srlv_epi64(b, shift), nibble);
        }
        const __m128 d4 = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(d + 4 * g)));
        const __m128 m4 = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(m + 4 * g)));
        const __m256 d8 = _mm256_set_m128(d4, d4);
        for (int r = 0; r < rows; r++) {
            const __m256i lo = _mm256_loadu_si256((const __m256i *)(x->lo + r * k + g * GROUP));
            const __m256i hi = _mm256_loadu_si256((const __m256i *)(x->hi + r * k + g * GROUP));
            __m256i s[4];
            for (int j = 0; j < 4; j++)
                s[j] = _mm256_dpbusd_epi32(_mm256_slli_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), c[j], hi), 8), lo, c[j]);
            const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(s[0], s[1]), _mm256_hadd_epi32(s[2], s[3]));
            const __m256 scale = pin(_mm256_mul_ps(d8, _mm256_set1_ps(x->sx[r * G + g])));
            acc[r] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(h), acc[r]);
            acc_m[r] = _mm_fmadd_ps(m4, _mm_set1_ps(x->sum[r * G + g]), acc_m[r]);
        }
    }
    for (int r = 0; r < rows; r++) {
        const __m128 halves = pin128(_mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1)));
        _mm_storeu_ps(y + r * ldy + n, _mm_add_ps(halves, acc_m[r]));
    }
}
#endif

/* Weight rows [n, n + nr) against every activation row, their codes widened (nr rows of k int16) into `wide`. */
static void tile(const int16_t *wide, const uint16_t *d, const uint16_t *m, int64_t k, const QAct *x, int64_t rows,
                 float *y, int64_t ldy, int64_t n, int nr) {
    if (nr == 4 && m)  /* measured: only with minimums (Q8_0 lost 10 % that way) */
        tile4_rows(wide, NULL, 0, d, m, k, x, rows, y, ldy, n, 0);
    else if (nr == 4)
        tile_rows(wide, NULL, d, m, k, x, rows, y, ldy, n, 4, 0);  /* unrolled */
    else
        tile_rows(wide, NULL, d, m, k, x, rows, y, ldy, n, nr, 0);
}

/* Ask for the codes about 9 KB ahead of a row being widened (`bytes` long): with one activation row the products
   wait on memory, and the hardware's prefetcher alone left them 5-7 % slower (measured paired, 16 and 32 rows
   ahead; 4.5 KB ahead gained less). A prefetch past the matrix's end is harmless: prefetches never fault. */
#define PREFETCH_BYTES 9216
static inline void prefetch_ahead(const void *row, int64_t bytes) {
    const char *p = (const char *)row + PREFETCH_BYTES / bytes * bytes;
    for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(p + i, _MM_HINT_T0);
}

static void widen_q4(const Q4Mat *w, int64_t n, int nr, int16_t *wide) {
    const int64_t G = w->k / GROUP, rb = w->k / 2;
    const __m128i low = _mm_set1_epi8(0x0F);
    for (int j = 0; j < nr; j++) {
        prefetch_ahead(w->codes + (n + j) * rb, rb);
        for (int64_t g = 0; g < G; g++) {
            __m128i b = _mm_loadu_si128((const __m128i *)(w->codes + (n + j) * rb + g * 16));
            int16_t *dst = wide + j * w->k + g * GROUP;
            _mm256_storeu_si256((__m256i *)dst, _mm256_cvtepu8_epi16(_mm_and_si128(b, low)));
            _mm256_storeu_si256((__m256i *)(dst + 16), _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(b, 4), low)));
        }
    }
}

static void widen_q8(const Q8Mat *w, int64_t n, int nr, int16_t *wide) {
    for (int j = 0; j < nr; j++) {
        const int8_t *row = w->codes + (n + j) * w->k;
        prefetch_ahead(row, w->k);
        for (int64_t i = 0; i < w->k; i += 16)
            _mm256_storeu_si256((__m256i *)(wide + j * w->k + i), _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(row + i))));
    }
}

/* Four 4-bit weight rows from n against 1-3 activation rows, their nibbles widened in registers (tile4_rows). */
static void q4_tile4_direct(const Q4Mat *w, int64_t n, const QAct *x, int64_t rows, float *y, int64_t ldy) {
    const int64_t G = w->k / GROUP, rb = w->k / 2;
    for (int j = 0; j < 4; j++) prefetch_ahead(w->codes + (n + j) * rb, rb);
#if TW_VNNI
    const uint8_t *c = w->codes + n * rb;
    const uint16_t *d = w->d + n * G, *m = w->m + n * G;
    if (rows == 1) tile4_bytes(c, rb, d, m, w->k, x, 1, y, ldy, n);  /* constant row counts: unrolled */
    else if (rows == 2) tile4_bytes(c, rb, d, m, w->k, x, 2, y, ldy, n);
    else if (rows == 3) tile4_bytes(c, rb, d, m, w->k, x, 3, y, ldy, n);  /* (a product may have no rows) */
#else
    tile4_rows(NULL, w->codes + n * rb, rb, w->d + n * G, w->m + n * G, w->k, x, rows, y, ldy, n, 1);
#endif
}

/* Rows [n0, n1) of y = x W^T (+ bias) for `rows` activation rows; y has row stride ldy. Weight rows go four at
   a time (four independent accumulators), widened once into `wide` (4 k int16, this thread's) and used for every
   activation row while in L1 (1-3 activation rows: widened in registers instead, q4_tile4_direct). */
static void q4_rows(const Q4Mat *w, const QAct *x, int64_t rows, float *y, int64_t ldy, int64_t n0, int64_t n1,
                    int16_t *wide) {
    const int64_t G = w->k / GROUP;
    for (int64_t n = n0; n < n1; n += 4) {
        const int nr = n1 - n < 4 ? (int)(n1 - n) : 4;
        if (nr == 4 && rows < DIRECT_ROWS) {
            q4_tile4_direct(w, n, x, rows, y, ldy);
            continue;
        }
        widen_q4(w, n, nr, wide);
        tile(wide, w->d + n * G, w->m + n * G, w->k, x, rows, y, ldy, n, nr);  /* tile n / 4 starts at 4 G (n / 4) */
    }
    if (w->bias)
        for (int64_t r = 0; r < rows; r++)
            for (int64_t j = n0; j < n1; j++) y[r * ldy + j] += w->bias[j];
}

#if TW_BF16
/* -- products on AVX512-BF16 dot products (vdpbf16ps) ------------------------------------------ */

/* Four weight rows from n (nr of them; the rest of the tile zeros) dequantized into `wide` as bfloat16, row-major
   (4 k): w = d q + m for Q4 (`codes` GGUF's nibbles, k / 2 bytes a row), d q for Q8_0 (`codes8`, k bytes a row;
   m NULL), in float32 (one fused multiply-add; Q8_0 a multiply) and rounded to nearest even: the numbers AMX's
   panels and tw_q4_dequantize give. A 4-bit group's 16 possible values are made once and each code looks its value
   up (vpermw), instead of converting and scaling 32 codes (2026-11-30, a Zen 5: decode steps of 4 / 8 / 16 rows
   0.96x the time, the same bits). d and m: the tile's, interleaved 4 per group. */
static void dequantize_tile_bf16(const uint8_t *codes, const int8_t *codes8, const uint16_t *d, const uint16_t *m,
                                 int64_t k, int nr, uint16_t *wide) {
    const int64_t G = k / GROUP;
    const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m256i nibble = _mm256_set1_epi16(0x0F);
    for (int j = 0; j < 4; j++) {
        uint16_t *row = wide + j * k;
        if (j >= nr) {
            memset(row, 0, k * sizeof(uint16_t));
            continue;
        }
        for (int64_t g = 0; g < G; g++) {
            const __m512 dd = _mm512_set1_ps(half(d[4 * g + j])), mm = _mm512_set1_ps(m ? half(m[4 * g + j]) : 0.f);
            if (codes8) {
                const int8_t *c = codes8 + j * k + g * GROUP;
                const __m512 va = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)c))), dd);
                const __m512 vb = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(c + 16)))), dd);
                _mm512_storeu_si512(row + g * GROUP, (__m512i)_mm512_cvtne2ps_pbh(vb, va));
                continue;
            }
            /* 4-bit: the group's 16 possible weights d q + m, rounded to bfloat16, looked up by code (vpermw) */
            const __m512i table = _mm512_zextsi256_si512((__m256i)_mm512_cvtneps_pbh(_mm512_fmadd_ps(iota, dd, mm)));
            const __m256i c = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(codes + j * (k / 2) + g * 16)));
            const __m512i idx = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(c, nibble)),
                                                   _mm256_srli_epi16(c, 4), 1);  /* inputs 0-15 | 16-31 */
            _mm512_storeu_si512(row + g * GROUP, _mm512_permutexvar_epi16(idx, table));
        }
    }
}

/* The four weight rows in `wide` (4 k bfloat16) against every activation row (x->bf, AMX's A-tile layout, rows
   padded with zeros to 16), four activation rows at a time: 16 float32 accumulators, one vdpbf16ps per group of
   32 inputs per (activation row, weight row), each sum reduced once at the end. Columns [n, n + nr) of y.
   (2026-11-29, a Zen 5 machine: against the int16 tiles on one core, 0.69 / 0.52 / 0.42 / 0.37x the time at 4 / 8
   / 16 / 32 rows; two activation rows at a time 0.78-0.46x.) */
static void bf16_tile(const uint16_t *wide, int64_t k, const QAct *x, int64_t rows, float *y, int64_t ldy, int64_t n,
                      int nr) {
    const int64_t G = k / GROUP;
    for (int64_t r = 0; r < rows; r += 4) {
        const uint16_t *xr = x->bf + (r / 16) * G * 512 + (r % 16) * 32;  /* r's four rows share a 16-row block */
        __m512 acc[4][4];
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 4; j++) acc[i][j] = _mm512_setzero_ps();
        for (int64_t g = 0; g < G; g++) {
            __m512bh xv[4];
            for (int i = 0; i < 4; i++) xv[i] = (__m512bh)_mm512_loadu_si512(xr + g * 512 + i * 32);
            for (int j = 0; j < 4; j++) {
                const __m512bh wv = (__m512bh)_mm512_loadu_si512(wide + j * k + g * GROUP);
                for (int i = 0; i < 4; i++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv[i], wv);
            }
        }
        for (int i = 0; i < 4 && r + i < rows; i++)
            for (int j = 0; j < nr; j++) y[(r + i) * ldy + n + j] = _mm512_reduce_add_ps(acc[i][j]);
    }
}

/* Rows [n0, n1) of y = x W^T (+ bias) for a Q4 W, on AVX512-BF16 (x->way BY_BF16), a tile of four weight rows
   dequantized into `wide` (this thread's) at a time. */
static void q4_rows_bf16(const Q4Mat *w, const QAct *x, int64_t rows, float *y, int64_t ldy, int64_t n0, int64_t n1,
                         uint16_t *wide) {
    const int64_t G = w->k / GROUP, rb = w->k / 2;
    for (int64_t n = n0; n < n1; n += 4) {
        const int nr = n1 - n < 4 ? (int)(n1 - n) : 4;
        for (int j = 0; j < nr; j++) prefetch_ahead(w->codes + (n + j) * rb, rb);
        dequantize_tile_bf16(w->codes + n * rb, NULL, w->d + n * G, w->m + n * G, w->k, nr, wide);
        bf16_tile(wide, w->k, x, rows, y, ldy, n, nr);
    }
    if (w->bias)
        for (int64_t r = 0; r < rows; r++)
            for (int64_t j = n0; j < n1; j++) y[r * ldy + j] += w->bias[j];
}
#endif

static int16_t *wide_of(const QAct *q, int t) { return q->wide + (int64_t)t * 4 * q->k; }

/* The share of weight rows (multiples of 4) of thread `t` of `nt`. */
static void share(int64_t n, int t, int nt, int64_t *a, int64_t *b) {
    int64_t tiles = (n + 3) / 4, per = tiles / nt, extra = tiles % nt;
    int64_t lo = t * per + (t < extra ? t : extra), hi = lo + per + (t < extra);
    *a = lo * 4 < n ? lo * 4 : n;
    *b = hi * 4 < n ? hi * 4 : n;
}

/* Each thread works through its own share of a product's weight rows in order, CHUNK_ROWS at a time, and then
   takes chunks left in the others' shares: a thread that loses its core to another process for a while (the
   router, the client, a neighbour) has its rows done by the others instead of holding them all up at the next
   barrier. Shares stay contiguous, so the codes stream in order and the prefetch ahead lands on the rows the
   thread reads next. One counter of rows taken per share, on a cache line of its own. */
#define CHUNK_ROWS 16
#define COUNTER_STRIDE 8 /* int64s: 64 bytes */

static int claim(int64_t *taken, int64_t n, int64_t chunk, int t, int nt, int64_t *a, int64_t *b) {
    for (int i = 0; i < nt; i++) {
        const int owner = (t + i) % nt;
        int64_t lo, hi;
        share(n, owner, nt, &lo, &hi);
        int64_t *c = taken + owner * COUNTER_STRIDE;
        if (__atomic_load_n(c, __ATOMIC_RELAXED) >= hi - lo) continue;
        const int64_t got = __atomic_fetch_add(c, chunk, __ATOMIC_RELAXED);
        if (got < hi - lo) {
            *a = lo + got;
            *b = lo + got + chunk < hi ? lo + got + chunk : hi;
            return 1;
        }
    }
    return 0;
}

#if TW_AMX
/* The AMX product of `rows` rows (x rounded to bfloat16): threads claim panels of 16 weight rows, two at a time. */
static void amx_matmul_shared(const AmxMat *w, const QAct *x, int64_t rows, float *y, int t, int nt, int64_t *taken) {
    const int64_t panels = (w->n + 15) / 16, mp = (rows + 15) / 16 * 16;
    uint16_t *btiles = x->btiles + (int64_t)t * 2 * (x->k / GROUP) * 512;
    int64_t a, b;
    while (claim(taken, panels, 2, t, nt, &a, &b)) amx_panels(w, x->bf, mp, rows, y, w->n, a, b, btiles);
}
#endif

/* Called inside a parallel region by every thread; `taken`: nt zeroed counters (see claim) for this product. */
static void q4_matmul_shared(const Q4Mat *w, const QAct *x, int64_t rows, float *y, int t, int nt, int64_t *taken) {
    int64_t a, b;
#if TW_AMX
    if (x->way == BY_AMX) {
        const AmxMat m = {w->n, w->k, w->panels, w->panel_dm, w->bias, 0};
        amx_matmul_shared(&m, x, rows, y, t, nt, taken);
        return;
    }
#endif
#if TW_BF16
    if (x->way == BY_BF16) {
        while (claim(taken, w->n, CHUNK_ROWS, t, nt, &a, &b))
            q4_rows_bf16(w, x, rows, y, w->n, a, b, (uint16_t *)wide_of(x, t));
        return;
    }
#endif
    while (claim(taken, w->n, CHUNK_ROWS, t, nt, &a, &b)) q4_rows(w, x, rows, y, w->n, a, b, wide_of(x, t));
}

static void thread_ids(int *t, int *nt) {
    *t = 0;
    *nt = 1;
#ifdef _OPENMP
    *t = omp_get_thread_num();
    *nt = omp_get_num_threads();
#endif
}

static void qact_free(QAct *q) {
    free(q->q); free(q->sx); free(q->sum); free(q->wide); free(q->lo); free(q->hi); free(q->bf); free(q->btiles);
}

/* Buffers for `rows` activation rows of up to k inputs, and a widened tile for each of `threads` threads (for
   AMX products, `way` BY_AMX: bfloat16 rows and a panel for each thread instead; BY_BF16: bfloat16 rows and a
   tile); 0 if out of memory (then nothing is held). */
static int qact_alloc(int64_t rows, int64_t k, int threads, int way, QAct *q) {
    memset(q, 0, sizeof *q);
    q->k = k;
    q->way = way;
    if (way != BY_TILES) {
        q->bf = calloc((rows + 15) / 16 * 16 * k, sizeof(uint16_t));  /* the padding rows stay zero */
        if (way == BY_AMX)
            q->btiles = aligned_alloc(64, (size_t)threads * 2 * (k / GROUP) * 512 * sizeof(uint16_t));
        else
            q->wide = aligned_alloc(64, (size_t)threads * 4 * k * sizeof(int16_t));
        if (q->bf && (q->btiles || q->wide)) return 1;
    } else {
        q->q = malloc(rows * k * sizeof(int16_t));
        q->sx = malloc(rows * (k / GROUP) * sizeof(float));
        q->sum = malloc(rows * (k / GROUP) * sizeof(float));
        q->wide = malloc((size_t)threads * 4 * k * sizeof(int16_t));
        const int bytes = TW_VNNI && rows < DIRECT_ROWS;  /* only the direct products read them */
        q->lo = bytes ? malloc(rows * k) : NULL;
        q->hi = bytes ? malloc(rows * k) : NULL;
        if (q->q && q->sx && q->sum && q->wide && (!bytes || (q->lo && q->hi))) return 1;
    }
    qact_free(q);
    return 0;
}

/* `rows` activation rows of k inputs (x, packed), quantized (or rounded, `way` not BY_TILES); 0 if out of
   memory. */
static int qact_from(const float *x, int64_t rows, int64_t k, int threads, int way, QAct *q) {
    if (!qact_alloc(rows, k, threads, way, q)) return 0;
    for (int64_t r = 0; r < rows; r++) quantize_groups(x + r * k, k, 0, k / GROUP, q, r);
    return 1;
}

/* Products of `from` or more activation rows on AMX from now on (0: never); 1 if this CPU and build can. */
int tw_amx_enable(int64_t from) {
    if (!TW_AMX || !tw_amx_init()) return 0;
    amx_from = from;
    return 1;
}

/* Whether a product of `rows` rows runs on AMX: the CPU has it, the process may use it, W has its `panels`. */
static int use_amx(const void *panels, int64_t rows) {
    return TW_AMX && amx_from > 0 && rows >= amx_from && panels != NULL;
}

/* Products of `from` or more activation rows that AMX does not take on AVX512-BF16 from now on (0: never); 1 if
   this build can. */
int tw_bf16_enable(int64_t from) {
    if (!TW_BF16) return 0;
    bf16_from = from;
    return 1;
}

/* How a product of `rows` rows of a W with these AMX `panels` (or NULL) runs. */
static int way_of(const void *panels, int64_t rows) {
    if (use_amx(panels, rows)) return BY_AMX;
    return TW_BF16 && bf16_from > 0 && rows >= bf16_from ? BY_BF16 : BY_TILES;
}

/* y (rows, n) = x (rows, k) W^T + bias, float32 in and out, on `threads` threads. */
int tw_q4_matmul(const Q4Mat *w, const float *x, int64_t rows, float *y, int threads) {
    QAct q;
    const int way = way_of(w->panels, rows), amx = way == BY_AMX;
    if (!qact_from(x, rows, w->k, threads, way, &q)) return -1;
    int64_t *taken = calloc(threads * COUNTER_STRIDE, sizeof(int64_t));
    if (!taken) { qact_free(&q); return -1; }
    #pragma omp parallel num_threads(threads)
    {
        int t, nt;
        thread_ids(&t, &nt);
        if (amx) amx_configure();  /* each thread loads the tile configuration, and lets it go after */
        q4_matmul_shared(w, &q, rows, y, t, nt, taken);
        if (amx) amx_release();
    }
    free(taken);
    qact_free(&q);
    return 0;
}

/* Eight float32 values rounded to bfloat16 (to nearest, ties to even; no NaNs here), in the low 16 bits of each lane. */
static inline __m256i bf16_bits(__m256 v) {
    __m256i b = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd)), 16);
}

/* Sixteen float32 values (a, then b) stored as bfloat16. */
static inline void store_bf16(uint16_t *dst, __m256 a, __m256 b) {
    __m256i packed = _mm256_packus_epi32(bf16_bits(a), bf16_bits(b));  /* per 128-bit lane: a0-3 b0-3 a4-7 b4-7 */
    _mm256_storeu_si256((__m256i *)dst, _mm256_permute4x64_epi64(packed, 0xD8));
}

/* W (n, k) written out as the numbers the products use, w = d q + m (in float32, from GGUF's float16 d and m),
   row-major: float32 (`bf16` 0) or rounded to bfloat16 (`bf16` 1). For products of many activation rows, which a
   BLAS (oneDNN, with AMX where the CPU has it) does faster on the whole matrix than the tiles above. */
void tw_q4_dequantize(const Q4Mat *w, void *out, int bf16, int threads) {
    const int64_t G = w->k / GROUP, rb = w->k / 2;
    const __m128i low = _mm_set1_epi8(0x0F);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < w->n; r++) {
        const uint16_t *dr = w->d + (r / 4) * 4 * G + r % 4, *mr = w->m + (r / 4) * 4 * G + r % 4;
        for (int64_t g = 0; g < G; g++) {
            const __m256 d = _mm256_set1_ps(half(dr[4 * g])), m = _mm256_set1_ps(half(mr[4 * g]));
            const __m128i b = _mm_loadu_si128((const __m128i *)(w->codes + r * rb + g * 16));
            const __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
            __m256 v[4];
            const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
            for (int i = 0; i < 4; i++)
                v[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i])), d, m);
            const int64_t at = r * w->k + g * GROUP;
            if (bf16) {
                store_bf16((uint16_t *)out + at, v[0], v[1]);
                store_bf16((uint16_t *)out + at + 16, v[2], v[3]);
            } else {
                for (int i = 0; i < 4; i++) _mm256_storeu_ps((float *)out + at + 8 * i, v[i]);
            }
        }
    }
}

/* Rows [n, n + nr) of a Q8_0 W against 1-3 activation rows, the codes widened in registers (tile_rows, direct). */
static void q8_rows_direct(const Q8Mat *w, const QAct *x, int64_t rows, float *y, int64_t ldy, int64_t n, int nr) {
    const int64_t k = w->k, G = k / GROUP;
    for (int j = 0; j < nr; j++) prefetch_ahead(w->codes + (n + j) * k, k);
    tile_rows(NULL, w->codes + n * k, w->d + n * G, NULL, k, x, rows, y, ldy, n, nr, 1);
}

/* y (rows, n) = x (rows, k) W^T for a Q8_0 W, float32 in and out, on `threads` threads. */
int tw_q8_matmul(const Q8Mat *w, const float *x, int64_t rows, float *y, int threads) {
    const int64_t G = w->k / GROUP;
    const int way = way_of(w->panels, rows), amx = way == BY_AMX;
    QAct q;
    if (!qact_from(x, rows, w->k, threads, way, &q)) return -1;
    int64_t *taken = calloc(threads * COUNTER_STRIDE, sizeof(int64_t));
    if (!taken) { qact_free(&q); return -1; }
    #pragma omp parallel num_threads(threads)
    {
        int t, nt;
        thread_ids(&t, &nt);
        if (amx) {
#if TW_AMX
            const AmxMat m = {w->n, w->k, (const uint8_t *)w->panels, w->panel_d, NULL, 1};
            amx_configure();
            amx_matmul_shared(&m, &q, rows, y, t, nt, taken);
            amx_release();
#endif
        } else {
            int64_t a, b;
            int16_t *wide = wide_of(&q, t);
            while (claim(taken, w->n, CHUNK_ROWS, t, nt, &a, &b))
                for (int64_t n = a; n < b; n += 4) {
                    const int nr = b - n < 4 ? (int)(b - n) : 4;
#if TW_BF16
                    if (way == BY_BF16) {
                        for (int j = 0; j < nr; j++) prefetch_ahead(w->codes + (n + j) * w->k, w->k);
                        dequantize_tile_bf16(NULL, w->codes + n * w->k, w->d + n * G, NULL, w->k, nr, (uint16_t *)wide);
                        bf16_tile((uint16_t *)wide, w->k, &q, rows, y, w->n, n, nr);
                        continue;
                    }
#endif
                    if (rows < DIRECT_ROWS) {
                        q8_rows_direct(w, &q, rows, y, w->n, n, nr);
                        continue;
                    }
                    widen_q8(w, n, nr, wide);
                    tile(wide, w->d + n * G, NULL, w->k, &q, rows, y, w->n, n, nr);
                }
        }
    }
    free(taken);
    qact_free(&q);
    return 0;
}

/* -- the step ---------------------------------------------------------------------------------- */

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

/* What the KV pool holds: float32, float16, or int8 (kv_cache.py): a head row of D signed bytes x / s and then its
   scale s = max |x| / 127 as a float32 (KV_SCALE_BYTES), so that x = s q. Code reading an int8 pool widens the
   bytes q and applies each row's scale where it is cheapest (to a token's score, to its weight, or to the row). */
enum { KV_F32 = 0, KV_F16 = 1, KV_I8 = 2 };
#define KV_SCALE_BYTES 4

/* Bytes of one element of the pool, and of one head row (D values, and an int8 row's scale). */
static inline int64_t kv_elem(int kind) { return kind == KV_F32 ? 4 : kind == KV_F16 ? 2 : 1; }
static inline int64_t head_bytes(int64_t D, int kind) { return kind == KV_I8 ? D + KV_SCALE_BYTES : D * kv_elem(kind); }

/* The scale of the head row at `row` (1 unless the pool holds int8). */
static inline float row_scale(const void *row, int64_t D, int kind) {
    float s = 1.f;
    if (kind == KV_I8) memcpy(&s, (const char *)row + D, sizeof s);
    return s;
}

/* Where a token's K (which 0) or V (1) of a layer starts, as net->kv_kind lays the pool out. */
static void *kv_at(const Net *net, int64_t layer, int which, int64_t block, int64_t offset) {
    return (char *)net->kv + (block * net->stride_block + layer * net->stride_layer + which * net->stride_kv +
                              offset * net->stride_token) * kv_elem(net->kv_kind);
}

/* Eight K or V values from element i of a pool row, as float32 (an int8 row's without its scale). */
static inline __attribute__((always_inline)) __m256 load8_kv(const void *p, int64_t i, const int kind) {
    if (kind == KV_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
    if (kind == KV_I8)
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)p + i))));
    return _mm256_loadu_ps((const float *)p + i);
}

/* load8_kv times the row's scale on an int8 pool (row_scale; the other pools' values as they are). */
static inline __attribute__((always_inline)) __m256 load8_scaled(const void *p, int64_t i, const int kind, __m256 scale) {
    const __m256 x = load8_kv(p, i, kind);
    return kind == KV_I8 ? _mm256_mul_ps(x, scale) : x;
}

/* A head row of n (a multiple of 8) float32 values into the pool at p: as they are, rounded to the nearest float16
   (even on a tie), or quantized as kv_cache.store_rows does (the same float32 divisions, ties to even). */
static void store_kv(void *p, const float *x, int64_t n, int kind) {
    if (kind == KV_F32) {
        memcpy(p, x, n * sizeof(float));
    } else if (kind == KV_F16) {
        for (int64_t i = 0; i < n; i += 8)
            _mm_storeu_si128((__m128i *)((uint16_t *)p + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    } else {
        __m256 top = _mm256_setzero_ps();
        for (int64_t i = 0; i < n; i += 8) top = _mm256_max_ps(top, _mm256_andnot_ps(_mm256_set1_ps(-0.f), _mm256_loadu_ps(x + i)));
        const float s = hmax(top) / 127.f;
        const __m256 by = _mm256_set1_ps(s > 0.f ? s : 1.f);
        int8_t *q = p;
        for (int64_t i = 0; i < n; i += 8) {
            const __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + i), by),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            const __m256i v = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, _mm256_set1_ps(-127.f)),
                                                               _mm256_set1_ps(127.f)));
            const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
            _mm_storel_epi64((__m128i *)(q + i), _mm_packs_epi16(w, w));
        }
        memcpy(q + n, &s, sizeof s);
    }
}

static inline __attribute__((always_inline)) float dot1(const float *q, const void *k, int64_t D, const int kind) {
    __m256 a = _mm256_setzero_ps();
    for (int64_t i = 0; i < D; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8_kv(k, i, kind), a);
    return hsum(a);
}

/* o[0 .. 8) += sum over n tokens of p[t] v[t] (v: the tokens' first value, `stride` elements apart): a head's
   last values when D is not a multiple of weigh_heads' width. */
static inline __attribute__((always_inline)) void weigh8(const float *p, const void *v, int64_t stride, int64_t n,
                                                         float *o, const int kind) {
    __m256 acc = _mm256_loadu_ps(o);
    for (int64_t t = 0; t < n; t++) acc = _mm256_fmadd_ps(_mm256_set1_ps(p[t]), load8_kv(v, t * stride, kind), acc);
    _mm256_storeu_ps(o, acc);
}

/* Lines of the next block's keys or values to ask for ahead of their use (the blocks of a row lie anywhere in the
   pool, so the hardware's prefetcher cannot follow the walk): the block's lines are rows of row_lines lines,
   `stride` bytes apart, from x. Each product of a block asks for its share of them a few at a time between its
   own loads: asked all at once, they fill the core's miss buffers and the products wait behind them, so the
   memory's time and the arithmetic's add up instead of overlapping (a 32 x 512-token step's attention took
   1.6x as long). x NULL: nothing to ask for. */
typedef struct {
    const char *x;
    int64_t stride, row_lines;
    int64_t row, col, left, per; /* the next line to ask for, how many are left, how many at each step */
} Ahead;

/* The c-th of `calls` products of a block gets an equal share of its `lines` lines, asked for over `steps`
   steps. */
static inline Ahead ahead_share(const char *x, int64_t stride, int64_t row_lines, int64_t lines, int64_t c,
                                int64_t calls, int64_t steps) {
    const int64_t a = x ? c * lines / calls : 0, b = x ? (c + 1) * lines / calls : 0;
    Ahead p = {x, stride, row_lines, a / row_lines, a % row_lines, b - a, (b - a + steps - 1) / steps};
    return p;
}

/* One step's lines of an Ahead. */
static inline __attribute__((always_inline)) void ahead_part(Ahead *p) {
    for (int64_t k = 0; k < p->per && p->left > 0; k++, p->left--) {
        _mm_prefetch(p->x + p->row * p->stride + p->col * 64, _MM_HINT_T0);
        if (++p->col == p->row_lines) {
            p->col = 0;
            p->row++;
        }
    }
}

/* The query heads of one KV head share each key and value as it is widened from the pool: up to HEADS_AT_ONCE
   heads take every loaded K (V) vector at once, so a float16 pool's conversion is done once per KV head, not
   once per query head. Registers bound how much is in flight: with AVX-512's 32 vector registers (used by the
   compiler for these 256-bit operations too) 8 tokens' scores or 64 output values per head, else 4 and 32. */
#define HEADS_AT_ONCE 3
#ifdef __AVX512VL__
#define SCORE_TOKENS 8
#define VALUE_VECTORS 8
#else
#define SCORE_TOKENS 4
#define VALUE_VECTORS 4
#endif

/* Sums of each of 4 vectors, in the lanes of one 128-bit vector. */
static inline __m128 sums4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* Scores of SCORE_TOKENS consecutive tokens (k: the first one's key, `stride` elements between tokens) against
   hn <= HEADS_AT_ONCE query heads (q: D floats each, one after another), times scale: head j's to s + j s_step. */
static inline __attribute__((always_inline)) void score_heads(const float *q, const int hn, const void *k,
                                                              int64_t stride, int64_t D, const int kind, float *s,
                                                              int64_t s_step, __m256 scale, Ahead *ahead) {
    __m256 a[HEADS_AT_ONCE][SCORE_TOKENS];
    for (int j = 0; j < hn; j++)
        for (int t = 0; t < SCORE_TOKENS; t++) a[j][t] = _mm256_setzero_ps();
    for (int64_t i = 0; i < D; i += 8) {
        ahead_part(ahead);
        __m256 qv[HEADS_AT_ONCE];
        for (int j = 0; j < hn; j++) qv[j] = _mm256_loadu_ps(q + j * D + i);
        for (int t = 0; t < SCORE_TOKENS; t++) {
            const __m256 kv = load8_kv(k, t * stride + i, kind);
            for (int j = 0; j < hn; j++) a[j][t] = _mm256_fmadd_ps(qv[j], kv, a[j][t]);
        }
    }
    for (int j = 0; j < hn; j++)
        for (int t = 0; t < SCORE_TOKENS; t += 4)
            _mm_storeu_ps(s + j * s_step + t, _mm_mul_ps(sums4(a[j][t], a[j][t + 1], a[j][t + 2], a[j][t + 3]),
                                                         _mm256_castps256_ps128(scale)));
}

/* o_j[0 .. 8 VALUE_VECTORS) += sum over n tokens of p_j[t] v[t] for hn <= HEADS_AT_ONCE heads (p_j: p + j p_step;
   o_j: o + j D; v: the tokens' first value, `stride` elements apart). */
static inline __attribute__((always_inline)) void weigh_heads(const float *p, int64_t p_step, const int hn,
                                                              const void *v, int64_t stride, int64_t n, float *o,
                                                              int64_t D, const int kind, Ahead *ahead) {
    __m256 acc[HEADS_AT_ONCE][VALUE_VECTORS];
    for (int j = 0; j < hn; j++)
        for (int c = 0; c < VALUE_VECTORS; c++) acc[j][c] = _mm256_loadu_ps(o + j * D + 8 * c);
    for (int64_t t = 0; t < n; t++) {
        ahead_part(ahead);
        __m256 pt[HEADS_AT_ONCE];
        for (int j = 0; j < hn; j++) pt[j] = _mm256_set1_ps(p[j * p_step + t]);
        for (int c = 0; c < VALUE_VECTORS; c++) {
            const __m256 vv = load8_kv(v, t * stride + 8 * c, kind);
            for (int j = 0; j < hn; j++) acc[j][c] = _mm256_fmadd_ps(pt[j], vv, acc[j][c]);
        }
    }
    for (int j = 0; j < hn; j++)
        for (int c = 0; c < VALUE_VECTORS; c++) _mm256_storeu_ps(o + j * D + 8 * c, acc[j][c]);
}

/* s[j s_step + o] *= the scale of int8 head row o (rows: row 0, st_bytes apart) for n rows and nq heads j: a block's
   scores by its keys' scales, or its weights by its values'. Eight rows' scales at a time by one gather (the decode
   steps of kv_dtype.py's cases 0.92-0.97x the time of one row at a time, the same products). */
static inline void times_row_scales(float *s, int64_t s_step, int64_t nq, const char *rows, int64_t st_bytes, int64_t n,
                                    int64_t D) {
    int64_t o = 0;
    const __m256i at = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((int)st_bytes));
    for (; o + 8 <= n; o += 8) {
        const __m256 f = _mm256_i32gather_ps((const float *)(rows + o * st_bytes + D), at, 1);
        for (int64_t j = 0; j < nq; j++) _mm256_storeu_ps(s + j * s_step + o, _mm256_mul_ps(_mm256_loadu_ps(s + j * s_step + o), f));
    }
    for (; o < n; o++) {
        const float f = row_scale(rows + o * st_bytes, D, KV_I8);
        for (int64_t j = 0; j < nq; j++) s[j * s_step + o] *= f;
    }
}

/* Query heads of one row against the row's tokens [t_begin, t_end) (t_begin on a block boundary) through its block
   table; D % 8 == 0. The heads come in `groups` groups of nq, group g belonging to KV head kv_head + g (q: the
   first head's D values, the others following in that order). Each block of K and V is read from memory once
   for every head (it stays in L1 between them); with every KV head in the walk (groups == num_kv_heads) a block's
   K (and V) is one contiguous run of memory read in order. `scores` holds groups * nq * (t_end - t_begin)
   floats; head j of group g writes D floats at out + g * out_step + j * D. With m and l NULL the output is
   normalized (the whole context); else it is left unnormalized, each head's largest score at m[g * ml_step + j]
   and its sum of exp(score - m) in l the same, for merge_parts. Written once for every pool type (`kind`), each
   compiled on its own; on an int8 pool a token's K scale multiplies its scores and its V scale its weights. */
static inline __attribute__((always_inline)) void attend_kv(const Net *net, int64_t layer, const float *q, int64_t nq,
                                                            int64_t kv_head, int64_t groups, const int32_t *table,
                                                            int64_t t_begin, int64_t t_end, float *scores, float *out,
                                                            int64_t out_step, float *m, float *l, int64_t ml_step,
                                                            const int kind) {
    const int64_t D = net->head_dim, bs = net->block_size, st = net->stride_token, len = t_end - t_begin;
    const int64_t elem = kv_elem(kind), row_bytes = head_bytes(D, kind), st_bytes = st * elem;
    const int64_t first_at = kv_head * row_bytes;
    /* the next block's lines to ask for: every head's rows as one run, or this head's slice of each row; shared
       out over the block's products (per 8 or 4 tokens when scoring, per 64 or 32 output values when weighing) */
    const int64_t ahead_row = groups == net->num_kv_heads ? (bs * st_bytes + 63) / 64 : (row_bytes + 63) / 64;
    const int64_t ahead = groups == net->num_kv_heads ? ahead_row : bs * ahead_row;
    const int64_t head_sets = groups * ((nq + HEADS_AT_ONCE - 1) / HEADS_AT_ONCE);
    const int64_t score_calls = head_sets * (bs / SCORE_TOKENS), weigh_calls = head_sets * (D / (8 * VALUE_VECTORS));
    const __m256 scale = _mm256_set1_ps(net->scale);
    for (int64_t b = t_begin / bs, t0 = t_begin; t0 < t_end; b++, t0 += bs) {
        const char *kb = (const char *)kv_at(net, layer, 0, table[b], 0) + first_at;
        const int64_t n = t_end - t0 < bs ? t_end - t0 : bs;
        const char *next = t0 + bs < t_end && score_calls ? (const char *)kv_at(net, layer, 0, table[b + 1], 0) + first_at
                                                          : NULL;
        int64_t c = 0;
        for (int64_t g = 0; g < groups; g++) {
            const char *k = kb + g * row_bytes;
            for (int64_t j0 = 0; j0 < nq; j0 += HEADS_AT_ONCE) {
                const int hn = nq - j0 < HEADS_AT_ONCE ? nq - j0 : HEADS_AT_ONCE;
                const float *qj = q + (g * nq + j0) * D;
                float *s = scores + (g * nq + j0) * len + (t0 - t_begin);
                int64_t o = 0;
                for (; o + SCORE_TOKENS <= n; o += SCORE_TOKENS) {
                    const char *ko = k + o * st_bytes;
                    Ahead pf = ahead_share(next, st_bytes, ahead_row, ahead, c++, score_calls, D / 8);
                    if (hn == 3) score_heads(qj, 3, ko, st, D, kind, s + o, len, scale, &pf);
                    else if (hn == 2) score_heads(qj, 2, ko, st, D, kind, s + o, len, scale, &pf);
                    else score_heads(qj, 1, ko, st, D, kind, s + o, len, scale, &pf);
                }
                for (; o < n; o++)
                    for (int j = 0; j < hn; j++) s[j * len + o] = dot1(qj + j * D, k + o * st_bytes, D, kind) * net->scale;
            }
            if (kind == KV_I8) times_row_scales(scores + g * nq * len + (t0 - t_begin), len, nq, k, st_bytes, n, D);
        }
    }
    float inv[groups * nq];
    for (int64_t h = 0; h < groups * nq; h++) {
        float *s = scores + h * len;
        const float mx = max_of(s, len);
        const float total = exp_shifted(s, len, mx);
        inv[h] = 1.f / total;
        if (m) {
            m[h / nq * ml_step + h % nq] = mx;
            l[h / nq * ml_step + h % nq] = total;
        }
        memset(out + h / nq * out_step + h % nq * D, 0, D * sizeof(float));
    }
    for (int64_t b = t_begin / bs, t0 = t_begin; t0 < t_end; b++, t0 += bs) {
        const char *vb = (const char *)kv_at(net, layer, 1, table[b], 0) + first_at;
        const int64_t n = t_end - t0 < bs ? t_end - t0 : bs;
        const char *next = t0 + bs < t_end && weigh_calls ? (const char *)kv_at(net, layer, 1, table[b + 1], 0) + first_at
                                                          : NULL;
        int64_t c = 0;
        for (int64_t g = 0; g < groups; g++) {
            const char *v = vb + g * row_bytes;
            if (kind == KV_I8) times_row_scales(scores + g * nq * len + (t0 - t_begin), len, nq, v, st_bytes, n, D);
            for (int64_t j0 = 0; j0 < nq; j0 += HEADS_AT_ONCE) {
                const int hn = nq - j0 < HEADS_AT_ONCE ? nq - j0 : HEADS_AT_ONCE;
                const float *p = scores + (g * nq + j0) * len + (t0 - t_begin);
                float *oj = out + g * out_step + j0 * D;
                int64_t d0 = 0;
                for (; d0 + 8 * VALUE_VECTORS <= D; d0 += 8 * VALUE_VECTORS) {
                    const char *vd = v + d0 * elem;
                    Ahead pf = ahead_share(next, st_bytes, ahead_row, ahead, c++, weigh_calls, n);
                    if (hn == 3) weigh_heads(p, len, 3, vd, st, n, oj + d0, D, kind, &pf);
                    else if (hn == 2) weigh_heads(p, len, 2, vd, st, n, oj + d0, D, kind, &pf);
                    else weigh_heads(p, len, 1, vd, st, n, oj + d0, D, kind, &pf);
                }
                for (; d0 < D; d0 += 8)
                    for (int j = 0; j < hn; j++) weigh8(p + j * len, v + d0 * elem, st, n, oj + j * D + d0, kind);
            }
        }
    }
    if (m) return;
    for (int64_t h = 0; h < groups * nq; h++) {
        float *oh = out + h / nq * out_step + h % nq * D;
        for (int64_t i = 0; i < D; i += 8)
            _mm256_storeu_ps(oh + i, _mm256_mul_ps(_mm256_loadu_ps(oh + i), _mm256_set1_ps(inv[h])));
    }
}

static void attend_range(const Net *net, int64_t layer, const float *q, int64_t nq, int64_t kv_head, int64_t groups,
                         const int32_t *table, int64_t t_begin, int64_t t_end, float *scores, float *out,
                         int64_t out_step, float *m, float *l, int64_t ml_step) {
    if (net->kv_kind == KV_F16)
        attend_kv(net, layer, q, nq, kv_head, groups, table, t_begin, t_end, scores, out, out_step, m, l, ml_step, KV_F16);
    else if (net->kv_kind == KV_I8)
        attend_kv(net, layer, q, nq, kv_head, groups, table, t_begin, t_end, scores, out, out_step, m, l, ml_step, KV_I8);
    else
        attend_kv(net, layer, q, nq, kv_head, groups, table, t_begin, t_end, scores, out, out_step, m, l, ml_step, KV_F32);
}

/* A long context is attended in parts (whole blocks), each part a work item of its own (all KV
   heads, each with its query heads together), and the parts merged by their log-sum-exp: with one row and three
   KV heads on two threads the heads alone could not be shared evenly, and one item per query head read each K
   and V three times (at 4,096 tokens the step's attention was bound by re-reading them). The parts depend on the
   context length only, so a row's result does not depend on the threads or on the other rows. */
#define PARTS_FROM 512  /* tokens: from here two parts or more (one sequence of 512-1,030 tokens: 0.92x the step
                           time of per-query-head items, paired runs, 2026-11-29); shorter contexts' K and V stay
                           in L2 between a KV head's query heads */
#define PART_TOKENS 256 /* about: parts are of equal length in whole blocks, enough of them to share evenly */

static int64_t part_len_of(int64_t ctx, int64_t bs) {
    if (ctx < PARTS_FROM) return ctx;
    const int64_t parts = (ctx + PART_TOKENS - 1) / PART_TOKENS, per = (ctx + parts - 1) / parts;
    return (per + bs - 1) / bs * bs;
}

static int64_t parts_of(int64_t ctx, int64_t bs) {
    if (ctx < PARTS_FROM) return 1;
    const int64_t per = part_len_of(ctx, bs);
    return (ctx + per - 1) / per;
}

/* One head's output from its parts: out[d] = sum_p e^(m_p - M) o_p[d] / sum_p e^(m_p - M) l_p; the parts'
   o `o_stride` floats apart, their m and l `ml_stride` apart. */
static void merge_parts(const float *o, int64_t o_stride, const float *m, const float *l, int64_t ml_stride,
                        int64_t parts, int64_t D, float *out) {
    float top = -INFINITY, total = 0.f, w[parts];
    for (int64_t p = 0; p < parts; p++) top = m[p * ml_stride] > top ? m[p * ml_stride] : top;
    for (int64_t p = 0; p < parts; p++) {
        w[p] = expf(m[p * ml_stride] - top);
        total += w[p] * l[p * ml_stride];
    }
    for (int64_t d = 0; d < D; d++) {
        float acc = 0.f;
        for (int64_t p = 0; p < parts; p++) acc += w[p] * o[p * o_stride + d];
        out[d] = acc / total;
    }
}

/* A barrier that spins: a step crosses several per layer, each after a few microseconds of work, and
   an OpenMP barrier whose threads fall asleep costs tens of microseconds to wake. A thread that has spun for
   some tens of microseconds yields its core at each look (another process may hold the core the thread it
   waits for needs). */
typedef struct {
    volatile int count, sense;
} SpinBarrier;

static void barrier_wait(SpinBarrier *b, int nt, int *local_sense) {
    *local_sense = !*local_sense;
    if (__atomic_add_fetch(&b->count, 1, __ATOMIC_ACQ_REL) == nt) {
        b->count = 0;
        __atomic_store_n(&b->sense, *local_sense, __ATOMIC_RELEASE);
    } else {
        for (int spins = 0; __atomic_load_n(&b->sense, __ATOMIC_ACQUIRE) != *local_sense; spins++) {
            if (spins < 2000)
                _mm_pause();
            else
                sched_yield();
        }
    }
}

/* -- A prompt chunk's attention by tiles ---------------------------------------------------------------------- */

/* A prompt chunk's rows (TILED_FROM or more consecutive rows of one sequence at consecutive positions, each
   seeing the keys up to its own position) attend by tiles instead of row by row. Per KV head the chunk's context
   is first widened to float32 once for all its rows (`widen_chunk`): K in panels of 16 keys, each dimension's
   keys side by side (4 KB read in order), and V as it is. A tile is up to TILE_ROWS rows' query heads of one KV
   head, scored against 16 keys at a time with each key vector loaded once for all of them (`score_tile`), then the
   values weighed for several query heads at a time (`weigh_tile`): the more rows a tile has, the fewer times the
   context is read (512 tokens after 7,680 cached: tiles of 32 rows took 0.87x the time of tiles of 8), as long as
   there are tiles enough for the threads (`tile_rows_of`). Row by row, each row read its K and V again: a
   512-token prompt's attention cost about what its products did. The arithmetic is float32 throughout, as the row
   path's. Where the products run on AMX, a chunk with AMX_ATTENTION_FROM tokens of context or more attends on the
   tiles instead, with float32's numbers from split bfloat16 products (amx_attention.c, included below). */
#define TILED_FROM 8
#define TILE_ROWS 32
#define TILE_KEYS 16  /* a panel of keys */
#define WEIGH_KEYS 64 /* keys whose values are weighed for every query of a tile while they are in L1 */
/* A chunk whose context reaches this many tokens attends on AMX tiles where the products are AMX's (shorter, the
   float32 tiles were as fast or faster: 2026-11-29, fresh prompts of 128 tokens 1.14-1.16x, 256 0.90-0.91x, 384
   0.82-0.84x the float32 tiles' step; 32 tokens after 128 cached 0.94-0.99x, after 256 0.94-0.96x). */
#define AMX_ATTENTION_FROM 256
#define KEY_RUN 512   /* keys scored, weighed and folded into the running softmax at a time */

typedef struct {
    int64_t row, rows, table, p0, ctxpad; /* rows row .. row + rows - 1 at positions p0 .., table row_tables[row] */
    int64_t tile_rows;
    int amx;                               /* attends on AMX tiles, its K/V widened as they need (amx_attention.c) */
    float *wide;                           /* per KV head: K in panels (ctxpad / 16, D, 16), then V (ctxpad, D);
                                              on AMX the layouts of amx_attention.c, as many bytes */
    float *scales;                         /* on AMX from an int8 pool, per KV head: its keys' scales (ctxpad), then
                                              its values' (amx_attention.c); else NULL */
} Chunk;

/* Whether a chunk keeps its keys' and values' scales beside its widened K/V (on AMX from an int8 pool), and the
   floats of both. */
static inline int chunk_scaled(const Net *net, const Chunk *c) { return c->amx && net->kv_kind == KV_I8; }
static inline int64_t chunk_floats(const Net *net, const Chunk *c) {
    return net->num_kv_heads * 2 * c->ctxpad * (net->head_dim + chunk_scaled(net, c));
}

/* Rows per tile for a chunk of `rows`: as many as TILE_ROWS while every thread still gets four tiles or more (of
   all KV heads), never fewer than TILED_FROM; a multiple of `step` (8; on AMX 16 where the KV heads have an odd
   number of query heads, so that a tile's query heads fill whole A tiles of 16 rows). */
static int64_t tile_rows_of(int64_t rows, int64_t nkv, int threads, int64_t step) {
    int64_t tr = TILE_ROWS;
    while (tr > TILED_FROM && tr > step && nkv * ((rows + tr - 1) / tr) < 4 * threads) tr -= step;
    return tr;
}

/* The rows of K and V this many tokens ahead are asked for while a token is widened: the reads, not the stores,
   bound widening (widen_chunk, widen_chunk_amx). */
#define WIDEN_AHEAD 16

static inline void widen_prefetch(const Net *net, int64_t layer, const int32_t *table, int64_t u) {
    const int64_t row = net->num_kv_heads * head_bytes(net->head_dim, net->kv_kind);
    for (int kv = 0; kv < 2; kv++) {
        const char *p = (const char *)kv_at(net, layer, kv, table[u / net->block_size], u % net->block_size);
        for (int64_t b = 0; b < row; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
    }
}

/* K and V of the chunk's tokens [t0, t1), every KV head (a token's rows read whole, in order), widened into the
   chunk's slabs. */
static void widen_chunk(const Net *net, int64_t layer, const Chunk *c, const int32_t *table, int64_t t0,
                        int64_t t1) {
    const int64_t D = net->head_dim, bs = net->block_size, kind = net->kv_kind, hb = head_bytes(D, kind);
    for (int64_t t = t0; t < t1; t++) {
        if (t + WIDEN_AHEAD < t1) widen_prefetch(net, layer, table, t + WIDEN_AHEAD);
        for (int64_t kh = 0; kh < net->num_kv_heads; kh++) {
            float *kt = c->wide + kh * 2 * D * c->ctxpad, *v = kt + D * c->ctxpad;
            const char *k = (const char *)kv_at(net, layer, 0, table[t / bs], t % bs) + kh * hb;
            const char *vs = (const char *)kv_at(net, layer, 1, table[t / bs], t % bs) + kh * hb;
            const __m256 ks = _mm256_set1_ps(row_scale(k, D, kind)), vsc = _mm256_set1_ps(row_scale(vs, D, kind));
            float row[D];
            for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(row + d, load8_scaled(k, d, kind, ks));
            float *panel = kt + t / TILE_KEYS * D * TILE_KEYS + t % TILE_KEYS;
            for (int64_t d = 0; d < D; d++) panel[d * TILE_KEYS] = row[d];
            for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(v + t * D + d, load8_scaled(vs, d, kind, vsc));
        }
    }
}

/* The tiles' vectors: 16 floats with AVX-512 (32 registers), else 8 (16 registers); TILE_QUERIES query vectors
   are scored and WEIGH_QUERIES weighed together, as many as the registers hold with the keys or values. */
#ifdef __AVX512F__
typedef __m512 vecf;
#define VW 16
#define vzero() _mm512_setzero_ps()
#define vload(p) _mm512_loadu_ps(p)
#define vstore(p, v) _mm512_storeu_ps(p, v)
#define vset1(x) _mm512_set1_ps(x)
#define vfma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define vmul(a, b) _mm512_mul_ps(a, b)
#define TILE_QUERIES 12
#define WEIGH_QUERIES 6
#else
typedef __m256 vecf;
#define VW 8
#define vzero() _mm256_setzero_ps()
#define vload(p) _mm256_loadu_ps(p)
#define vstore(p, v) _mm256_storeu_ps(p, v)
#define vset1(x) _mm256_set1_ps(x)
#define vfma(a, b, c) _mm256_fmadd_ps(a, b, c)
#define vmul(a, b) _mm256_mul_ps(a, b)
#define TILE_QUERIES 6
#define WEIGH_QUERIES 3
#endif
#define PANEL_VECS (TILE_KEYS / VW)

/* s_m[0 .. 16) = scale q_m . K[t] for the 16 keys of a panel (kt: dimension by dimension) and m < mq <=
   TILE_QUERIES query vectors, interleaved in qi (query m's dimension d at qi[d * stride + m]). */
static inline __attribute__((always_inline)) void score_tile(const float *qi, int64_t stride, const int mq,
                                                             const float *kt, int64_t D, float *s, int64_t s_step,
                                                             float scale) {
    vecf a[TILE_QUERIES][PANEL_VECS];
    for (int m = 0; m < mq; m++)
        for (int h = 0; h < PANEL_VECS; h++) a[m][h] = vzero();
    for (int64_t d = 0; d < D; d++) {
        vecf k[PANEL_VECS];
        for (int h = 0; h < PANEL_VECS; h++) k[h] = vload(kt + d * TILE_KEYS + h * VW);
        for (int m = 0; m < mq; m++) {
            const vecf qb = vset1(qi[d * stride + m]);
            for (int h = 0; h < PANEL_VECS; h++) a[m][h] = vfma(qb, k[h], a[m][h]);
        }
    }
    for (int m = 0; m < mq; m++)
        for (int h = 0; h < PANEL_VECS; h++) vstore(s + m * s_step + h * VW, vmul(a[m][h], vset1(scale)));
}

/* o_m[d0 .. d0 + VW nv) += sum over t < n of p_m[t] V[t] for m < mq <= WEIGH_QUERIES query vectors, nv <= 4. */
static inline __attribute__((always_inline)) void weigh_tile(const float *const *p, const int mq, const float *v,
                                                             int64_t D, int64_t d0, const int nv, int64_t n,
                                                             float *const *o) {
    vecf a[WEIGH_QUERIES][4];
    for (int m = 0; m < mq; m++)
        for (int c = 0; c < nv; c++) a[m][c] = vload(o[m] + d0 + VW * c);
    for (int64_t t = 0; t < n; t++) {
        vecf vv[4];
        for (int c = 0; c < nv; c++) vv[c] = vload(v + t * D + d0 + VW * c);
        for (int m = 0; m < mq; m++) {
            const vecf pb = vset1(p[m][t]);
            for (int c = 0; c < nv; c++) a[m][c] = vfma(pb, vv[c], a[m][c]);
        }
    }
    for (int m = 0; m < mq; m++)
        for (int c = 0; c < nv; c++) vstore(o[m] + d0 + VW * c, a[m][c]);
}

/* One query's key run in a tile (flash attention's online softmax): its scores s[0, mine) become weights e^(s -
   top), top the largest score so far (the query's output o and weight sum so far rescaled when it grows), and
   s[mine, upto) zeros: keys the query does not see, or padding. mine <= 0: the whole run is zeros. */
static inline __attribute__((always_inline)) void fold_run(float *s, int64_t mine, int64_t upto, float *top, float *total, float *o, int64_t D) {
    if (mine <= 0) {
        memset(s, 0, upto * sizeof(float));
        return;
    }
    const float run_top = max_of(s, mine), now = run_top > *top ? run_top : *top;
    if (now > *top && *total > 0.f) { /* earlier runs weighed against a smaller maximum */
        const float f = expf(*top - now);
        *total *= f;
        for (int64_t d = 0; d < D; d++) o[d] *= f;
    }
    *top = now;
    *total += exp_shifted_wide(s, mine, now);
    memset(s + mine, 0, (upto - mine) * sizeof(float));
}

/* Rows [i0, i1) of chunk c (i1 - i0 <= c->tile_rows), KV head kh: their query heads' attention output into attn
   (rows of nh * D), from qkv (rows of qkv_n). The keys go in runs of KEY_RUN with a running maximum and sum per
   query (flash attention's online softmax): a run's scores (s: TILE_ROWS * per_kv * KEY_RUN floats) and its
   keys and values stay in L1/L2 however long the context. */
static void attend_tile(const Net *net, const Chunk *c, int64_t kh, int64_t i0, int64_t i1, const float *qkv,
                        int64_t qkv_n, float *attn, float *s) {
    const int64_t D = net->head_dim, nh = net->num_heads, per_kv = nh / net->num_kv_heads;
    const float *kt = c->wide + kh * 2 * D * c->ctxpad, *v = kt + D * c->ctxpad;
    const int64_t nq = (i1 - i0) * per_kv, n = c->p0 + i1; /* the tile's keys: up to its last row's */
    float qi[D * nq], top[nq], total[nq];
    float *o[nq], *sp[nq];
    int64_t seen[nq];
    for (int64_t i = i0; i < i1; i++)
        for (int64_t j = 0; j < per_kv; j++) {
            const int64_t m = (i - i0) * per_kv + j, head = kh * per_kv + j;
            const float *q = qkv + (c->row + i) * qkv_n + head * D;
            for (int64_t d = 0; d < D; d++) qi[d * nq + m] = q[d];
            o[m] = attn + (c->row + i) * nh * D + head * D;
            memset(o[m], 0, D * sizeof(float));
            sp[m] = s + m * KEY_RUN;
            seen[m] = c->p0 + i + 1; /* row i sees the keys up to its own position */
            top[m] = -INFINITY, total[m] = 0.f;
        }
    for (int64_t r0 = 0; r0 < n; r0 += KEY_RUN) {
        const int64_t len = n - r0 < KEY_RUN ? n - r0 : KEY_RUN, lpad = (len + TILE_KEYS - 1) / TILE_KEYS * TILE_KEYS;
        for (int64_t t0 = 0; t0 < lpad; t0 += TILE_KEYS) /* each panel of keys for every query while in L1 */
            for (int64_t m0 = 0; m0 < nq; m0 += TILE_QUERIES) {
                const int mq = nq - m0 < TILE_QUERIES ? nq - m0 : TILE_QUERIES;
                const float *panel = kt + (r0 + t0) * D;
                if (mq == TILE_QUERIES) score_tile(qi + m0, nq, TILE_QUERIES, panel, D, s + m0 * KEY_RUN + t0, KEY_RUN, net->scale);
                else if (mq == 3) score_tile(qi + m0, nq, 3, panel, D, s + m0 * KEY_RUN + t0, KEY_RUN, net->scale);
                else
                    for (int m = 0; m < mq; m++)
                        score_tile(qi + m0 + m, nq, 1, panel, D, s + (m0 + m) * KEY_RUN + t0, KEY_RUN, net->scale);
            }
        for (int64_t m = 0; m < nq; m++) /* the run's weights, against the largest score so far */
            fold_run(sp[m], seen[m] - r0 < len ? seen[m] - r0 : len, len, &top[m], &total[m], o[m], D);
        for (int64_t t0 = 0; t0 < len; t0 += WEIGH_KEYS) { /* each run of values for every query while in L1 */
            const int64_t wl = len - t0 < WEIGH_KEYS ? len - t0 : WEIGH_KEYS;
            const float *vt = v + (r0 + t0) * D;
            for (int64_t m0 = 0; m0 < nq; m0 += WEIGH_QUERIES) {
                const int mq = nq - m0 < WEIGH_QUERIES ? nq - m0 : WEIGH_QUERIES;
                const float *p[WEIGH_QUERIES];
                for (int m = 0; m < mq; m++) p[m] = sp[m0 + m] + t0;
                int64_t d0 = 0;
                for (; d0 + 4 * VW <= D; d0 += 4 * VW) {
                    if (mq == WEIGH_QUERIES) weigh_tile(p, WEIGH_QUERIES, vt, D, d0, 4, wl, o + m0);
                    else if (mq == 3) weigh_tile(p, 3, vt, D, d0, 4, wl, o + m0);
                    else for (int m = 0; m < mq; m++) weigh_tile(p + m, 1, vt, D, d0, 4, wl, o + m0 + m);
                }
                for (; d0 + VW <= D; d0 += VW)
                    for (int m = 0; m < mq; m++) weigh_tile(p + m, 1, vt, D, d0, 1, wl, o + m0 + m);
                for (; d0 < D; d0++) /* a head of 8 (mod 16) dimensions with AVX-512: the last 8 one by one */
                    for (int m = 0; m < mq; m++)
                        for (int64_t t = 0; t < wl; t++) o[m0 + m][d0] += p[m][t] * vt[t * D + d0];
            }
        }
    }
    for (int64_t m = 0; m < nq; m++) {
        const float inv = 1.f / total[m];
        for (int64_t d = 0; d < D; d++) o[m][d] *= inv;
    }
}

#include "amx_attention.c"

/* [a, b): this thread's share of n items. */
static void split(int64_t n, int t, int nt, int64_t *a, int64_t *b) {
    *a = n * t / nt;
    *b = n * (t + 1) / nt;
}

/* One step of `rows` tokens, every layer: decode rows (one token of a sequence) and prefill rows (each token of a
   prompt's chunk) alike. h (rows, hidden) holds the tokens' embeddings and returns the final normed hidden states.
   Each row's K/V is written at its slot before attention (all rows' before any attends, so a prompt's token sees
   the tokens before it written in the same step), which reads `context_lens[r]` tokens (the row's position + 1)
   through table `row_tables[r]` of `tables` (one per sequence, table_width wide). Work between two matrix
   products is split by rows (or by row and KV head) over the threads, attention's work items are taken one at a
   time (a prompt's rows cost more the later they come), and the threads meet at spin barriers. Returns 0, or -1
   if out of memory. */
int tw_step(const Net *net, int64_t rows, float *h, const int32_t *positions, const int32_t *slot_blocks,
            const int32_t *slot_offsets, const int32_t *tables, int64_t table_width, const int32_t *row_tables,
            const int32_t *context_lens, int threads) {
    const int64_t H = net->hidden, D = net->head_dim, nh = net->num_heads, nkv = net->num_kv_heads;
    const int64_t qkv_n = (nh + 2 * nkv) * D, I = net->inter;
    int64_t kmax = H > nh * D ? H : nh * D;
    kmax = kmax > I ? kmax : I;
    const int64_t per_kv = nh / nkv;
    int64_t max_ctx = 0;
    for (int64_t r = 0; r < rows; r++) max_ctx = context_lens[r] > max_ctx ? context_lens[r] : max_ctx;
    /* attention's work items, row by row: a short context whole (every head) when there are rows enough, else
       its KV heads' query heads, else its query heads one by one; a long one's parts (every head); item_start and
       part_base: prefix sums over the rows */
    const int64_t bs = net->block_size;
    const int64_t item_heads = rows >= 2 * threads ? nh : rows * nkv >= 2 * threads ? per_kv : 1;
    int64_t *item_start = malloc((rows + 1) * sizeof(int64_t)), *part_base = malloc((rows + 1) * sizeof(int64_t));
    if (!item_start || !part_base) {
        free(item_start); free(part_base);
        return -1;
    }
    int amx = 1;
    for (int64_t l = 0; l < net->num_layers; l++) {
        const Layer *L = &net->layers[l];
        amx = amx && use_amx(L->qkv.panels, rows) && use_amx(L->o.panels, rows) && use_amx(L->gate_up.panels, rows)
              && use_amx(L->down.panels, rows);
    }
    /* without AMX, the products may still multiply in bfloat16 on vectors (every layer can: no panels needed) */
    const int way = amx ? BY_AMX : way_of(NULL, rows);
    /* a chunk's attention on AMX tiles (amx_attention.c) where the products are and its context is long enough */
    const int amx_attn = TW_AMX && amx && D % 32 == 0;
    /* prompt chunks of TILED_FROM rows or more attend by tiles (their rows get no row items); tile_start: prefix
       sums of their tiles (every KV head's), after the row items */
    Chunk *chunks = malloc((rows / TILED_FROM + 1) * sizeof(Chunk));
    int64_t *tile_start = malloc((rows / TILED_FROM + 2) * sizeof(int64_t));
    int64_t n_chunks = 0, wide_floats = 0;
    if (!chunks || !tile_start) {
        free(item_start); free(part_base); free(chunks); free(tile_start);
        return -1;
    }
    tile_start[0] = 0;
    for (int64_t r = 0, e; r < rows; r = e) {
        for (e = r + 1; e < rows && row_tables[e] == row_tables[r] && positions[e] == positions[e - 1] + 1
                        && context_lens[e] == positions[e] + 1; e++) ;
        if (e - r >= TILED_FROM && context_lens[r] == positions[r] + 1) {
            Chunk *c = &chunks[n_chunks++];
            c->row = r, c->rows = e - r, c->table = row_tables[r], c->p0 = positions[r];
            c->ctxpad = (c->p0 + c->rows + 31) / 32 * 32; /* whole panels of keys (16), or AMX's slices (32) */
            c->amx = amx_attn && c->p0 + c->rows >= AMX_ATTENTION_FROM;
            wide_floats += chunk_floats(net, c);
            c->tile_rows = tile_rows_of(c->rows, nkv, threads, c->amx && per_kv % 2 ? 16 : 8);
            tile_start[n_chunks] = tile_start[n_chunks - 1] + nkv * ((c->rows + c->tile_rows - 1) / c->tile_rows);
        }
    }
    float *wide = calloc(wide_floats + 1, sizeof(float)); /* the chunks' widened K/V; padding keys stay 0 */
    for (int64_t i = 0, at = 0; i < n_chunks; at += chunk_floats(net, &chunks[i]), i++) {
        chunks[i].wide = wide + at;
        chunks[i].scales = chunk_scaled(net, &chunks[i]) ? chunks[i].wide + nkv * 2 * D * chunks[i].ctxpad : NULL;
    }
    item_start[0] = part_base[0] = 0;
    for (int64_t r = 0, ci = 0; r < rows; r++) {
        const int tiled = ci < n_chunks && r >= chunks[ci].row;
        if (tiled && r == chunks[ci].row + chunks[ci].rows - 1) ci++;
        const int64_t parts = tiled ? 1 : parts_of(context_lens[r], bs);
        item_start[r + 1] = item_start[r] + (tiled ? 0 : parts == 1 ? nh / item_heads : parts);
        part_base[r + 1] = part_base[r] + (parts == 1 ? 0 : nkv * parts);
    }
    const int64_t row_items = item_start[rows], all_items = row_items + tile_start[n_chunks];
    float *part_o = malloc((part_base[rows] * per_kv * (D + 2) + 1) * sizeof(float));
    float *part_m = part_o + part_base[rows] * per_kv * D, *part_l = part_m + part_base[rows] * per_kv;
    float *x = malloc(rows * kmax * sizeof(float));
    float *qkv = malloc(rows * qkv_n * sizeof(float));
    float *attn = malloc(rows * nh * D * sizeof(float));
    float *gu = malloc(rows * 2 * I * sizeof(float));
    float *proj = malloc(rows * H * sizeof(float));
    float *scores = malloc((size_t)threads * nh * max_ctx * sizeof(float));
    /* a thread's scratch for the tiles: a key run's scores (and on AMX the weights, hi and lo, as bfloat16) */
    const size_t tile_scratch = (size_t)TILE_ROWS * per_kv * KEY_RUN * (amx_attn ? 2 : 1);
    float *tile_scores = malloc(((n_chunks ? threads : 0) * tile_scratch + 1) * sizeof(float));
    QAct q;
    const int have_q = qact_alloc(rows, kmax, threads, way, &q);
    SpinBarrier bar = {0, 0};
    const int64_t per_product = (int64_t)threads * COUNTER_STRIDE;  /* claim counters, zeroed, per product */
    /* and after each layer's four products', the layer's count of attention items taken */
    int64_t *taken = calloc(net->num_layers * (4 * per_product + COUNTER_STRIDE), sizeof(int64_t));
    int64_t *items_taken = taken + net->num_layers * 4 * per_product;
    int ok = x && qkv && attn && gu && proj && scores && have_q && taken && part_o && wide && tile_scores;
    if (ok) {
        #pragma omp parallel num_threads(threads)
        {
            int t, nt, sense = 0;
            thread_ids(&t, &nt);
            if (amx) amx_configure();
            int64_t r0, r1, i0, i1;
            split(rows, t, nt, &r0, &r1);
            for (int64_t l = 0; l < net->num_layers; l++) {
                const Layer *L = &net->layers[l];
                for (int64_t r = r0; r < r1; r++) {
                    rms_norm(h + r * H, L->input_norm, H, net->eps, x + r * H);
                    quantize_groups(x + r * H, H, 0, H / GROUP, &q, r);
                }
                barrier_wait(&bar, nt, &sense);
                q4_matmul_shared(&L->qkv, &q, rows, qkv, t, nt, taken + (4 * l + 0) * per_product);
                barrier_wait(&bar, nt, &sense);
                /* per (row, KV head): q/k norms and RoPE of the group, the K/V write */
                split(rows * nkv, t, nt, &i0, &i1);
                for (int64_t it = i0; it < i1; it++) {
                    int64_t r = it / nkv, kh = it % nkv;
                    float *row = qkv + r * qkv_n;
                    const float *c = net->cos + (int64_t)positions[r] * (D / 2), *sn = net->sin + (int64_t)positions[r] * (D / 2);
                    float *k = row + (nh + kh) * D, *v = row + (nh + nkv + kh) * D;
                    if (L->k_norm) rms_norm(k, L->k_norm, D, net->eps, k);
                    rope(k, c, sn, D / 2);
                    const int64_t head_at = kh * head_bytes(D, net->kv_kind);
                    store_kv((char *)kv_at(net, l, 0, slot_blocks[r], slot_offsets[r]) + head_at, k, D, net->kv_kind);
                    store_kv((char *)kv_at(net, l, 1, slot_blocks[r], slot_offsets[r]) + head_at, v, D, net->kv_kind);
                    for (int64_t head = kh * per_kv; head < (kh + 1) * per_kv; head++) {
                        float *qh = row + head * D;
                        if (L->q_norm) rms_norm(qh, L->q_norm, D, net->eps, qh);
                        rope(qh, c, sn, D / 2);
                    }
                }
                barrier_wait(&bar, nt, &sense);
                if (n_chunks) { /* the prompt chunks' K/V widened, in runs of 64 tokens per chunk */
                    int64_t runs = 0;
                    for (int64_t ci = 0; ci < n_chunks; ci++) runs += (chunks[ci].p0 + chunks[ci].rows + 63) / 64;
                    split(runs, t, nt, &i0, &i1);
                    for (int64_t ci = 0, at = 0; ci < n_chunks && at < i1; ci++) {
                        const Chunk *c = &chunks[ci];
                        const int64_t ctx = c->p0 + c->rows;
                        for (int64_t t0 = 0; t0 < ctx; t0 += 64, at++)
                            if (at >= i0 && at < i1)
                                (c->amx ? widen_chunk_amx : widen_chunk)(net, l, c, tables + c->table * table_width,
                                                                         t0, t0 + 64 < ctx ? t0 + 64 : ctx);
                    }
                    barrier_wait(&bar, nt, &sense);
                }
                /* attention per row, every head at once (each block's K and V read once, in order), or per (row, KV
                   head) with the KV head's query heads together, or per (row, query head) when there are too few
                   rows for the threads to share evenly; a long context per (row, part), merged below */
                float *sc = scores + (int64_t)t * nh * max_ctx;
                float *ts = tile_scores + t * tile_scratch;
                for (int64_t it, r = 0, ci = 0;
                     (it = __atomic_fetch_add(items_taken + l * COUNTER_STRIDE, 1, __ATOMIC_RELAXED)) < all_items;) {
                    if (it >= row_items) { /* a tile: KV head by KV head (its K and V stay in L2), the chunk's
                                              last rows (the most keys) first */
                        const int64_t k = it - row_items;
                        while (tile_start[ci + 1] <= k) ci++;
                        const Chunk *c = &chunks[ci];
                        const int64_t tr = c->tile_rows, local = k - tile_start[ci], tiles = (c->rows + tr - 1) / tr;
                        const int64_t tile = tiles - 1 - local % tiles, i0t = tile * tr;
                        (c->amx ? attend_tile_amx : attend_tile)(net, c, local / tiles, i0t,
                                                                   i0t + tr < c->rows ? i0t + tr : c->rows, qkv,
                                                                   qkv_n, attn, ts);
                        continue;
                    }
                    while (item_start[r + 1] <= it) r++;  /* a thread's items come in increasing order */
                    const int64_t local = it - item_start[r], ctx = context_lens[r];
                    const int32_t *table = tables + (int64_t)row_tables[r] * table_width;
                    if (part_base[r + 1] == part_base[r]) {
                        const int64_t head = local * item_heads, whole = item_heads == nh;
                        attend_range(net, l, qkv + r * qkv_n + head * D, whole ? per_kv : item_heads, head / per_kv,
                                     whole ? nkv : 1, table, 0, ctx, sc, attn + r * nh * D + head * D, per_kv * D,
                                     NULL, NULL, 0);
                    } else {  /* one part, every head; head j of KV head g to (part_base + g parts + p) per_kv + j */
                        const int64_t parts = parts_of(ctx, bs), p = local, part_len = part_len_of(ctx, bs);
                        const int64_t end = (p + 1) * part_len < ctx ? (p + 1) * part_len : ctx, at = part_base[r] + p;
                        attend_range(net, l, qkv + r * qkv_n, per_kv, 0, nkv, table, p * part_len, end, sc,
                                     part_o + at * per_kv * D, parts * per_kv * D, part_m + at * per_kv,
                                     part_l + at * per_kv, parts * per_kv);
                    }
                }
                barrier_wait(&bar, nt, &sense);
                for (int64_t r = r0; r < r1; r++) {
                    const int64_t parts = (part_base[r + 1] - part_base[r]) / nkv;  /* 0 or 2+ */
                    if (parts)
                        for (int64_t head = 0; head < nh; head++) {
                            const int64_t at = part_base[r] + head / per_kv * parts, j = head % per_kv;
                            merge_parts(part_o + at * per_kv * D + j * D, per_kv * D, part_m + at * per_kv + j,
                                        part_l + at * per_kv + j, per_kv, parts, D, attn + r * nh * D + head * D);
                        }
                    quantize_groups(attn + r * nh * D, nh * D, 0, nh * D / GROUP, &q, r);
                }
                barrier_wait(&bar, nt, &sense);
                q4_matmul_shared(&L->o, &q, rows, proj, t, nt, taken + (4 * l + 1) * per_product);
                barrier_wait(&bar, nt, &sense);
                for (int64_t r = r0; r < r1; r++) {
                    for (int64_t i = 0; i < H; i++) h[r * H + i] += proj[r * H + i];
                    rms_norm(h + r * H, L->post_norm, H, net->eps, x + r * H);
                    quantize_groups(x + r * H, H, 0, H / GROUP, &q, r);
                }
                barrier_wait(&bar, nt, &sense);
                q4_matmul_shared(&L->gate_up, &q, rows, gu, t, nt, taken + (4 * l + 2) * per_product);
                barrier_wait(&bar, nt, &sense);
                /* SiLU(gate) * up: split by rows, or by columns when there are fewer rows than threads */
                if (rows >= nt) {
                    for (int64_t r = r0; r < r1; r++) {
                        const float *g = gu + r * 2 * I, *u = g + I;
                        float *a = x + r * I;
                        silu_mul(g, u, I, a, n_chunks > 0);
                        quantize_groups(a, I, 0, I / GROUP, &q, r);
                    }
                } else {
                    int64_t g0, g1;
                    split(I / GROUP, t, nt, &g0, &g1);
                    for (int64_t r = 0; r < rows; r++) {
                        const float *g = gu + r * 2 * I, *u = g + I;
                        float *a = x + r * I;
                        silu_mul(g + g0 * GROUP, u + g0 * GROUP, (g1 - g0) * GROUP, a + g0 * GROUP, n_chunks > 0);
                        quantize_groups(a, I, g0, g1, &q, r);
                    }
                }
                barrier_wait(&bar, nt, &sense);
                q4_matmul_shared(&L->down, &q, rows, proj, t, nt, taken + (4 * l + 3) * per_product);
                barrier_wait(&bar, nt, &sense);
                for (int64_t r = r0; r < r1; r++)
                    for (int64_t i = 0; i < H; i++) h[r * H + i] += proj[r * H + i];
                /* the next layer's norm reads only this thread's rows: no barrier needed here */
            }
            for (int64_t r = r0; r < r1; r++) rms_norm(h + r * H, net->final_norm, H, net->eps, h + r * H);
            if (amx) amx_release();
        }
    }
    free(x); free(qkv); free(attn); free(gu); free(proj); free(scores); free(taken);
    free(item_start); free(part_base); free(part_o); free(chunks); free(tile_start); free(wide); free(tile_scores);
    if (have_q) qact_free(&q);
    return ok ? 0 : -1;
}

#include "race.c"
#include "grammar_mask.c"
