/* Products of many activation rows on AMX (Intel's tile matrix unit), included by kernels.c.

   Where the CPU has AMX (amx_bf16: Sapphire Rapids and later) a 4-bit layer also keeps its codes in panels of
   16 weight rows, laid out so that one group of a panel unpacks straight into the layout of a B tile: 16 rows
   of 64 bytes, row i holding, for each of the panel's 16 weight rows c, the pair of bfloat16 weights at inputs
   2i and 2i + 1 of the group. A GGUF Q4 byte t of row c holds inputs t and t + 16 (its two nibbles), so the
   panel's byte (i, c, p) is simply GGUF's byte t = 2i + p of row c: its low nibbles make B rows 0-7, its high
   nibbles rows 8-15. Each weight is dequantized as w = d q + m in float32 (one fused multiply-add, as
   tw_q4_dequantize does) and rounded to bfloat16 (to nearest even); activations are rounded to bfloat16 too;
   the tile unit multiplies and accumulates in float32. The numbers are those of the bfloat16 prefill products
   (quantized_linear.wide_products), without writing W out and handing it to a BLAS.

   A panel's groups are dequantized once into a thread's buffer (1 KB a group), then all activation rows run
   through them. With at most 32 activation rows (decode batches: one pass) each group is instead unpacked just
   before its products, into two pairs of tiles used in turn: the tiles are read back from L1 rather than from a
   buffer of all the groups (96 KB for a pair of panels at k = 1,536, past L1), and the tile unit multiplies one
   group while the vector units unpack the next (2026-11-29: a step of 4 / 8 / 16 / 32 rows 0.78 / 0.83 / 0.88 /
   0.90x the time). Activation rows are padded with zero rows to a multiple of 16. */

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define TW_AMX 1
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* The process may use tile data (Linux asks for it once); 1 if it may. */
int tw_amx_init(void) {
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

/* Every tile 16 rows of 64 bytes: C tiles 0-3 (16 x 16 float32), A tiles 4 and 6 (16 rows x 32 bfloat16),
   B tiles 5 and 7 (16 pairs of inputs x 16 weight rows). Each thread loads the configuration before its
   products. */
static void amx_configure(void) {
    TileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int i = 0; i < 8; i++) {
        cfg.rows[i] = 16;
        cfg.colsb[i] = 64;
    }
    _tile_loadconfig(&cfg);
}

static void amx_release(void) { _tile_release(); }

/* A panel's 16 float16 scales (one per weight row c) as the two halves of a B row's lanes need them: `lo` for
   the pairs of rows 0-7 (c0, c0, c1, c1, ..., c7, c7), `hi` for rows 8-15. */
static inline void pair_scales(const uint16_t *h16, __m512 *lo, __m512 *hi) {
    const __m512i lo_idx = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512 v = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)h16));
    *lo = _mm512_permutexvar_ps(lo_idx, v);
    *hi = _mm512_permutexvar_ps(_mm512_add_epi32(lo_idx, _mm512_set1_epi32(8)), v);
}

/* Group g of panel p, dequantized into B-tile layout at `tile` (512 bfloat16). */
static inline void amx_unpack_q4(const uint8_t *codes, const uint16_t *dm, uint16_t *tile) {
    __m512 d_lo, d_hi, m_lo, m_hi;
    pair_scales(dm, &d_lo, &d_hi);
    pair_scales(dm + 16, &m_lo, &m_hi);
    const __m256i low = _mm256_set1_epi8(0x0F);
    for (int i = 0; i < 8; i++) {
        const __m256i b = _mm256_loadu_si256((const __m256i *)(codes + 32 * i));
        const __m256i halves[2] = {_mm256_and_si256(b, low), _mm256_and_si256(_mm256_srli_epi16(b, 4), low)};
        for (int h = 0; h < 2; h++) {  /* low nibbles: B row i; high nibbles: B row i + 8 */
            const __m512 first = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(halves[h]))), d_lo, m_lo);
            const __m512 second = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(halves[h], 1))), d_hi, m_hi);
            _mm512_storeu_si512(tile + 32 * (i + 8 * h), (__m512i)_mm512_cvtne2ps_pbh(second, first));
        }
    }
}

/* Group g of a Q8_0 panel (512 bytes: byte (i, c, p) is input 2i + p of weight row c), w = d q, into B-tile
   layout at `tile`. */
static inline void amx_unpack_q8(const int8_t *codes, const uint16_t *d16, uint16_t *tile) {
    __m512 d_lo, d_hi;
    pair_scales(d16, &d_lo, &d_hi);
    for (int i = 0; i < 16; i++) {
        const __m512 first = _mm512_mul_ps(
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(codes + 32 * i)))), d_lo);
        const __m512 second = _mm512_mul_ps(
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(codes + 32 * i + 16)))), d_hi);
        _mm512_storeu_si512(tile + 32 * i, (__m512i)_mm512_cvtne2ps_pbh(second, first));
    }
}

/* A matrix in panels, 4-bit (Q4Mat) or 8-bit (Q8Mat), as the panel loop reads it. */
typedef struct {
    int64_t n, k;
    const uint8_t *panels;   /* (ceil(n / 16), k / 32, 256 or 512) */
    const uint16_t *scales;  /* (ceil(n / 16), k / 32, 32 (d, m) or 16 (d)) */
    const float *bias;
    int q8;
} AmxMat;

static inline void amx_unpack(const AmxMat *w, int64_t p, int64_t g, uint16_t *tile) {
    const int64_t at = p * (w->k / GROUP) + g;
    if (w->q8)
        amx_unpack_q8((const int8_t *)w->panels + at * 512, w->scales + at * 16, tile);
    else
        amx_unpack_q4(w->panels + at * 256, w->scales + at * 32, tile);
}

/* C tile `c` (0-3) stored at dst, rows `stride` bytes apart (tile numbers are immediates). */
static inline __attribute__((always_inline)) void amx_store_tile(int c, void *dst, int64_t stride) {
    switch (c) {
        case 0: _tile_stored(0, dst, stride); break;
        case 1: _tile_stored(1, dst, stride); break;
        case 2: _tile_stored(2, dst, stride); break;
        default: _tile_stored(3, dst, stride); break;
    }
}

/* C tile `c` (16 x 16 float32) stored into rows [r0, r0 + 16) and columns [n0, n0 + 16) of y, those of them that
   exist (rows < `rows`, columns < w->n), plus the bias. */
static void amx_store(int c, float *cbuf, const AmxMat *w, float *y, int64_t ldy, int64_t rows, int64_t r0, int64_t n0) {
    if (r0 >= rows || n0 >= w->n) return;
    amx_store_tile(c, cbuf, 64);
    const int64_t nr = rows - r0 < 16 ? rows - r0 : 16, nc = w->n - n0 < 16 ? w->n - n0 : 16;
    for (int64_t r = 0; r < nr; r++) {
        float *dst = y + (r0 + r) * ldy + n0;
        if (nc == 16 && !w->bias)
            _mm512_storeu_ps(dst, _mm512_load_ps(cbuf + 16 * r));
        else
            for (int64_t j = 0; j < nc; j++) dst[j] = cbuf[16 * r + j] + (w->bias ? w->bias[n0 + j] : 0.f);
    }
}

/* C tile `c` straight into y when it is a whole tile of y without bias (products of more than 32 rows; 2026-11-29:
   products of 512-2,048 rows 0.94x the time, where the decode pass measured 1.04x and keeps amx_store's copy); 0
   when not (then amx_store). */
static int amx_store_whole(int c, const AmxMat *w, float *y, int64_t ldy, int64_t rows, int64_t r0, int64_t n0) {
    if (r0 + 16 > rows || n0 + 16 > w->n || w->bias) return 0;
    amx_store_tile(c, y + r0 * ldy + n0, ldy * 4);
    return 1;
}

/* One group's products into the C tiles: B tiles b0 (and b1, `two` panels) against A tiles a0 (and a1, `tall`:
   32 activation rows); each tile loaded serves two products. */
static inline __attribute__((always_inline)) void amx_group(const uint16_t *b0, const uint16_t *b1, const uint16_t *a0,
                                                            const uint16_t *a1, int two, int tall) {
    _tile_loadd(5, b0, 64);
    _tile_loadd(4, a0, 64);
    _tile_dpbf16ps(0, 4, 5);
    if (two) {
        _tile_loadd(7, b1, 64);
        _tile_dpbf16ps(1, 4, 7);
    }
    if (tall) {
        _tile_loadd(6, a1, 64);
        _tile_dpbf16ps(2, 6, 5);
        if (two) _tile_dpbf16ps(3, 6, 7);
    }
}

/* Panels [p0, p1) of y = x W^T (+ bias): xb the activations as A tiles (round_groups_bf16: mp rows, a multiple of
   16), y (rows, n) with row stride ldy. `btiles`: this thread's buffer of 2 k / 32 tiles. Two panels and 32
   activation rows at a time, in four C tiles (0, 1: rows 0-15 of the two panels; 2, 3: rows 16-31), the A
   tiles 4 and 6, the B tiles 5 and 7: each tile loaded serves two products. */
static void amx_panels(const AmxMat *w, const uint16_t *xb, int64_t mp, int64_t rows, float *y, int64_t ldy,
                          int64_t p0, int64_t p1, uint16_t *btiles) {
    const int64_t k = w->k, G = k / GROUP;
    float cbuf[16 * 16] __attribute__((aligned(64)));
    for (int64_t p = p0; p < p1; p += 2) {
        const int two = p + 1 < p1;
        if (mp <= 32) {  /* one pass of the activation rows: each group unpacked just before its products */
            const int tall = mp == 32;
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
            for (int64_t g = 0; g < G; g++) {
                uint16_t *b0 = btiles + (g & 1) * 1024, *b1 = b0 + 512;  /* two pairs of tiles, alternated */
                amx_unpack(w, p, g, b0);
                if (two) amx_unpack(w, p + 1, g, b1);
                amx_group(b0, b1, xb + g * 512, xb + (G + g) * 512, two, tall);
            }
            amx_store(0, cbuf, w, y, ldy, rows, 0, 16 * p);
            if (two) amx_store(1, cbuf, w, y, ldy, rows, 0, 16 * p + 16);
            if (tall) amx_store(2, cbuf, w, y, ldy, rows, 16, 16 * p);
            if (tall && two) amx_store(3, cbuf, w, y, ldy, rows, 16, 16 * p + 16);
            continue;
        }
        for (int64_t j = 0; j <= two; j++)
            for (int64_t g = 0; g < G; g++)
                amx_unpack(w, p + j, g, btiles + (j * G + g) * 512);
        for (int64_t mc = 0; mc < mp; mc += 32) {
            const int tall = mp - mc >= 32;
            const uint16_t *a0 = xb + (mc / 16) * G * 512, *a1 = a0 + G * 512;  /* A tile (m, g) at (m G + g) 512 */
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
            for (int64_t g = 0; g < G; g++)
                amx_group(btiles + g * 512, btiles + (G + g) * 512, a0 + g * 512, a1 + g * 512, two, tall);
            if (!amx_store_whole(0, w, y, ldy, rows, mc, 16 * p)) amx_store(0, cbuf, w, y, ldy, rows, mc, 16 * p);
            if (two && !amx_store_whole(1, w, y, ldy, rows, mc, 16 * p + 16))
                amx_store(1, cbuf, w, y, ldy, rows, mc, 16 * p + 16);
            if (tall && !amx_store_whole(2, w, y, ldy, rows, mc + 16, 16 * p))
                amx_store(2, cbuf, w, y, ldy, rows, mc + 16, 16 * p);
            if (tall && two && !amx_store_whole(3, w, y, ldy, rows, mc + 16, 16 * p + 16))
                amx_store(3, cbuf, w, y, ldy, rows, mc + 16, 16 * p + 16);
        }
    }
}

#else
#define TW_AMX 0
int tw_amx_init(void) { return 0; }
static void amx_configure(void) {}
static void amx_release(void) {}
#endif
