/* edgeq Q-CNN fast-scan kernels: segmented scans and the AVX-512 table builders.
 *
 * Included once, by fastscan_kernels.h (before the path table). A segmented scan reads its tables from
 * `nseg` segments of `seglen` consecutive 16-byte rows, segment i starting at lut + i * lut_step bytes,
 * against codes + i * seglen * 16: a convolution's kernel row a (kw taps, all subspaces of the one group)
 * is one segment of the padded position-major table array, so an output position is scanned straight
 * from the tables without first gathering its taps' rows into one buffer. The integer sums are the
 * plain scan's, on every path; any seglen (a segment's last step looks up zeros in the lanes past its end).
 *
 * sums[32] = sum over the segments' rows of lut[row, code(row, output)], outputs of one block of 32; with
 * o->y set, the layer's outputs y[i] = bias[i] + off + scale * sums[i] (i < nt) instead, in conv_sample's
 * arithmetic (fastscan.c: no multiply-add contraction), so every path still gives the same floats.
 */
#ifndef EDGEQ_FASTSCAN_SEG_H
#define EDGEQ_FASTSCAN_SEG_H

typedef struct {
    const float *bias;  /* [nt] */
    const float *offs;  /* [npos]: each position's offset (sum of its rows' minima) */
    float scale;
    Py_ssize_t nt;      /* outputs of this block, <= 32 */
    Py_ssize_t npos;    /* output positions scanned in one call (one output row) ... */
    Py_ssize_t lut_pos; /* ... their tables lut_pos bytes apart ... */
    Py_ssize_t y_pos;   /* ... and their outputs y_pos floats apart */
    int relu;           /* max(y, 0) */
    float *y;           /* NULL: write the sums of one position */
} seg_out_t;

typedef void (*scan_seg_fn)(const uint8_t *codes, const uint8_t *lut, Py_ssize_t nseg, Py_ssize_t seglen,
                            Py_ssize_t lut_step, const seg_out_t *o, uint32_t *sums);

/* Outputs of position p from its sums. */
static void seg_out_scalar(const uint32_t *sums, const seg_out_t *o, Py_ssize_t p) {
    float *y = o->y + p * o->y_pos;
    for (Py_ssize_t i = 0; i < o->nt; i++) {
        float v = o->bias[i] + o->offs[p] + o->scale * (float)sums[i];
        y[i] = o->relu && !(v > 0.0f) ? 0.0f : v;
    }
}

/* A path's one-position segmented scan run over o->npos positions (or just the sums when o->y is NULL). */
#define SEG_ROW(name, one)                                                                                      \
    static void name(const uint8_t *codes, const uint8_t *lut, Py_ssize_t nseg, Py_ssize_t seglen,           \
                     Py_ssize_t lut_step, const seg_out_t *o, uint32_t *sums) {                               \
        if (!o || !o->y) {                                                                                    \
            one(codes, lut, nseg, seglen, lut_step, sums);                                                    \
            return;                                                                                           \
        }                                                                                                     \
        for (Py_ssize_t p = 0; p < o->npos; p++) {                                                            \
            one(codes, lut + p * o->lut_pos, nseg, seglen, lut_step, sums);                                   \
            seg_out_scalar(sums, o, p);                                                                       \
        }                                                                                                     \
    }

static void scan_one_scalar(const uint8_t *codes, const uint8_t *lut, Py_ssize_t nseg, Py_ssize_t seglen,
                            Py_ssize_t lut_step, uint32_t *sums) {
    uint32_t acc[FS_BLOCK] = {0};
    for (Py_ssize_t s = 0; s < nseg; s++)
        for (Py_ssize_t q = 0; q < seglen; q++) {
            const uint8_t *c = codes + (s * seglen + q) * 16, *t = lut + s * lut_step + q * 16;
            for (int i = 0; i < 16; i++) {
                acc[i] += t[c[i] & 15];
                acc[16 + i] += t[c[i] >> 4];
            }
        }
    memcpy(sums, acc, sizeof acc);
}
SEG_ROW(scan_seg_scalar, scan_one_scalar)

#ifdef FS_X86
__attribute__((target("avx2"))) static void scan_one_avx2(const uint8_t *codes, const uint8_t *lut, Py_ssize_t nseg,
                                                          Py_ssize_t seglen, Py_ssize_t lut_step, uint32_t *sums) {
    const __m256i nib = _mm256_set1_epi8(0x0f);
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
    __m256i wl = s0, ol = s0, wh = s0, oh = s0;
    int steps = 0; /* since the last flush; each adds at most 255 to an accumulator */
    for (Py_ssize_t s = 0; s < nseg; s++) {
        const uint8_t *cs = codes + s * seglen * 16, *ts = lut + s * lut_step;
        for (Py_ssize_t q = 0; q < seglen; q += 2) {
            __m256i c, t;
            if (q + 2 <= seglen) {
                c = _mm256_loadu_si256((const __m256i *)(cs + q * 16));
                t = _mm256_loadu_si256((const __m256i *)(ts + q * 16));
            } else { /* an odd segment's last row: the upper lane looks up zeros */
                c = _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)(cs + q * 16)));
                t = _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)(ts + q * 16)));
            }
            __m256i rl = _mm256_shuffle_epi8(t, _mm256_and_si256(c, nib));
            __m256i rh = _mm256_shuffle_epi8(t, _mm256_and_si256(_mm256_srli_epi16(c, 4), nib));
            wl = _mm256_add_epi16(wl, rl);
            ol = _mm256_add_epi16(ol, _mm256_srli_epi16(rl, 8));
            wh = _mm256_add_epi16(wh, rh);
            oh = _mm256_add_epi16(oh, _mm256_srli_epi16(rh, 8));
            if (++steps == FS_FLUSH) {
                flush_avx2(wl, ol, &s0, &s1);
                flush_avx2(wh, oh, &s2, &s3);
                wl = ol = wh = oh = _mm256_setzero_si256();
                steps = 0;
            }
        }
    }
    flush_avx2(wl, ol, &s0, &s1);
    flush_avx2(wh, oh, &s2, &s3);
    _mm256_storeu_si256((__m256i *)sums, s0);
    _mm256_storeu_si256((__m256i *)(sums + 8), s1);
    _mm256_storeu_si256((__m256i *)(sums + 16), s2);
    _mm256_storeu_si256((__m256i *)(sums + 24), s3);
}
SEG_ROW(scan_seg_avx2, scan_one_avx2)

/* whole, odd: 32 x u16 (four lanes of 8, one subspace each), as flush_avx2's; the lanes are summed first
 * (each u32 sum holds at most 4 * 255 * FS_FLUSH), then added to a0 (outputs 0-7) and a1 (8-15). */
__attribute__((target("avx512f,avx512bw"))) static inline void flush_avx512(__m512i whole, __m512i odd, __m256i *a0,
                                                                           __m256i *a1) {
    __m512i even = _mm512_sub_epi16(whole, _mm512_slli_epi16(odd, 8));
    __m512i e = _mm512_add_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(even)),
                                 _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(even, 1)));
    __m512i o = _mm512_add_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(odd)),
                                 _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(odd, 1)));
    __m256i e8 = _mm256_add_epi32(_mm512_castsi512_si256(e), _mm512_extracti64x4_epi64(e, 1));
    __m256i o8 = _mm256_add_epi32(_mm512_castsi512_si256(o), _mm512_extracti64x4_epi64(o, 1));
    __m256i lo = _mm256_unpacklo_epi32(e8, o8), hi = _mm256_unpackhi_epi32(e8, o8);
    *a0 = _mm256_add_epi32(*a0, _mm256_permute2x128_si256(lo, hi, 0x20));
    *a1 = _mm256_add_epi32(*a1, _mm256_permute2x128_si256(lo, hi, 0x31));
}

/* Four subspaces per step (one per 128-bit lane), FAISS's even/odd trick as in scan_avx2. */
__attribute__((target("avx512f,avx512bw"), optimize("fp-contract=off"), always_inline)) static inline void
scan_one_avx512(const uint8_t *codes, const uint8_t *lut, Py_ssize_t nseg, Py_ssize_t seglen, Py_ssize_t lut_step,
                const seg_out_t *o, Py_ssize_t p, uint32_t *sums) {
    const __m512i nib = _mm512_set1_epi8(0x0f);
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
    __m512i wl = _mm512_setzero_si512(), ol = wl, wh = wl, oh = wl;
    Py_ssize_t full = seglen / 4 * 4, tail = seglen - full;
    const __mmask64 keep = (1ULL << (16 * tail)) - 1; /* the segment's last 1-3 rows: lanes past them look up 0 */
#define SEG_STEP(c, t)                                                                                       \
    do {                                                                                                     \
        __m512i rl = _mm512_shuffle_epi8(t, _mm512_and_si512(c, nib));                                       \
        __m512i rh = _mm512_shuffle_epi8(t, _mm512_and_si512(_mm512_srli_epi16(c, 4), nib));                 \
        wl = _mm512_add_epi16(wl, rl);                                                                       \
        ol = _mm512_add_epi16(ol, _mm512_srli_epi16(rl, 8));                                                 \
        wh = _mm512_add_epi16(wh, rh);                                                                       \
        oh = _mm512_add_epi16(oh, _mm512_srli_epi16(rh, 8));                                                 \
    } while (0)
    if (nseg * ((seglen + 3) / 4) <= FS_FLUSH) { /* short (a conv's output position): no flush on the way */
        for (Py_ssize_t s = 0; s < nseg; s++) {
            const uint8_t *cs = codes + s * seglen * 16, *ts = lut + s * lut_step;
            for (Py_ssize_t q = 0; q < full; q += 4)
                SEG_STEP(_mm512_loadu_si512((const void *)(cs + q * 16)), _mm512_loadu_si512((const void *)(ts + q * 16)));
            if (tail) SEG_STEP(_mm512_maskz_loadu_epi8(keep, cs + full * 16), _mm512_maskz_loadu_epi8(keep, ts + full * 16));
        }
    } else {
        int steps = 0;
        for (Py_ssize_t s = 0; s < nseg; s++) {
            const uint8_t *cs = codes + s * seglen * 16, *ts = lut + s * lut_step;
            for (Py_ssize_t q = 0; q < seglen; q += 4) {
                if (q < full)
                    SEG_STEP(_mm512_loadu_si512((const void *)(cs + q * 16)), _mm512_loadu_si512((const void *)(ts + q * 16)));
                else
                    SEG_STEP(_mm512_maskz_loadu_epi8(keep, cs + q * 16), _mm512_maskz_loadu_epi8(keep, ts + q * 16));
                if (++steps == FS_FLUSH) {
                    flush_avx512(wl, ol, &s0, &s1);
                    flush_avx512(wh, oh, &s2, &s3);
                    wl = ol = wh = oh = _mm512_setzero_si512();
                    steps = 0;
                }
            }
        }
    }
#undef SEG_STEP
    flush_avx512(wl, ol, &s0, &s1);
    flush_avx512(wh, oh, &s2, &s3);
    if (o && o->y) { /* the outputs straight from the registers */
        __m512 off = _mm512_set1_ps(o->offs[p]), sc = _mm512_set1_ps(o->scale), zero = _mm512_setzero_ps();
        __m512i lo = _mm512_inserti64x4(_mm512_castsi256_si512(s0), s1, 1);
        __m512i hi = _mm512_inserti64x4(_mm512_castsi256_si512(s2), s3, 1);
        __mmask16 m0 = o->nt >= 16 ? 0xFFFF : (__mmask16)((1u << o->nt) - 1);
        __mmask16 m1 = o->nt >= 32 ? 0xFFFF : o->nt <= 16 ? 0 : (__mmask16)((1u << (o->nt - 16)) - 1);
        __m512 b0 = _mm512_maskz_loadu_ps(m0, o->bias), b1 = _mm512_maskz_loadu_ps(m1, o->bias + 16);
        __m512 y0 = _mm512_add_ps(_mm512_add_ps(b0, off), _mm512_mul_ps(sc, _mm512_cvtepu32_ps(lo)));
        __m512 y1 = _mm512_add_ps(_mm512_add_ps(b1, off), _mm512_mul_ps(sc, _mm512_cvtepu32_ps(hi)));
        if (o->relu) y0 = _mm512_max_ps(y0, zero), y1 = _mm512_max_ps(y1, zero); /* NaN, -0 -> +0 as net_relu */
        float *y = o->y + p * o->y_pos;
        _mm512_mask_storeu_ps(y, m0, y0);
        _mm512_mask_storeu_ps(y + 16, m1, y1);
        return;
    }
    _mm256_storeu_si256((__m256i *)sums, s0);
    _mm256_storeu_si256((__m256i *)(sums + 8), s1);
    _mm256_storeu_si256((__m256i *)(sums + 16), s2);
    _mm256_storeu_si256((__m256i *)(sums + 24), s3);
}

__attribute__((target("avx512f,avx512bw"), optimize("fp-contract=off"))) static void
scan_seg_avx512(const uint8_t *codes, const uint8_t *lut, Py_ssize_t nseg, Py_ssize_t seglen, Py_ssize_t lut_step,
                const seg_out_t *o, uint32_t *sums) {
    if (!o || !o->y) {
        scan_one_avx512(codes, lut, nseg, seglen, lut_step, NULL, 0, sums);
        return;
    }
    for (Py_ssize_t p = 0; p < o->npos; p++)
        scan_one_avx512(codes, lut + p * o->lut_pos, nseg, seglen, lut_step, o, p, sums);
}
#endif

/* rows_n: the tables of n positions (a conv's image row): position i reads x + i * x_pos (dims x_stride apart),
 * writes lut + i * M * 16 and mins + i * M; returns the widest row range over all of them. */
typedef float (*rows_n_fn)(const float *x, Py_ssize_t n, Py_ssize_t x_pos, Py_ssize_t x_stride, const float *cbt,
                           Py_ssize_t M, Py_ssize_t dsub, float *lut, float *mins);

#define ROWS_N(name, rows)                                                                                      \
    static float name(const float *x, Py_ssize_t n, Py_ssize_t x_pos, Py_ssize_t x_stride, const float *cbt,   \
                      Py_ssize_t M, Py_ssize_t dsub, float *lut, float *mins) {                                 \
        float widest = 0.0f;                                                                                    \
        for (Py_ssize_t i = 0; i < n; i++) {                                                                    \
            float r = rows(x + i * x_pos, x_stride, cbt, M, dsub, lut + i * M * 16, mins + i * M);              \
            widest = r > widest ? r : widest;                                                                   \
        }                                                                                                       \
        return widest;                                                                                          \
    }
ROWS_N(rows_n_scalar, rows_scalar)

#ifdef FS_X86
ROWS_N(rows_n_avx2, rows_avx2)

/* Four table rows on 512 bits: row r from inputs xs[r] (x_stride apart) and the codewords cb[0..dsub) (one
 * subspace, in registers), written to luts[r][0..15], its minimum to *mins[r]; returns max - min per row in
 * lanes 0, 4, 8, 12. Separate multiply and add, so the tables are bit-identical to the other paths' (AVX-512F
 * implies FMA, and GCC would contract the intrinsics' multiply-add into one: fp-contract=off). */
__attribute__((target("avx512f"), optimize("fp-contract=off"), always_inline)) static inline __m512
rows4_avx512(const float *const *xs, Py_ssize_t x_stride, const __m512 *cb, Py_ssize_t dsub, float *const *luts,
             float *const *mins) {
    __m512 a[4];
    for (int r = 0; r < 4; r++) {
        __m512 acc = _mm512_setzero_ps();
        for (Py_ssize_t d = 0; d < dsub; d++) acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_set1_ps(xs[r][d * x_stride]), cb[d]));
        _mm512_storeu_ps(luts[r], acc);
        a[r] = acc;
    }
    /* 4 rows x 16 -> 4 x (min, max): halve the width three times, pairing rows */
    __m512 lo01 = _mm512_shuffle_f32x4(a[0], a[1], 0x44), hi01 = _mm512_shuffle_f32x4(a[0], a[1], 0xEE);
    __m512 lo23 = _mm512_shuffle_f32x4(a[2], a[3], 0x44), hi23 = _mm512_shuffle_f32x4(a[2], a[3], 0xEE);
    __m512 mn01 = _mm512_min_ps(lo01, hi01), mx01 = _mm512_max_ps(lo01, hi01); /* r0 (8) | r1 (8) */
    __m512 mn23 = _mm512_min_ps(lo23, hi23), mx23 = _mm512_max_ps(lo23, hi23);
    __m512 mn = _mm512_min_ps(_mm512_shuffle_f32x4(mn01, mn23, 0x88), _mm512_shuffle_f32x4(mn01, mn23, 0xDD));
    __m512 mx = _mm512_max_ps(_mm512_shuffle_f32x4(mx01, mx23, 0x88), _mm512_shuffle_f32x4(mx01, mx23, 0xDD));
    mn = _mm512_min_ps(mn, _mm512_permute_ps(mn, 0x4E)); /* lanes: r0 r1 r2 r3, 4 each */
    mx = _mm512_max_ps(mx, _mm512_permute_ps(mx, 0x4E));
    mn = _mm512_min_ps(mn, _mm512_permute_ps(mn, 0xB1));
    mx = _mm512_max_ps(mx, _mm512_permute_ps(mx, 0xB1));
    float mv[16];
    _mm512_storeu_ps(mv, mn);
    for (int r = 0; r < 4; r++) *mins[r] = mv[4 * r];
    return _mm512_sub_ps(mx, mn);
}

/* One subspace m at every position, four positions at a time, its codewords held in registers. */
__attribute__((target("avx512f"), optimize("fp-contract=off"), always_inline)) static inline __m512
rows_m_avx512(const float *x, Py_ssize_t n4, Py_ssize_t x_pos, Py_ssize_t x_stride, const float *cbm, Py_ssize_t M,
              Py_ssize_t m, const Py_ssize_t dsub, float *lut, float *mins) {
    __m512 cb[16], widest = _mm512_setzero_ps();
    for (Py_ssize_t d = 0; d < dsub; d++) cb[d] = _mm512_loadu_ps(cbm + d * 16);
    for (Py_ssize_t i = 0; i < n4; i += 4) {
        const float *xs[4];
        float *luts[4], *mn[4];
        for (int r = 0; r < 4; r++) {
            xs[r] = x + (i + r) * x_pos + m * dsub * x_stride;
            luts[r] = lut + ((i + r) * M + m) * 16;
            mn[r] = mins + (i + r) * M + m;
        }
        widest = _mm512_max_ps(widest, rows4_avx512(xs, x_stride, cb, dsub, luts, mn));
    }
    return widest;
}

/* rows_n on 512 bits: subspace by subspace (dsub <= 16), four positions' rows at a time; what is left (n % 4
 * positions, or dsub > 16) by rows_avx2. */
__attribute__((target("avx512f"), optimize("fp-contract=off"))) static float
rows_n_avx512(const float *x, Py_ssize_t n, Py_ssize_t x_pos, Py_ssize_t x_stride, const float *cbt, Py_ssize_t M,
              Py_ssize_t dsub, float *lut, float *mins) {
    __m512 widest = _mm512_setzero_ps();
    Py_ssize_t n4 = dsub <= 16 ? n / 4 * 4 : 0;
    for (Py_ssize_t m = 0; m < M && n4; m++) {
        const float *cbm = cbt + m * dsub * 16;
        __m512 w = dsub == 4   ? rows_m_avx512(x, n4, x_pos, x_stride, cbm, M, m, 4, lut, mins) /* constant dsub: */
                   : dsub == 8 ? rows_m_avx512(x, n4, x_pos, x_stride, cbm, M, m, 8, lut, mins) /* unrolled loops */
                               : rows_m_avx512(x, n4, x_pos, x_stride, cbm, M, m, dsub, lut, mins);
        widest = _mm512_max_ps(widest, w);
    }
    float rest = 0.0f;
    for (Py_ssize_t i = n4; i < n; i++) {
        float w = rows_avx2(x + i * x_pos, x_stride, cbt, M, dsub, lut + i * M * 16, mins + i * M);
        rest = w > rest ? w : rest;
    }
    float w = _mm512_reduce_max_ps(widest);
    return rest > w ? rest : w;
}

static float rows_avx512(const float *x, Py_ssize_t x_stride, const float *cbt, Py_ssize_t M, Py_ssize_t dsub,
                         float *lut, float *mins) {
    return rows_n_avx512(x, 1, 0, x_stride, cbt, M, dsub, lut, mins);
}

__attribute__((target("avx512f,avx512bw"), optimize("fp-contract=off"))) static void quantize_avx512(const float *lut, const float *mins,
                                                                        Py_ssize_t rows, float inv_scale,
                                                                        uint8_t *q) {
    const __m512 inv = _mm512_set1_ps(inv_scale), half = _mm512_set1_ps(0.5f), top = _mm512_set1_ps(255.0f);
    for (Py_ssize_t r = 0; r < rows; r++) {
        __m512 v = _mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(lut + r * 16), _mm512_set1_ps(mins[r])),
                                               inv), half);
        _mm_storeu_si128((__m128i *)(q + r * 16), _mm512_cvtusepi32_epi8(_mm512_cvttps_epi32(_mm512_min_ps(v, top))));
    }
}
#endif

#endif /* EDGEQ_FASTSCAN_SEG_H */
