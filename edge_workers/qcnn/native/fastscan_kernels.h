/* edgeq Q-CNN fast-scan kernels, SIMD part: the scan paths (scalar, AVX2, AVX-512BW, NEON), table building
 * and quantization, and run-time path dispatch. Included once, by fastscan.c (one translation unit);
 * see fastscan.c for the method and the code layout. */
#ifndef EDGEQ_FASTSCAN_KERNELS_H
#define EDGEQ_FASTSCAN_KERNELS_H

#define FS_BLOCK 32 /* outputs per code block */
#define FS_FLUSH 256 /* SIMD steps between 16-bit accumulator flushes */

/* sums[32] = integer sums over Mp subspaces of lut[q, code(q, output)] for one block of 32 outputs. */
typedef void (*scan_fn)(const uint8_t *codes, const uint8_t *lut, Py_ssize_t Mp, uint32_t *sums);

/* ------------------------------------------------------------------------------------------ scalar */

static void scan_scalar(const uint8_t *codes, const uint8_t *lut, Py_ssize_t Mp, uint32_t *sums) {
    uint32_t acc[FS_BLOCK] = {0};
    for (Py_ssize_t q = 0; q < Mp; q++) {
        const uint8_t *c = codes + q * 16, *t = lut + q * 16;
        for (int i = 0; i < 16; i++) {
            acc[i] += t[c[i] & 15];
            acc[16 + i] += t[c[i] >> 4];
        }
    }
    memcpy(sums, acc, sizeof acc);
}

/* ------------------------------------------------------------------------------------------- AVX2 */
#ifdef FS_X86
/* Lane l of a step holds subspace q + l; even bytes (outputs 0, 2, ..) and odd bytes go to separate
 * 16-bit accumulators: u16 element e of lane l of `even` sums output 2e of that lane's subspaces. */
static inline void flush16(const uint16_t *even_lo, const uint16_t *odd_lo, const uint16_t *even_hi,
                           const uint16_t *odd_hi, int lanes, uint32_t *acc) {
    for (int l = 0; l < lanes; l++)
        for (int e = 0; e < 8; e++) {
            acc[2 * e] += even_lo[l * 8 + e];
            acc[2 * e + 1] += odd_lo[l * 8 + e];
            acc[16 + 2 * e] += even_hi[l * 8 + e];
            acc[16 + 2 * e + 1] += odd_hi[l * 8 + e];
        }
}

/* whole, odd: 16 x u16 (two lanes of 8) where whole = sum of (even byte + 256 * odd byte) modulo 2^16 and
 * odd = sum of odd bytes; even = whole - (odd << 8) modulo 2^16 is exact because the true even sum is below
 * 2^16 (flush bound). Adds the 16 sums of both lanes, in output order 0..15, to a0 (outputs 0-7), a1 (8-15). */
__attribute__((target("avx2"))) static inline void flush_avx2(__m256i whole, __m256i odd, __m256i *a0, __m256i *a1) {
    __m256i even = _mm256_sub_epi16(whole, _mm256_slli_epi16(odd, 8));
    __m256i e = _mm256_add_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(even)),
                                 _mm256_cvtepu16_epi32(_mm256_extracti128_si256(even, 1)));
    __m256i o = _mm256_add_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(odd)),
                                 _mm256_cvtepu16_epi32(_mm256_extracti128_si256(odd, 1)));
    __m256i lo = _mm256_unpacklo_epi32(e, o), hi = _mm256_unpackhi_epi32(e, o); /* e0 o0 e1 o1 | e4 o4 e5 o5 */
    *a0 = _mm256_add_epi32(*a0, _mm256_permute2x128_si256(lo, hi, 0x20));
    *a1 = _mm256_add_epi32(*a1, _mm256_permute2x128_si256(lo, hi, 0x31));
}

/* Per step: two subspaces (one per 128-bit lane), 32 outputs, two vpshufb (low and high nibbles). The byte
 * results are added as 16-bit words (even byte + 256 * odd byte, wrapping) and, shifted, as odd bytes alone
 * (FAISS's trick), so no masking of even bytes is needed. */
__attribute__((target("avx2"))) static void scan_avx2(const uint8_t *codes, const uint8_t *lut, Py_ssize_t Mp,
                                                      uint32_t *sums) {
    const __m256i nib = _mm256_set1_epi8(0x0f);
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0; /* u32 sums of outputs 0-7, 8-15, 16-23, 24-31 */
    Py_ssize_t q = 0;
    while (q < Mp) {
        Py_ssize_t end = q + 2 * FS_FLUSH < Mp ? q + 2 * FS_FLUSH : Mp;
        __m256i wl = _mm256_setzero_si256(), ol = wl, wh = wl, oh = wl;
        for (; q < end; q += 2) {
            __m256i c = _mm256_loadu_si256((const __m256i *)(codes + q * 16));
            __m256i t = _mm256_loadu_si256((const __m256i *)(lut + q * 16));
            __m256i rl = _mm256_shuffle_epi8(t, _mm256_and_si256(c, nib));
            __m256i rh = _mm256_shuffle_epi8(t, _mm256_and_si256(_mm256_srli_epi16(c, 4), nib));
            wl = _mm256_add_epi16(wl, rl);
            ol = _mm256_add_epi16(ol, _mm256_srli_epi16(rl, 8));
            wh = _mm256_add_epi16(wh, rh);
            oh = _mm256_add_epi16(oh, _mm256_srli_epi16(rh, 8));
        }
        flush_avx2(wl, ol, &s0, &s1);
        flush_avx2(wh, oh, &s2, &s3);
    }
    _mm256_storeu_si256((__m256i *)sums, s0);
    _mm256_storeu_si256((__m256i *)(sums + 8), s1);
    _mm256_storeu_si256((__m256i *)(sums + 16), s2);
    _mm256_storeu_si256((__m256i *)(sums + 24), s3);
}

/* ------------------------------------------------------------------------------------ AVX-512BW */
/* Not run on the development machine (no AVX-512 there): compiled everywhere GCC/clang target x86-64,
 * selected only when the CPU reports avx512bw. vpshufb on 512 bits needs AVX512BW only; vpermb (VBMI)
 * would pay off for 64-entry tables (K = 64), which this 4-bit format does not use. */
__attribute__((target("avx512f,avx512bw"))) static void scan_avx512bw(const uint8_t *codes, const uint8_t *lut,
                                                                      Py_ssize_t Mp, uint32_t *sums) {
    uint32_t acc[FS_BLOCK] = {0};
    const __m512i nib = _mm512_set1_epi8(0x0f), low = _mm512_set1_epi16(0x00ff);
    Py_ssize_t q = 0;
    while (q < Mp) {
        Py_ssize_t end = q + 4 * FS_FLUSH < Mp ? q + 4 * FS_FLUSH : Mp;
        __m512i el = _mm512_setzero_si512(), ol = el, eh = el, oh = el;
        for (; q < end; q += 4) {
            __m512i c = _mm512_loadu_si512((const void *)(codes + q * 16));
            __m512i t = _mm512_loadu_si512((const void *)(lut + q * 16));
            __m512i rl = _mm512_shuffle_epi8(t, _mm512_and_si512(c, nib));
            __m512i rh = _mm512_shuffle_epi8(t, _mm512_and_si512(_mm512_srli_epi16(c, 4), nib));
            el = _mm512_add_epi16(el, _mm512_and_si512(rl, low));
            ol = _mm512_add_epi16(ol, _mm512_srli_epi16(rl, 8));
            eh = _mm512_add_epi16(eh, _mm512_and_si512(rh, low));
            oh = _mm512_add_epi16(oh, _mm512_srli_epi16(rh, 8));
        }
        uint16_t b[4][32];
        _mm512_storeu_si512((void *)b[0], el);
        _mm512_storeu_si512((void *)b[1], ol);
        _mm512_storeu_si512((void *)b[2], eh);
        _mm512_storeu_si512((void *)b[3], oh);
        flush16(b[0], b[1], b[2], b[3], 4, acc);
    }
    memcpy(sums, acc, sizeof acc);
}
#endif

/* ------------------------------------------------------------------------------------------- NEON */
#ifdef FS_NEON
/* Not run on the development machine (x86-64): compiled only for AArch64. */
static void scan_neon(const uint8_t *codes, const uint8_t *lut, Py_ssize_t Mp, uint32_t *sums) {
    uint32_t acc[FS_BLOCK] = {0};
    const uint8x16_t nib = vdupq_n_u8(0x0f);
    Py_ssize_t q = 0;
    while (q < Mp) {
        Py_ssize_t end = q + FS_FLUSH < Mp ? q + FS_FLUSH : Mp;
        uint16x8_t a0 = vdupq_n_u16(0), a1 = a0, a2 = a0, a3 = a0;
        for (; q < end; q++) {
            uint8x16_t c = vld1q_u8(codes + q * 16), t = vld1q_u8(lut + q * 16);
            uint8x16_t rl = vqtbl1q_u8(t, vandq_u8(c, nib)), rh = vqtbl1q_u8(t, vshrq_n_u8(c, 4));
            a0 = vaddw_u8(a0, vget_low_u8(rl));
            a1 = vaddw_high_u8(a1, rl);
            a2 = vaddw_u8(a2, vget_low_u8(rh));
            a3 = vaddw_high_u8(a3, rh);
        }
        uint16_t b[32];
        vst1q_u16(b, a0);
        vst1q_u16(b + 8, a1);
        vst1q_u16(b + 16, a2);
        vst1q_u16(b + 24, a3);
        for (int i = 0; i < 32; i++) acc[i] += b[i];
    }
    memcpy(sums, acc, sizeof acc);
}
#endif

/* ------------------------------------------------------------------------- tables and quantization */
/* Rows of 16 floats: row r = the table of one subspace (at one position for conv). cbt float [M, dsub, 16]
 * pads codewords K..15 with copies of codeword 0, so every row's min and max over 16 entries are those over
 * its K real entries and the loops have a fixed length. The AVX2 versions use separate multiply and add
 * (no FMA), like the portable code, so all paths produce bit-identical tables and outputs. */

/* lut[m*16 + k] = <x[m*dsub ..], cbt[m, :, k]>, mins[m] = min_k lut[m, k]; returns max_m (max_k - min_k).
 * x_stride: distance between consecutive input dims (1 for FC, H*W for a conv position). */
static float rows_scalar(const float *x, Py_ssize_t x_stride, const float *cbt, Py_ssize_t M, Py_ssize_t dsub,
                         float *lut, float *mins) {
    float widest = 0.0f;
    for (Py_ssize_t m = 0; m < M; m++) {
        float row[16] = {0};
        const float *cb = cbt + m * dsub * 16;
        for (Py_ssize_t d = 0; d < dsub; d++) {
            float xv = x[(m * dsub + d) * x_stride];
            for (int k = 0; k < 16; k++) row[k] += xv * cb[d * 16 + k];
        }
        float mn = row[0], mx = row[0];
        for (int k = 1; k < 16; k++) {
            mn = row[k] < mn ? row[k] : mn;
            mx = row[k] > mx ? row[k] : mx;
        }
        memcpy(lut + m * 16, row, sizeof row);
        mins[m] = mn;
        widest = mx - mn > widest ? mx - mn : widest;
    }
    return widest;
}

/* q[r*16 + k] = (uint8) trunc((lut - mins[r]) * inv_scale + 0.5), i.e. rounded, at most 255. */
static void quantize_scalar(const float *lut, const float *mins, Py_ssize_t rows, float inv_scale, uint8_t *q) {
    for (Py_ssize_t r = 0; r < rows; r++)
        for (int k = 0; k < 16; k++) {
            float v = (lut[r * 16 + k] - mins[r]) * inv_scale + 0.5f;
            q[r * 16 + k] = (uint8_t)(v > 255.0f ? 255.0f : v);
        }
}

#ifdef FS_X86
__attribute__((target("avx2"))) static float rows_avx2(const float *x, Py_ssize_t x_stride, const float *cbt,
                                                       Py_ssize_t M, Py_ssize_t dsub, float *lut, float *mins) {
    __m128 widest = _mm_setzero_ps();
    for (Py_ssize_t m = 0; m < M; m++) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0;
        const float *cb = cbt + m * dsub * 16;
        for (Py_ssize_t d = 0; d < dsub; d++) {
            __m256 xv = _mm256_set1_ps(x[(m * dsub + d) * x_stride]);
            a0 = _mm256_add_ps(a0, _mm256_mul_ps(xv, _mm256_loadu_ps(cb + d * 16)));
            a1 = _mm256_add_ps(a1, _mm256_mul_ps(xv, _mm256_loadu_ps(cb + d * 16 + 8)));
        }
        _mm256_storeu_ps(lut + m * 16, a0);
        _mm256_storeu_ps(lut + m * 16 + 8, a1);
        __m256 mn8 = _mm256_min_ps(a0, a1), mx8 = _mm256_max_ps(a0, a1);
        __m128 mn = _mm_min_ps(_mm256_castps256_ps128(mn8), _mm256_extractf128_ps(mn8, 1));
        __m128 mx = _mm_max_ps(_mm256_castps256_ps128(mx8), _mm256_extractf128_ps(mx8, 1));
        mn = _mm_min_ps(mn, _mm_movehl_ps(mn, mn));
        mx = _mm_max_ps(mx, _mm_movehl_ps(mx, mx));
        mn = _mm_min_ss(mn, _mm_shuffle_ps(mn, mn, 1));
        mx = _mm_max_ss(mx, _mm_shuffle_ps(mx, mx, 1));
        mins[m] = _mm_cvtss_f32(mn);
        widest = _mm_max_ss(widest, _mm_sub_ss(mx, mn));
    }
    return _mm_cvtss_f32(widest);
}

__attribute__((target("avx2"))) static void quantize_avx2(const float *lut, const float *mins, Py_ssize_t rows,
                                                          float inv_scale, uint8_t *q) {
    const __m256 inv = _mm256_set1_ps(inv_scale), half = _mm256_set1_ps(0.5f), top = _mm256_set1_ps(255.0f);
    for (Py_ssize_t r = 0; r < rows; r++) {
        __m256 mn = _mm256_set1_ps(mins[r]);
        __m256 v0 = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(lut + r * 16), mn), inv), half);
        __m256 v1 = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(lut + r * 16 + 8), mn), inv), half);
        __m256i i0 = _mm256_cvttps_epi32(_mm256_min_ps(v0, top)), i1 = _mm256_cvttps_epi32(_mm256_min_ps(v1, top));
        __m128i w0 = _mm_packus_epi32(_mm256_castsi256_si128(i0), _mm256_extracti128_si256(i0, 1));
        __m128i w1 = _mm_packus_epi32(_mm256_castsi256_si128(i1), _mm256_extracti128_si256(i1, 1));
        _mm_storeu_si128((__m128i *)(q + r * 16), _mm_packus_epi16(w0, w1));
    }
}
#endif

static float scale_for(float widest) { return widest > 0.0f ? widest / 255.0f : 1.0f; }

#include "scan_seg.h" /* segmented scans (a conv's taps read in place), AVX-512 table builders */

/* ---------------------------------------------------------------------------------- path dispatch */

typedef float (*rows_fn)(const float *x, Py_ssize_t x_stride, const float *cbt, Py_ssize_t M, Py_ssize_t dsub,
                        float *lut, float *mins);
typedef void (*quantize_fn)(const float *lut, const float *mins, Py_ssize_t rows, float inv_scale, uint8_t *q);

typedef struct {
    const char *name;
    scan_fn scan;
    rows_fn rows;
    quantize_fn quantize;
    scan_seg_fn scan_seg;
    rows_n_fn rows_n;
    int (*supported)(void);
} path_t;

static int always(void) { return 1; }
#ifdef FS_X86
static int has_avx2(void) { return __builtin_cpu_supports("avx2"); }
static int has_avx512bw(void) { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"); }
#endif

/* Best first; "scalar" last. */
static const path_t PATHS[] = {
#ifdef FS_X86
    {"avx512bw", scan_avx512bw, rows_avx512, quantize_avx512, scan_seg_avx512, rows_n_avx512, has_avx512bw},
    {"avx2", scan_avx2, rows_avx2, quantize_avx2, scan_seg_avx2, rows_n_avx2, has_avx2},
#endif
#ifdef FS_NEON
    {"neon", scan_neon, rows_scalar, quantize_scalar, scan_seg_scalar, rows_n_scalar, always},
#endif
    {"scalar", scan_scalar, rows_scalar, quantize_scalar, scan_seg_scalar, rows_n_scalar, always},
};
#define N_PATHS ((int)(sizeof PATHS / sizeof PATHS[0]))

static const path_t *find_path(const char *name) {
    for (int i = 0; i < N_PATHS; i++)
        if ((!name[0] || !strcmp(name, PATHS[i].name)) && PATHS[i].supported()) return &PATHS[i];
    PyErr_Format(PyExc_ValueError, "fast-scan path '%s' is not available on this CPU/build", name);
    return NULL;
}

#endif /* EDGEQ_FASTSCAN_KERNELS_H */
