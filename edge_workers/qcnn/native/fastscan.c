/* edgeq Q-CNN fast-scan kernels: 4-bit PQ codes, 8-bit lookup tables, SIMD shuffles as table lookups.
 *
 * CPython extension module edge_workers.qcnn._fastscan (no numpy headers: arrays come in through the
 * buffer protocol). Python side, layouts and tests: edge_workers/qcnn/fastscan.py, docs/qcnn-format.md.
 *
 * Per sample (FC) or per input position (conv) the float table lut[m, k] = <x_m, codebook[m, k]> is
 * built (K <= 16; rows padded to 16 entries with copies of codeword 0), then quantized to uint8 with one scale per sample and one offset per table row:
 *   q[m, k] = round((lut[m, k] - min_k lut[m, :]) / scale),  scale = max_m range_m / 255.
 * An output is bias + sum of offsets + scale * (integer sum of the q entries its codes name).
 *
 * Packed codes ("fastscan4" layout): per group g, per block of 32 outputs b, per subspace q of the
 * group (q = s * M_g + j, tap-major; padded with code 0 to Mp, a multiple of 4), 16 bytes: byte i
 * holds the code of output b*32+i in its low nibble and of output b*32+16+i in its high nibble.
 * One 16-byte table row and one 16-byte code row per subspace: pshufb/vpshufb/vqtbl1q_u8 look up 32
 * (SSE-sized lane), 64 (AVX2, two subspaces) or 128 (AVX-512BW, four subspaces) codes at once.
 * 16-bit accumulators take one byte (<= 255) per step and are flushed into 32-bit sums every 256
 * steps (256 * 255 = 65280 < 65536), so every path gives the same integer sums as the scalar one.
 *
 * net.h runs a whole chain of layers (these PQ layers and float conv/FC/ReLU/max-pool) in one call.
 *
 * Paths: "scalar" (always built), "avx2" and "avx512bw" (x86-64 with GCC/clang: per-function target
 * attributes, chosen at run time with __builtin_cpu_supports), "neon" (AArch64 only).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define FS_X86 1
#include <immintrin.h>
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
#define FS_NEON 1
#include <arm_neon.h>
#endif

#include "fastscan_kernels.h" /* scan paths, tables, dispatch */

/* ------------------------------------------------------------------------------------------- FC */

/* One sample's tables: lut [M, 16] and mins [M] (float), q [M, 16] (uint8; rows M..Mp-1 left as they are),
 * scale_off[0] = the quantization scale, scale_off[1] = the sum of the row minima. */
static void fc_tables(const path_t *p, const float *x, const float *cbt, Py_ssize_t M, Py_ssize_t dsub, float *lut,
                      float *mins, uint8_t *q, float *scale_off) {
    float s = scale_for(p->rows(x, 1, cbt, M, dsub, lut, mins));
    p->quantize(lut, mins, M, 1.0f / s, q);
    double off = 0.0;
    for (Py_ssize_t m = 0; m < M; m++) off += mins[m];
    scale_off[0] = s;
    scale_off[1] = (float)off;
}

/* y[n, t] for one FC layer; codes: fastscan4 layout (one group), Mp padded subspaces. 0 or -1 (no memory). */
static int fc_run(const path_t *p, const float *x, Py_ssize_t N, const float *cbt, const uint8_t *codes,
                  const float *bias, Py_ssize_t M, Py_ssize_t Mp, Py_ssize_t dsub, Py_ssize_t C_out,
                  float *y, float *lut_out, float *scale_out) {
    float *lut = malloc(sizeof(float) * (size_t)(M * 16 + M));
    uint8_t *q = calloc((size_t)(N * Mp * 16), 1);
    float *scale = malloc(sizeof(float) * (size_t)N * 2);
    if (!lut || !q || !scale) {
        free(lut); free(q); free(scale);
        return -1;
    }
    float *mins = lut + M * 16;
    for (Py_ssize_t n = 0; n < N; n++) {
        fc_tables(p, x + n * M * dsub, cbt, M, dsub, lut, mins, q + n * Mp * 16, scale + 2 * n);
        if (lut_out) memcpy(lut_out + n * M * 16, lut, sizeof(float) * (size_t)(M * 16));
        if (scale_out) memcpy(scale_out + 2 * n, scale + 2 * n, sizeof(float) * 2);
    }
    Py_ssize_t nblk = (C_out + FS_BLOCK - 1) / FS_BLOCK;
    uint32_t sums[FS_BLOCK];
    for (Py_ssize_t b = 0; b < nblk; b++) {
        const uint8_t *cb = codes + b * Mp * 16;
        Py_ssize_t t0 = b * FS_BLOCK, nt = C_out - t0 < FS_BLOCK ? C_out - t0 : FS_BLOCK;
        for (Py_ssize_t n = 0; n < N; n++) {
            p->scan(cb, q + n * Mp * 16, Mp, sums);
            float s = scale[2 * n], off = scale[2 * n + 1];
            float *yn = y + n * C_out + t0;
            for (Py_ssize_t i = 0; i < nt; i++) yn[i] = bias[t0 + i] + off + s * (float)sums[i];
        }
    }
    free(lut); free(q); free(scale);
    return 0;
}

/* ------------------------------------------------------------------------------------------ conv */

typedef struct {
    Py_ssize_t N, C, H, W, M, K, dsub, Mg, Mp, C_out, group, kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, OH, OW;
} conv_t;

/* Work buffers of one conv call, reused across samples (rows of padding positions are never written:
 * they stay zero, with minimum 0 and range 0). */
typedef struct {
    float *lut;      /* [P * M, 16] float tables */
    float *mins;     /* [P * M] row minima */
    float *rowsum;   /* [P * group] sum of the minima of a group's rows at one position */
    uint8_t *q;      /* [P * M, 16] quantized tables */
    double *hsum;    /* [Hp * OW * group] rowsum summed over the kw taps of a kernel row at output column ow */
    uint8_t *gathered; /* [Mp, 16] the tables of one output position and group, tap-major */
    float *offs;     /* [OW] the offsets of one output row's positions (net.h) */
} conv_buf_t;

static void conv_free(conv_buf_t *w) {
    free(w->lut); free(w->mins); free(w->rowsum); free(w->hsum); free(w->q); free(w->gathered); free(w->offs);
}

static int conv_alloc(const conv_t *c, conv_buf_t *w) {
    size_t P = (size_t)((c->H + c->pt + c->pb) * (c->W + c->pl + c->pr)), M = (size_t)c->M;
    w->lut = calloc(P * M * 16, sizeof(float));
    w->mins = calloc(P * M, sizeof(float));
    w->rowsum = calloc(P * (size_t)c->group, sizeof(float));
    w->hsum = malloc(sizeof(double) * (size_t)((c->H + c->pt + c->pb) * c->OW * c->group));
    w->q = malloc(P * M * 16);
    w->gathered = calloc((size_t)c->Mp * 16, 1);
    w->offs = malloc(sizeof(float) * (size_t)(c->OW > 0 ? c->OW : 1));
    if (!w->lut || !w->mins || !w->rowsum || !w->hsum || !w->q || !w->gathered || !w->offs) {
        conv_free(w);
        return -1;
    }
    return 0;
}

/* One sample: tables for every padded input position, quantized with one scale; then per output
 * position and group the taps' rows are gathered into one [Mp, 16] table and scanned like an FC. */
static void conv_sample(const path_t *p, const conv_t *c, conv_buf_t *wb, const float *xn, const float *cbt,
                        const uint8_t *codes, const float *bias, float *yn) {
    Py_ssize_t Wp = c->W + c->pl + c->pr, P = (c->H + c->pt + c->pb) * Wp, M = c->M, Mg = c->Mg, G = c->group;
    float widest = 0.0f;
    for (Py_ssize_t h = 0; h < c->H; h++)
        for (Py_ssize_t w = 0; w < c->W; w++) {
            Py_ssize_t pos = (h + c->pt) * Wp + w + c->pl;
            float r = p->rows(xn + h * c->W + w, c->H * c->W, cbt, M, c->dsub, wb->lut + pos * M * 16,
                              wb->mins + pos * M);
            widest = r > widest ? r : widest;
            for (Py_ssize_t g = 0; g < G; g++) {
                double off = 0.0;
                for (Py_ssize_t j = 0; j < Mg; j++) off += wb->mins[pos * M + g * Mg + j];
                wb->rowsum[pos * G + g] = (float)off;
            }
        }
    float s = scale_for(widest);
    p->quantize(wb->lut, wb->mins, P * M, 1.0f / s, wb->q);
    /* Offsets in two passes: along each kernel row once per input row, then over the kh rows per output. */
    for (Py_ssize_t h = 0; h < c->H + c->pt + c->pb; h++)
        for (Py_ssize_t ow = 0; ow < c->OW; ow++)
            for (Py_ssize_t g = 0; g < G; g++) {
                double off = 0.0;
                for (Py_ssize_t b = 0; b < c->kw; b++) off += wb->rowsum[(h * Wp + ow * c->sw + b * c->dw) * G + g];
                wb->hsum[(h * c->OW + ow) * G + g] = off;
            }
    Py_ssize_t Cog = c->C_out / G, nblk = (Cog + FS_BLOCK - 1) / FS_BLOCK, OP = c->OH * c->OW;
    size_t tap_bytes = (size_t)(Mg * 16), row_bytes = (size_t)(c->kw * M * 16);
    int whole_rows = G == 1 && c->dw == 1; /* then a kernel row's tables are contiguous */
    uint32_t sums[FS_BLOCK];
    for (Py_ssize_t oh = 0; oh < c->OH; oh++)
        for (Py_ssize_t ow = 0; ow < c->OW; ow++)
            for (Py_ssize_t g = 0; g < G; g++) {
                double off = 0.0;
                uint8_t *dst = wb->gathered;
                for (Py_ssize_t a = 0; a < c->kh; a++) {
                    Py_ssize_t pos0 = (oh * c->sh + a * c->dh) * Wp + ow * c->sw;
                    if (whole_rows) { /* the kw taps of row a are kw consecutive positions: one copy */
                        const uint8_t *src = wb->q + pos0 * M * 16;
                        for (size_t i = 0; i < row_bytes; i += 16) memcpy(dst + i, src + i, 16); /* inline moves */
                        dst += row_bytes;
                    } else {
                        for (Py_ssize_t b = 0; b < c->kw; b++, dst += tap_bytes)
                            memcpy(dst, wb->q + ((pos0 + b * c->dw) * M + g * Mg) * 16, tap_bytes);
                    }
                    off += wb->hsum[((oh * c->sh + a * c->dh) * c->OW + ow) * G + g];
                }
                float *yo = yn + g * Cog * OP + oh * c->OW + ow;
                const float *bo = bias + g * Cog;
                for (Py_ssize_t blk = 0; blk < nblk; blk++) {
                    p->scan(codes + (g * nblk + blk) * c->Mp * 16, wb->gathered, c->Mp, sums);
                    Py_ssize_t t0 = blk * FS_BLOCK, nt = Cog - t0 < FS_BLOCK ? Cog - t0 : FS_BLOCK;
                    for (Py_ssize_t i = 0; i < nt; i++)
                        yo[(t0 + i) * OP] = bo[t0 + i] + (float)off + s * (float)sums[i];
                }
            }
}

/* ----------------------------------------------------------------------------------- Python glue */

static int need(Py_buffer *b, Py_ssize_t bytes, const char *what) {
    if (b->len < bytes) {
        PyErr_Format(PyExc_ValueError, "%s: expected at least %zd bytes, got %zd", what, bytes, b->len);
        return 0;
    }
    return 1;
}

static void release(Py_buffer *bufs, int n) {
    for (int i = 0; i < n; i++)
        if (bufs[i].obj) PyBuffer_Release(&bufs[i]);
}

/* The end of a kernel call that ran: releases its buffers; None, or MemoryError if the kernel (rc -1) ran out. */
static PyObject *finish(int rc, Py_buffer *bufs, int n) {
    release(bufs, n);
    return rc ? PyErr_NoMemory() : Py_NewRef(Py_None);
}

PyDoc_STRVAR(fc_doc,
             "fc(x, cbt, codes, bias, y, N, M, Mp, K, dsub, C_out, path='', lut=None, scales=None)\n"
             "y float32 [N, C_out] (written) = the PQ FC layer of x float32 [N, M*dsub]; cbt float32 [M, dsub, 16]\n"
             "(codewords K.. copies of codeword 0);\n"
             "codes uint8 fastscan4 [ceil(C_out/32), Mp, 16]; optional lut float32 [N, M, 16] and scales\n"
             "float32 [N, 2] (scale, offset sum) receive the float tables and their quantization.");

static PyObject *py_fc(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw) {
    static char *kws[] = {"x", "cbt", "codes", "bias", "y", "N", "M", "Mp", "K", "dsub", "C_out", "path", "lut",
                          "scales", NULL};
    Py_buffer b[7] = {{0}};
    Py_ssize_t N, M, Mp, K, dsub, C_out;
    const char *path = "";
    if (!PyArg_ParseTupleAndKeywords(args, kw, "y*y*y*y*w*nnnnnn|sz*z*", kws, &b[0], &b[1], &b[2], &b[3], &b[4], &N,
                                     &M, &Mp, &K, &dsub, &C_out, &path, &b[5], &b[6]))
        return NULL;
    const path_t *p = find_path(path);
    if (!p) goto done;
    if (N < 0 || M < 1 || Mp < M || Mp % 4 || K < 1 || K > 16 || dsub < 1 || C_out < 1) {
        PyErr_Format(PyExc_ValueError, "bad FC sizes N=%zd M=%zd Mp=%zd K=%zd dsub=%zd C_out=%zd", N, M, Mp, K, dsub,
                     C_out);
        goto done;
    }
    Py_ssize_t nblk = (C_out + FS_BLOCK - 1) / FS_BLOCK;
    if (!need(&b[0], 4 * N * M * dsub, "x") || !need(&b[1], 4 * M * dsub * 16, "cbt") ||
        !need(&b[2], nblk * Mp * 16, "codes") || !need(&b[3], 4 * C_out, "bias") || !need(&b[4], 4 * N * C_out, "y") ||
        (b[5].obj && !need(&b[5], 4 * N * M * 16, "lut")) || (b[6].obj && !need(&b[6], 4 * N * 2, "scales")))
        goto done;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fc_run(p, b[0].buf, N, b[1].buf, b[2].buf, b[3].buf, M, Mp, dsub, C_out, b[4].buf,
                b[5].obj ? b[5].buf : NULL, b[6].obj ? b[6].buf : NULL);
    Py_END_ALLOW_THREADS
    return finish(rc, b, 7);
done:
    release(b, 7);
    return NULL;
}

PyDoc_STRVAR(conv_doc,
             "conv(x, cbt, codes, bias, y, sizes, path='')\n"
             "y float32 [N, C_out, OH, OW] (written) = the PQ convolution of x float32 [N, C, H, W];\n"
             "sizes: (N, C, H, W, M, K, dsub, Mg, Mp, C_out, group, kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, OH, OW);\n"
             "codes uint8 fastscan4 [group, ceil(C_out/group/32), Mp, 16].");

static PyObject *py_conv(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer b[5] = {{0}};
    conv_t c;
    const char *path = "";
    if (!PyArg_ParseTuple(args, "y*y*y*y*w*(nnnnnnnnnnnnnnnnnnnnnnn)|s", &b[0], &b[1], &b[2], &b[3], &b[4], &c.N,
                          &c.C, &c.H, &c.W, &c.M, &c.K, &c.dsub, &c.Mg, &c.Mp, &c.C_out, &c.group, &c.kh, &c.kw, &c.sh,
                          &c.sw, &c.pt, &c.pl, &c.pb, &c.pr, &c.dh, &c.dw, &c.OH, &c.OW, &path))
        return NULL;
    const path_t *p = find_path(path);
    if (!p) goto done;
    Py_ssize_t S = c.kh * c.kw;
    if (c.N < 0 || c.group < 1 || c.M != c.group * c.Mg || c.C != c.M * c.dsub || c.K < 1 || c.K > 16 ||
        c.Mp < S * c.Mg || c.Mp % 4 || c.C_out % c.group || c.OH < 1 || c.OW < 1 ||
        (c.OH - 1) * c.sh + (c.kh - 1) * c.dh >= c.H + c.pt + c.pb ||
        (c.OW - 1) * c.sw + (c.kw - 1) * c.dw >= c.W + c.pl + c.pr) {
        PyErr_SetString(PyExc_ValueError, "inconsistent conv sizes");
        goto done;
    }
    Py_ssize_t nblk = (c.C_out / c.group + FS_BLOCK - 1) / FS_BLOCK, xs = c.C * c.H * c.W, ys = c.C_out * c.OH * c.OW;
    if (!need(&b[0], 4 * c.N * xs, "x") || !need(&b[1], 4 * c.M * c.dsub * 16, "cbt") ||
        !need(&b[2], c.group * nblk * c.Mp * 16, "codes") || !need(&b[3], 4 * c.C_out, "bias") ||
        !need(&b[4], 4 * c.N * ys, "y"))
        goto done;
    conv_buf_t wb = {0};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = conv_alloc(&c, &wb);
    for (Py_ssize_t n = 0; n < c.N && !rc; n++)
        conv_sample(p, &c, &wb, (const float *)b[0].buf + n * xs, b[1].buf, b[2].buf, b[3].buf,
                    (float *)b[4].buf + n * ys);
    conv_free(&wb);
    Py_END_ALLOW_THREADS
    return finish(rc, b, 5);
done:
    release(b, 5);
    return NULL;
}

#include "net.h" /* whole-network execution (net_new, net_run) */

static PyObject *py_paths(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(unused)) {
    PyObject *out = PyList_New(0);
    for (int i = 0; out && i < N_PATHS; i++)
        if (PATHS[i].supported()) {
            PyObject *s = PyUnicode_FromString(PATHS[i].name);
            if (!s || PyList_Append(out, s)) {
                Py_XDECREF(s);
                Py_DECREF(out);
                return NULL;
            }
            Py_DECREF(s);
        }
    return out;
}

static PyObject *py_compiled_paths(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(unused)) {
    PyObject *out = PyList_New(N_PATHS);
    for (int i = 0; out && i < N_PATHS; i++) PyList_SET_ITEM(out, i, PyUnicode_FromString(PATHS[i].name));
    return out;
}

static PyMethodDef methods[] = {
    {"fc", (PyCFunction)(void (*)(void))py_fc, METH_VARARGS | METH_KEYWORDS, fc_doc},
    {"conv", py_conv, METH_VARARGS, conv_doc},
    {"net_new", py_net_new, METH_VARARGS, net_new_doc},
    {"net_run", py_net_run, METH_VARARGS, net_run_doc},
    {"net_profile", py_net_profile, METH_VARARGS, net_profile_doc},
    {"paths", py_paths, METH_NOARGS, "Paths this CPU can run, best first (always ends with 'scalar')."},
    {"compiled_paths", py_compiled_paths, METH_NOARGS, "Paths compiled into this build, best first."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastscan",
                                    "Q-CNN fast-scan kernels (4-bit codes, 8-bit tables); see fastscan.c.", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fastscan(void) {
#ifdef FS_X86
    __builtin_cpu_init();
#endif
    return PyModule_Create(&module);
}
