/* Sampling's exponential race on the CPU, with counter-based draws (included by kernels.c).

   A row samples token argmax_j (x_j - log E_j), E_j ~ Exp(1) = -log(U_j): the softmax's choice without the
   softmax (tokenworks/model/race.py says why, and holds the same arithmetic in PyTorch). U_j is a hash of
   (j, the row's 64-bit key): two rounds of a 32-bit integer mixer, keyed by the key's halves, its top 23 bits
   taken as ((h >> 9) + 0.5) 2^-23, exactly as race.py computes it. Nothing is drawn in sequence, so a row
   costs one pass over its logits and any row can be drawn on any thread.

   Written on GCC's vector extensions, LANES floats wide: on AVX-512 one register, on AVX2 two. */

#define RACE_LANES 16
typedef float race_f __attribute__((vector_size(4 * RACE_LANES)));
typedef int32_t race_i __attribute__((vector_size(4 * RACE_LANES)));
typedef uint32_t race_u __attribute__((vector_size(4 * RACE_LANES)));

/* The mixer (multiply by odd constants, fold the high bits down): a bijection of 32-bit words. */
static inline race_u race_mix(race_u h) {
    h ^= h >> 16;
    h *= 0x7feb352du;
    h ^= h >> 15;
    h *= 0x846ca68bu;
    h ^= h >> 16;
    return h;
}

/* Natural logarithm of positive normal floats: x = 2^e m with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s) with
   s = (m - 1) / (m + 1), |s| < 0.172, by its series to s^9 (the next term is below float's precision). */
static inline race_f race_log(race_f x) {
    race_i bits = (race_i)x;
    race_i e = (bits - 0x3f3504f3) >> 23;  /* 0x3f3504f3: sqrt(1/2)'s bits; GCC shifts signed words arithmetically */
    race_f m = (race_f)(bits - (e << 23));
    race_f s = (m - 1.0f) / (m + 1.0f);
    race_f z = s * s;
    race_f series = 1.0f + z * (1.0f / 3 + z * (1.0f / 5 + z * (1.0f / 7 + z * (1.0f / 9))));
    return __builtin_convertvector(e, race_f) * 0.693147180559945f + 2.0f * s * series;
}

/* One row: the first index of its largest x_j - log(-log U_j). */
static int64_t race_row(const float *x, int64_t vocab, uint64_t key) {
    const uint32_t k1 = (uint32_t)key, k2 = (uint32_t)(key >> 32);
    race_u index;
    for (int l = 0; l < RACE_LANES; l++) index[l] = (uint32_t)l;
    race_f best;
    race_i best_at;
    for (int l = 0; l < RACE_LANES; l++) {
        best[l] = -INFINITY;
        best_at[l] = 0;
    }
    for (int64_t j0 = 0; j0 < vocab; j0 += RACE_LANES) {
        race_f v;
        if (j0 + RACE_LANES <= vocab) {
            memcpy(&v, x + j0, sizeof v);
        } else {  /* the last, partial vector: padded with -inf, which never wins */
            for (int l = 0; l < RACE_LANES; l++) v[l] = j0 + l < vocab ? x[j0 + l] : -INFINITY;
        }
        race_u j = index + (uint32_t)j0;
        race_u h = race_mix(race_mix(j ^ k1) ^ k2);
        race_f u = (__builtin_convertvector(h >> 9, race_f) + 0.5f) * (1.0f / 8388608.0f);
        race_f score = v - race_log(-race_log(u));
        race_i wins = score > best;  /* lanes: -1 where true; a later equal score never replaces an earlier one */
        best = (race_f)(((race_i)score & wins) | ((race_i)best & ~wins));
        best_at = ((race_i)j & wins) | (best_at & ~wins);
    }
    float top = -INFINITY;
    int64_t at = 0;
    for (int l = 0; l < RACE_LANES; l++)
        if (best[l] > top || (best[l] == top && best_at[l] < at)) {
            top = best[l];
            at = best_at[l];
        }
    return at;
}

/* rows x vocab logits (row r at x + r stride), a key per row: the chosen token of each row into out. */
void tw_race(const float *x, int64_t rows, int64_t vocab, int64_t stride, const uint64_t *keys, int64_t *out,
             int threads) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (rows > 1)
    for (int64_t r = 0; r < rows; r++) out[r] = race_row(x + r * stride, vocab, keys[r]);
}
