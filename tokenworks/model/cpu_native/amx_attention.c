/* A prompt chunk's attention on AMX tiles, included by kernels.c after its float32 tiles (attend_tile).

   Where a step's products run on AMX (amx.c) and the head size is a multiple of 32, a chunk's tiles of query
   heads are scored and weighed by the tile unit instead of the vector units: the float32 tiles spent most of a
   long context's prompt step in multiply-adds (`perf`, 32 tokens after 4,096 cached: 54 % of the step in
   attend_tile, nearly all of it vfmadd231ps).

   Float32 numbers from bfloat16 products: every operand x is split into hi = bfloat16(x) and lo = bfloat16(x -
   hi) (hi + lo holds a float16 K or V exactly, a float32 to 16 of its 24 bits), and the products accumulate in
   float32: a score as qh kh + ql kh + qh kl + ql kl, a weighed value as ph vh + pl vh + ph vl. A single bfloat16
   product per pair (2^-8 per operand) moved the random test models' outputs by up to 9 %, since a score's error
   is exponentiated; without the scores' ql kl one row of a 100-token chunk still moved by 1.3 %; as here, every
   row stays within 3e-4 of the float32 tiles. The running maximum, the exponentials and the sums stay float32 as
   in attend_tile.

   Per KV head the chunk's context is widened once into the layouts of B tiles (16 rows of 64 bytes, each row
   pairs of bfloat16 along the product's inner dimension), hi and lo side by side:
   - K, per panel of 16 keys and slice of 32 dimensions, two tiles (hi, lo): row i, column n holds key n's
     dimensions 2i and 2i + 1 (the scores' inner dimension is the head's);
   - V, per slice of 32 keys and 16 dimensions, two tiles (hi, lo): row i, column d holds dimension d of keys
     2i and 2i + 1 (the weighing's inner dimension is the keys').
   Each takes 2 ctxpad x D bfloat16 (ctxpad a multiple of 32; keys past the context are zeros): the float32
   layout's bytes.

   An int8 pool's values are small integers, exact in bfloat16: its K and V need no lo tiles, so a score is qh kh +
   ql kh times the key's scale and a weighed value ph vh + pl vh with each weight p first multiplied by its value's
   scale; the same float32 numbers from 2 + 2 products instead of 4 + 3 (the scales: Chunk.scales). */

#if TW_AMX
#define AMX_KEYS 32 /* a slice of keys: one A tile of weights */

/* 16 K or V values at p as float32 (an int8 row's without its scale). */
static inline __m512 load16_kv(const char *p, const int64_t kind) {
    if (kind == KV_F16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
    if (kind == KV_I8) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
    return _mm512_loadu_ps((const float *)p);
}

static inline __m512 bf16_back(__m256i h) { /* bfloat16 widened: float32's top half */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* a (16 values) then b (16 more) as 32 bfloat16 hi, and what hi leaves of them as 32 bfloat16 lo. */
static inline void split_bf16(__m512 a, __m512 b, __m512i *hi, __m512i *lo) {
    *hi = (__m512i)_mm512_cvtne2ps_pbh(b, a);
    *lo = (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(b, bf16_back(_mm512_extracti64x4_epi64(*hi, 1))),
                                       _mm512_sub_ps(a, bf16_back(_mm512_castsi512_si256(*hi))));
}

/* K and V of the chunk's tokens [t0, t1) (t0 even), every KV head, bfloat16 hi and lo into the chunk's tile slabs (an
   int8 pool's values, exact, as hi alone, and their scales into c->scales):
   each token's row of K (and of V) is read whole and in order, the rows a few tokens ahead asked for early (the
   reads, not the stores, bound this loop: 2026-11-29, 32 tokens after 4,096 cached, one KV head at a time and no
   prefetch took the step 1.13x the time). */
static void widen_chunk_amx(const Net *net, int64_t layer, const Chunk *c, const int32_t *table, int64_t t0,
                            int64_t t1) {
    const int64_t D = net->head_dim, bs = net->block_size, kind = net->kv_kind, elem = kv_elem(kind), nkv = net->num_kv_heads;
    const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                           23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int64_t t = t0; t < t1; t += 2) {
        const int second = t + 1 < t1;
        for (int64_t u = t + WIDEN_AHEAD; u < t + WIDEN_AHEAD + 2 && u < t1; u++) widen_prefetch(net, layer, table, u);
        const char *k[2], *v[2];
        for (int j = 0; j <= second; j++) {
            k[j] = (const char *)kv_at(net, layer, 0, table[(t + j) / bs], (t + j) % bs);
            v[j] = (const char *)kv_at(net, layer, 1, table[(t + j) / bs], (t + j) % bs);
        }
        for (int64_t kh = 0; kh < nkv; kh++) {
            uint16_t *kt = (uint16_t *)c->wide + kh * 4 * D * c->ctxpad, *vt = kt + 2 * D * c->ctxpad;
            const int64_t at = kh * head_bytes(D, kind);
            for (int j = 0; j <= second; j++) { /* K: key t + j's dimension pairs down column (t + j) % 16 */
                uint32_t *col = (uint32_t *)(kt + (t + j) / 16 * 32 * D) + (t + j) % 16;
                if (kind == KV_I8) {
                    c->scales[kh * 2 * c->ctxpad + t + j] = row_scale(k[j] + at, D, kind);
                    for (int64_t d = 0; d < D; d += 32) {
                        uint32_t hi[16];
                        _mm512_storeu_si512(hi, (__m512i)_mm512_cvtne2ps_pbh(load16_kv(k[j] + at + d + 16, kind),
                                                                             load16_kv(k[j] + at + d, kind)));
                        for (int i = 0; i < 16; i++) col[(d / 32 * 32 + i) * 16] = hi[i];
                    }
                    continue;
                }
                for (int64_t d = 0; d < D; d += 32) {
                    __m512i h, l;
                    split_bf16(load16_kv(k[j] + at + d * elem, kind), load16_kv(k[j] + at + (d + 16) * elem, kind), &h, &l);
                    uint32_t hi[16], lo[16];
                    _mm512_storeu_si512(hi, h);
                    _mm512_storeu_si512(lo, l);
                    for (int i = 0; i < 16; i++) {
                        col[(d / 32 * 32 + i) * 16] = hi[i];
                        col[(d / 32 * 32 + 16 + i) * 16] = lo[i];
                    }
                }
            }
            /* V: keys t and t + 1 interleaved into row (t % 32) / 2 of their slice's tiles */
            uint16_t *row = vt + t / AMX_KEYS * 2 * AMX_KEYS * D + (t % AMX_KEYS) / 2 * 32;
            if (kind == KV_I8) {
                float *vscale = c->scales + (kh * 2 + 1) * c->ctxpad + t;
                vscale[0] = row_scale(v[0] + at, D, kind);
                if (second) vscale[1] = row_scale(v[1] + at, D, kind);
                for (int64_t d = 0; d < D; d += 16) {
                    const __m512 a = load16_kv(v[0] + at + d, kind);
                    const __m512 b = second ? load16_kv(v[1] + at + d, kind) : _mm512_setzero_ps();
                    _mm512_storeu_si512(row + d / 16 * 1024, _mm512_permutexvar_epi16(pairs, (__m512i)_mm512_cvtne2ps_pbh(b, a)));
                }
                continue;
            }
            for (int64_t d = 0; d < D; d += 16) { /* float32 or float16: hi and lo */
                const __m512 a = load16_kv(v[0] + at + d * elem, kind);
                const __m512 b = second ? load16_kv(v[1] + at + d * elem, kind) : _mm512_setzero_ps();
                __m512i hi, lo;
                split_bf16(a, b, &hi, &lo);
                _mm512_storeu_si512(row + d / 16 * 1024, _mm512_permutexvar_epi16(pairs, hi));
                _mm512_storeu_si512(row + d / 16 * 1024 + 512, _mm512_permutexvar_epi16(pairs, lo));
            }
        }
    }
}

/* C tile j (0-3) += the split product of the A tiles 4 (hi) and 6 (lo) and the B tiles at b (hi) and b + 512
   (lo), its first `terms` of ah bh + al bh + ah bl + al bl (2: B exact in its hi tile). Tile numbers are
   immediates. */
#define AMX_SPLIT_INTO(c, b, terms) do { _tile_loadd(5, b, 64); _tile_dpbf16ps(c, 4, 5); _tile_dpbf16ps(c, 6, 5); \
                                         if ((terms) > 2) { _tile_loadd(7, (b) + 512, 64); _tile_dpbf16ps(c, 4, 7); \
                                                            if ((terms) > 3) _tile_dpbf16ps(c, 6, 7); } } while (0)
#define AMX_SPLIT(j, b, terms) do { switch (j) {                                                                \
        case 0: AMX_SPLIT_INTO(0, b, terms); break; case 1: AMX_SPLIT_INTO(1, b, terms); break;                 \
        case 2: AMX_SPLIT_INTO(2, b, terms); break; default: AMX_SPLIT_INTO(3, b, terms); } } while (0)

/* As attend_tile, on tiles: rows [i0, i1) of chunk c, KV head kh. s: this thread's scratch of TILE_ROWS * per_kv
   * KEY_RUN floats for a key run's scores, then twice as many bfloat16 for its weights (hi, lo). The query
   heads go 16 to an A tile (a tile's rows are a multiple of 16 / per_kv where they can be: tile_rows_of). */
static void attend_tile_amx(const Net *net, const Chunk *c, int64_t kh, int64_t i0, int64_t i1, const float *qkv,
                            int64_t qkv_n, float *attn, float *s) {
    const int64_t D = net->head_dim, nh = net->num_heads, per_kv = nh / net->num_kv_heads;
    const uint16_t *kt = (const uint16_t *)c->wide + kh * 4 * D * c->ctxpad, *vt = kt + 2 * D * c->ctxpad;
    const int64_t nq = (i1 - i0) * per_kv, nqp = (nq + 15) / 16 * 16, n = c->p0 + i1;
    uint16_t *pb = (uint16_t *)(s + TILE_ROWS * per_kv * KEY_RUN); /* the weights as A tiles: rows KEY_RUN apart */
    uint16_t *pl = pb + TILE_ROWS * per_kv * KEY_RUN;
    uint16_t qh[nqp * D], ql[nqp * D];                             /* the scaled queries, hi + lo, rows D apart */
    float top[nq], total[nq], cbuf[16 * 16] __attribute__((aligned(64)));
    float *o[nq], *sp[nq];
    int64_t seen[nq];
    const __m512 scale = _mm512_set1_ps(net->scale);
    const int exact = c->scales != NULL; /* an int8 pool's K and V: hi alone, and the scales */
    const float *kscale = exact ? c->scales + kh * 2 * c->ctxpad : NULL, *vscale = exact ? kscale + c->ctxpad : NULL;
    for (int64_t m = 0; m < nqp; m++) {
        if (m >= nq) {
            memset(qh + m * D, 0, D * sizeof(uint16_t));
            memset(ql + m * D, 0, D * sizeof(uint16_t));
            memset(pb + m * KEY_RUN, 0, KEY_RUN * sizeof(uint16_t));
            memset(pl + m * KEY_RUN, 0, KEY_RUN * sizeof(uint16_t));
            continue;
        }
        const int64_t i = i0 + m / per_kv, head = kh * per_kv + m % per_kv;
        const float *q = qkv + (c->row + i) * qkv_n + head * D;
        for (int64_t d = 0; d < D; d += 32) {
            __m512i hi, lo;
            split_bf16(_mm512_mul_ps(_mm512_loadu_ps(q + d), scale), _mm512_mul_ps(_mm512_loadu_ps(q + d + 16), scale),
                       &hi, &lo);
            _mm512_storeu_si512(qh + m * D + d, hi);
            _mm512_storeu_si512(ql + m * D + d, lo);
        }
        o[m] = attn + (c->row + i) * nh * D + head * D;
        memset(o[m], 0, D * sizeof(float));
        sp[m] = s + m * KEY_RUN;
        seen[m] = c->p0 + i + 1;
        top[m] = -INFINITY, total[m] = 0.f;
    }
    for (int64_t r0 = 0; r0 < n; r0 += KEY_RUN) {
        const int64_t len = n - r0 < KEY_RUN ? n - r0 : KEY_RUN, lpad = (len + AMX_KEYS - 1) / AMX_KEYS * AMX_KEYS;
        for (int64_t m0 = 0; m0 < nqp; m0 += 16) /* scores: 16 queries x up to 64 keys in C tiles 0-3 */
            for (int64_t t0 = 0; t0 < lpad; t0 += 64) {
                const int panels = lpad - t0 < 64 ? 2 : 4;
                _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                for (int64_t d = 0; d < D; d += 32) {
                    _tile_loadd(4, qh + m0 * D + d, D * 2);
                    _tile_loadd(6, ql + m0 * D + d, D * 2);
                    for (int j = 0; j < panels; j++)
                        AMX_SPLIT(j, kt + ((r0 + t0) / 16 + j) * 32 * D + d / 32 * 1024, exact ? 2 : 4);
                }
                for (int j = 0; j < panels; j++) amx_store_tile(j, s + m0 * KEY_RUN + t0 + 16 * j, KEY_RUN * 4);
            }
        for (int64_t m = 0; m < nq; m++) { /* the run's weights, against the largest score so far, split */
            if (exact)
                for (int64_t t = 0; t < lpad; t += 16)
                    _mm512_storeu_ps(sp[m] + t, _mm512_mul_ps(_mm512_loadu_ps(sp[m] + t), _mm512_loadu_ps(kscale + r0 + t)));
            fold_run(sp[m], seen[m] - r0 < len ? seen[m] - r0 : len, lpad, &top[m], &total[m], o[m], D);
            for (int64_t t = 0; t < lpad; t += 32) {
                __m512 a = _mm512_loadu_ps(sp[m] + t), b = _mm512_loadu_ps(sp[m] + t + 16);
                if (exact) {
                    a = _mm512_mul_ps(a, _mm512_loadu_ps(vscale + r0 + t));
                    b = _mm512_mul_ps(b, _mm512_loadu_ps(vscale + r0 + t + 16));
                }
                __m512i hi, lo;
                split_bf16(a, b, &hi, &lo);
                _mm512_storeu_si512(pb + m * KEY_RUN + t, hi);
                _mm512_storeu_si512(pl + m * KEY_RUN + t, lo);
            }
        }
        for (int64_t m0 = 0; m0 < nqp; m0 += 16) /* weighed values: 16 queries x up to 64 dimensions in C tiles 0-3 */
            for (int64_t d0 = 0; d0 < D; d0 += 64) {
                const int nd = (D - d0) / 16 < 4 ? (int)((D - d0) / 16) : 4;
                _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                for (int64_t t = 0; t < lpad; t += AMX_KEYS) {
                    _tile_loadd(4, pb + m0 * KEY_RUN + t, KEY_RUN * 2);
                    _tile_loadd(6, pl + m0 * KEY_RUN + t, KEY_RUN * 2);
                    const uint16_t *slice = vt + (r0 + t) / AMX_KEYS * 2 * AMX_KEYS * D + d0 / 16 * 1024;
                    for (int j = 0; j < nd; j++) AMX_SPLIT(j, slice + j * 1024, exact ? 2 : 3);
                }
                for (int j = 0; j < nd; j++) {
                    amx_store_tile(j, cbuf, 64);
                    for (int64_t r = 0; r < 16 && m0 + r < nq; r++) {
                        float *dst = o[m0 + r] + d0 + 16 * j;
                        _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), _mm512_load_ps(cbuf + 16 * r)));
                    }
                }
            }
    }
    for (int64_t m = 0; m < nq; m++) {
        const float inv = 1.f / total[m];
        for (int64_t d = 0; d < D; d++) o[m][d] *= inv;
    }
}
#undef AMX_SPLIT
#undef AMX_SPLIT_INTO
#else
static void widen_chunk_amx(const Net *net, int64_t layer, const Chunk *c, const int32_t *table, int64_t t0,
                            int64_t t1) {}
static void attend_tile_amx(const Net *net, const Chunk *c, int64_t kh, int64_t i0, int64_t i1, const float *qkv,
                            int64_t qkv_n, float *attn, float *s) {}
#endif
