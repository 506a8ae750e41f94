/* Structured output's masks applied to logits (included by kernels.c, after race.c, whose vector types it uses): a
   grammar allows token j where bit j % 32 of word j / 32 of its row's mask is set (llguidance's bitmask layout);
   the logits of the others become -inf. */

void tw_grammar_mask(float *x, int64_t rows, int64_t vocab, int64_t stride, const uint32_t *words,
                     int64_t words_stride) {
    race_u lane;
    for (int l = 0; l < RACE_LANES; l++) lane[l] = (uint32_t)l;
    const race_f blocked = (race_f){0} - INFINITY;
    for (int64_t r = 0; r < rows; r++) {
        float *row = x + r * stride;
        const uint32_t *w = words + r * words_stride;
        int64_t j = 0;
        for (; j + RACE_LANES <= vocab; j += RACE_LANES) {  /* RACE_LANES divides 32: one word's bits per vector */
            race_u bits = ((race_u){0} + w[j >> 5]) >> (lane + (uint32_t)(j & 31));
            race_i allowed = (race_i)(bits & 1u) != 0;
            race_f v;
            memcpy(&v, row + j, sizeof v);
            v = race_select(allowed, v, blocked);
            memcpy(row + j, &v, sizeof v);
        }
        for (; j < vocab; j++)
            if (!((w[j >> 5] >> (j & 31)) & 1u)) row[j] = -INFINITY;
    }
}
