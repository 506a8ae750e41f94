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

/* Lanes of a where mask (-1), of b elsewhere. */
static inline race_f race_select(race_i mask, race_f a, race_f b) {
    return (race_f)(((race_i)a & mask) | ((race_i)b & ~mask));
}

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

/* log E_j = log(-log U_j) for tokens j: the race's noise. */
static inline race_f race_noise(race_u j, uint32_t k1, uint32_t k2) {
    race_u h = race_mix(race_mix(j ^ k1) ^ k2);
    race_f u = (__builtin_convertvector(h >> 9, race_f) + 0.5f) * (1.0f / 8388608.0f);
    return race_log(-race_log(u));
}

/* One row at temperature 1 / inv_t: the first index of its largest x_j inv_t - log(-log U_j). */
static int64_t race_row(const float *x, int64_t vocab, float inv_t, uint64_t key) {
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
        race_f score = v * inv_t - race_noise(j, k1, k2);
        race_i wins = score > best;  /* lanes: -1 where true; a later equal score never replaces an earlier one */
        best = race_select(wins, score, best);
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

/* -- top-k, top-p and min-p before the race ------------------------------------------------------- */

/* exp(-d) for d >= 0 (0 past 87): 2^(-d / ln 2) split into 2^-n 2^-f, f in [0, 1), 2^-f by its Taylor series in
   f ln 2 to the 8th power (relative error below 2e-7). */
static inline race_f race_exp_neg(race_f d) {
    race_f t = d * 1.44269504088896f;  /* d / ln 2 */
    race_i under = t >= 126.0f;
    race_f cap = race_select(under, (race_f){0} + 126.0f, t);
    race_i n = __builtin_convertvector(cap, race_i);  /* truncates: n <= t */
    race_f a = (cap - __builtin_convertvector(n, race_f)) * -0.693147180559945f;  /* -f ln 2, in (-0.7, 0] */
    race_f p = 1.0f + a * (1.0f + a * (0.5f + a * (1.0f / 6 + a * (1.0f / 24 + a * (1.0f / 120 + a * (1.0f / 720
               + a * (1.0f / 5040 + a * (1.0f / 40320))))))));
    race_f scaled = (race_f)((race_i)p - (n << 23));  /* p 2^-n */
    return race_select(under, (race_f){0}, scaled);
}

typedef struct {
    float d;    /* (max - x) / temperature: 0 for the most likely token */
    float m;    /* exp(-d): its probability relative to the most likely token's */
    int32_t j;  /* token */
} RaceCandidate;

static int race_by_d(const void *a, const void *b) {
    const RaceCandidate *p = a, *q = b;
    if (p->d != q->d) return p->d < q->d ? -1 : 1;
    return p->j < q->j ? -1 : p->j > q->j;
}

/* The tokens of row x with (max - x_j) / T below `reach`, in order of token, into c; their count. */
static int64_t race_gather(const float *x, int64_t vocab, float top, float inv_t, float reach, RaceCandidate *c) {
    int64_t count = 0;
    for (int64_t j0 = 0; j0 < vocab; j0 += RACE_LANES) {
        int64_t lanes = vocab - j0 < RACE_LANES ? vocab - j0 : RACE_LANES;
        race_f v;
        if (lanes == RACE_LANES) {
            memcpy(&v, x + j0, sizeof v);
        } else {
            for (int l = 0; l < RACE_LANES; l++) v[l] = l < lanes ? x[j0 + l] : -INFINITY;
        }
        race_f d = ((race_f){0} + top - v) * inv_t;
        race_i in = d < reach;
        int any = 0;
        for (int l = 0; l < RACE_LANES; l++) any |= in[l];
        if (!any) continue;
        race_f m = race_exp_neg(d);
        for (int l = 0; l < lanes; l++)
            if (in[l]) c[count++] = (RaceCandidate){d[l], m[l], (int32_t)(j0 + l)};
    }
    return count;
}

/* The race among n chosen tokens of row x (scores x_j / T - log E_j, the same arithmetic as race_row's): the first
   token of the best score. */
static int64_t race_among(const float *x, const RaceCandidate *c, int64_t n, float inv_t, uint64_t key) {
    const uint32_t k1 = (uint32_t)key, k2 = (uint32_t)(key >> 32);
    float top = -INFINITY;
    int64_t at = c[0].j;
    for (int64_t i0 = 0; i0 < n; i0 += RACE_LANES) {
        race_f v;
        race_u j;
        for (int l = 0; l < RACE_LANES; l++) {
            int64_t i = i0 + l < n ? i0 + l : n - 1;  /* a last partial vector repeats the last token */
            j[l] = (uint32_t)c[i].j;
            v[l] = x[c[i].j];
        }
        race_f score = v * inv_t - race_noise(j, k1, k2);
        for (int l = 0; l < RACE_LANES; l++)
            if (score[l] > top || (score[l] == top && (int64_t)j[l] < at)) {
                top = score[l];
                at = j[l];
            }
    }
    return at;
}

/* Of n candidates, those that come first in order of d (then token), moved to the front of c; their count. By
   count (mass < 0): the first `count`. By mass: each one whose predecessors' m sum to less than `mass` (the first
   always). Sorting only the bin of d where the limit falls (bins of 1/16: a flat row's candidates are tens of
   thousands). spare: room for n candidates. */
#define RACE_BINS 1024
static int64_t race_first(RaceCandidate *c, int64_t n, int64_t count, float mass, RaceCandidate *spare) {
    int32_t in_bin[RACE_BINS] = {0};
    float bin_mass[RACE_BINS] = {0};
    for (int64_t i = 0; i < n; i++) {
        int b = c[i].d < (RACE_BINS - 1) / 16.0f ? (int)(c[i].d * 16.0f) : RACE_BINS - 1;
        in_bin[b]++;
        bin_mass[b] += c[i].m;
    }
    int64_t before = 0;
    float mass_before = 0.0f;
    int edge = 0;
    for (; edge < RACE_BINS; edge++) {
        if (mass < 0 ? before + in_bin[edge] >= count : mass_before + bin_mass[edge] >= mass) break;
        before += in_bin[edge];
        mass_before += bin_mass[edge];
    }
    if (edge == RACE_BINS) return n;  /* the limit is past them all (rounding): every one */
    int64_t front = 0, at_edge = before;
    for (int64_t i = 0; i < n; i++) {  /* the bins before the edge, then the edge's bin after them */
        int b = c[i].d < (RACE_BINS - 1) / 16.0f ? (int)(c[i].d * 16.0f) : RACE_BINS - 1;
        if (b < edge) spare[front++] = c[i];
        else if (b == edge) spare[at_edge++] = c[i];
    }
    qsort(spare + before, (size_t)(at_edge - before), sizeof *spare, race_by_d);
    int64_t kept = before;
    if (mass < 0) {
        kept = count;
    } else {
        while (kept < at_edge && (kept == 0 || mass_before < mass)) mass_before += spare[kept++].m;
    }
    memcpy(c, spare, (size_t)kept * sizeof *c);
    return kept;
}

/* One row's token at temperature 1 / inv_t among the tokens top-k (k > 0), top-p (p < 1) and min-p (> 0) keep:
   the tokens in order of d = (max - x) / T, the first k kept, then those whose predecessors' probability (over the
   kept k, or the whole row) is below p, then those with exp(-d) >= min_p; the most likely always. Only tokens
   within a reach of the top are looked at: 8 nats, then 4 more at a time up to 64, then the whole row, until the
   reach holds the k tokens or probability p (or min-p's bound, past which nothing is kept). c, spare: room for
   vocab candidates each. */
static int64_t race_kept(const float *x, int64_t vocab, float inv_t, int64_t k, float p, float min_p, uint64_t key,
                         RaceCandidate *c, RaceCandidate *spare) {
    race_f most;
    for (int l = 0; l < RACE_LANES; l++) most[l] = -INFINITY;
    int64_t full = vocab / RACE_LANES * RACE_LANES;
    for (int64_t j0 = 0; j0 < full; j0 += RACE_LANES) {
        race_f v;
        memcpy(&v, x + j0, sizeof v);
        most = race_select(v > most, v, most);
    }
    float top = -INFINITY;
    for (int l = 0; l < RACE_LANES; l++) top = most[l] > top ? most[l] : top;
    for (int64_t j = full; j < vocab; j++) top = x[j] > top ? x[j] : top;
    if (top == -INFINITY) return 0;  /* nothing allowed: as the race over the row would answer */

    float total = 0.0f;  /* the row's probability mass relative to its top token's, where top-p reads it */
    if (p < 1.0f && k == 0) {
        race_f sum = {0};
        for (int64_t j0 = 0; j0 < full; j0 += RACE_LANES) {
            race_f v;
            memcpy(&v, x + j0, sizeof v);
            sum += race_exp_neg(((race_f){0} + top - v) * inv_t);  /* -inf logits: d = inf, exp 0 */
        }
        for (int l = 0; l < RACE_LANES; l++) total += sum[l];
        for (int64_t j = full; j < vocab; j++) total += expf(-(top - x[j]) * inv_t);
    }
    const float bound = min_p > 0.0f ? fmaxf(-logf(min_p), 0.0f) : INFINITY;  /* min-p keeps d <= bound */
    /* the reach ends at min-p's bound, except where top-p reads the probability of all top-k tokens */
    const float beyond = k > 0 && p < 1.0f ? INFINITY : nextafterf(bound, INFINITY);
    float reach = k > 0 || p < 1.0f ? 8.0f : beyond;  /* min-p alone: its bound */
    int64_t n;
    for (;; reach += 4.0f) {
        if (reach > 64.0f || reach >= beyond) reach = beyond;
        n = race_gather(x, vocab, top, inv_t, reach, c);
        if (reach == beyond || (k > 0 && n >= k)) break;
        if (k == 0) {
            float mass = 0.0f;
            for (int64_t i = 0; i < n; i++) mass += c[i].m;
            if (mass >= p * total) break;
        }
    }
    if (k > 0 && n > k) n = race_first(c, n, k, -1.0f, spare);
    if (p < 1.0f) {
        float norm = total;
        if (k > 0) {
            norm = 0.0f;
            for (int64_t i = 0; i < n; i++) norm += c[i].m;
        }
        n = race_first(c, n, 0, p * norm, spare);
    }
    int64_t kept = 0;  /* min-p: the most likely token (d = 0) is always among them */
    for (int64_t i = 0; i < n; i++)
        if (c[i].d <= bound) c[kept++] = c[i];
    if (kept == 0) {  /* not reached for a finite inv_t; never race among nothing */
        int64_t j = 0;
        while (j < vocab - 1 && !(x[j] == top)) j++;
        return j;
    }
    return race_among(x, c, kept, inv_t, key);
}

/* rows x vocab logits, per row an inverse temperature, top-k (<= 0: off), top-p (>= 1: off), min-p (<= 0: off) and
   a key: each row's token into out. Returns -1 where its buffers could not be allocated. */
int tw_sample(const float *x, int64_t rows, int64_t vocab, int64_t stride, const float *inv_t, const int64_t *top_k,
              const float *top_p, const float *min_p, const uint64_t *keys, int64_t *out, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads) if (rows > 1)
    {
        RaceCandidate *c = malloc((size_t)vocab * 2 * sizeof *c);
        if (c == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t r = 0; r < rows; r++) {
            if (c == NULL) continue;
            const float *row = x + r * stride;
            int64_t k = top_k[r] > 0 && top_k[r] < vocab ? top_k[r] : 0;
            if (k == 0 && top_p[r] >= 1.0f && min_p[r] <= 0.0f)
                out[r] = race_row(row, vocab, inv_t[r], keys[r]);
            else
                out[r] = race_kept(row, vocab, inv_t[r], k, top_p[r], min_p[r], keys[r], c, c + vocab);
        }
        free(c);
    }
    return failed ? -1 : 0;
}
