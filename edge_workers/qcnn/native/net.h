/* edgeq Q-CNN whole-network execution: a chain of layers run sample by sample in one call.
 *
 * Included once, by fastscan.c (after the FC and conv kernels). Python side: edge_workers/qcnn/native_net.py,
 * which turns a Q-CNN ONNX graph made only of the layers below into a net and falls back to onnxruntime
 * segments for anything else.
 *
 * Why: between two PQ layers a small graph has a ReLU, a pooling, a flatten; as onnxruntime sessions called
 * from Python each costs 25-45 us at batch 1, more than the PQ layers themselves (edge CNN: 3 sessions,
 * 96 of 151 us). Here a sample goes through every layer while its activations stay in the cache, and the
 * GIL is released once per call.
 *
 * Layers (kind, geometry as in conv_t, arrays):
 *   NET_CONV     float convolution, group 1: w float32 [C_out, C*kh*kw], b float32 [C_out]
 *   NET_PQCONV   fast-scan PQ convolution: cbt, fastscan4 codes, bias (as conv())
 *   NET_PQGEMM   fast-scan PQ FC, M subspaces of dsub inputs: cbt, fastscan4 codes, bias (as fc())
 *   NET_GEMM     float FC, C inputs: w float32 [C_out, C], b float32 [C_out]
 *   NET_RELU     max(x, 0) over C*H*W values
 *   NET_MAXPOOL  max over kh x kw windows (strides, pads; padding never wins), C channels
 * A flatten between layers needs no work: activations are contiguous [C, H, W] per sample. A ReLU right after a
 * CONV, PQCONV, PQGEMM or GEMM layer is that layer's `relu` flag instead: applied to its output while it is in
 * registers (CONV) or still in the L1 cache.
 */
#ifndef EDGEQ_FASTSCAN_NET_H
#define EDGEQ_FASTSCAN_NET_H

enum { NET_CONV = 1, NET_PQCONV, NET_PQGEMM, NET_GEMM, NET_RELU, NET_MAXPOOL };
#define NET_MAX_ARRAYS 3
#define NET_CAPSULE "edgeq.qcnn.net"

/* Float loops the compiler vectorizes; on x86-64 Linux with GCC also built for x86-64-v3 (AVX2, FMA) and
 * chosen at load time (ifunc). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define NET_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define NET_CLONES
#endif

typedef struct {
    int kind, relu;                 /* relu: max(y, 0) on this layer's output */
    int tr_in;                      /* transpose the input first: 0 no, 1 [C, HW] -> [HW, C], 2 back */
    int pool2, fused;               /* CONV: also does the 2 x 2 max pooling after it; that MAXPOOL: skipped */
    conv_t c;                       /* geometry (conv_t field meanings; FC: C inputs, C_out outputs) */
    Py_ssize_t in_size, out_size;   /* floats per sample */
    Py_ssize_t tc, thw;             /* channels and positions of a transposed input */
    float *wt, *bp;                 /* NET_CONV: weights and bias as net_conv_weights lays them out (owned) */
    Py_buffer arrays[NET_MAX_ARRAYS];
} net_op_t;

/* Per-call work buffers: two activations, a transposed one, a padded conv input, FC tables, one conv_buf_t per
 * PQ conv. */
typedef struct {
    float *act[2], *tr, *pad, *lut;
    uint8_t *q;
    conv_buf_t *conv;
} net_ws_t;

/* Work buffers kept by the net between calls (allocating and zeroing them cost about 1.5 us a call, a sixth of
 * the edge CNN at batch 1): one per concurrent caller up to NET_WS_CACHE (the caller and the helper thread);
 * further concurrent callers allocate their own. The zeros the kernels rely on (padding rows of the tables,
 * padded subspaces) are never overwritten, so a kept buffer stays valid. */
#if defined(__STDC_NO_ATOMICS__) || defined(_MSC_VER)
#define NET_WS_CACHE 0
#else
#include <stdatomic.h>
#define NET_WS_CACHE 2
#endif

typedef struct {
    Py_ssize_t n_ops, in_size, out_size, act_size; /* act_size: largest activation, floats */
    int tr_out;                                    /* the last layer's output is [HW, C]: transpose it */
    Py_ssize_t oc, ohw;
    net_op_t *ops;
#if NET_WS_CACHE
    net_ws_t ws[NET_WS_CACHE];
    atomic_int ws_busy[NET_WS_CACHE];
#endif
} net_t;

static float *fbuf(const net_op_t *op, int i) { return (float *)op->arrays[i].buf; }

/* ------------------------------------------------------------------------------------- float layers */

NET_CLONES static void net_relu(const float *x, float *y, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) y[i] = x[i] > 0.0f ? x[i] : 0.0f;
}

NET_CLONES static void net_gemm(const float *x, Py_ssize_t C, const float *w, const float *b, Py_ssize_t C_out,
                                float *y) {
    for (Py_ssize_t o = 0; o < C_out; o++) {
        float s = 0.0f;
        const float *wo = w + o * C;
        for (Py_ssize_t i = 0; i < C; i++) s += wo[i] * x[i];
        y[o] = b[o] + s;
    }
}

#include "net_hwc.h" /* the window layers on channels-last activations */

/* ------------------------------------------------------------------------------------------ PQ FC */

/* One sample of a PQ FC layer with caller-owned tables (q: [Mp, 16], rows M.. zero). */
static void net_pqgemm(const path_t *p, const net_op_t *op, const float *x, float *lut, uint8_t *q, float *y) {
    const conv_t *c = &op->c;
    float so[2];
    uint32_t sums[FS_BLOCK];
    fc_tables(p, x, fbuf(op, 0), c->M, c->dsub, lut, lut + c->M * 16, q, so);
    const uint8_t *codes = op->arrays[1].buf;
    const float *bias = fbuf(op, 2);
    for (Py_ssize_t t0 = 0; t0 < c->C_out; t0 += FS_BLOCK) {
        p->scan(codes + (t0 / FS_BLOCK) * c->Mp * 16, q, c->Mp, sums);
        Py_ssize_t nt = c->C_out - t0 < FS_BLOCK ? c->C_out - t0 : FS_BLOCK;
        for (Py_ssize_t i = 0; i < nt; i++) y[t0 + i] = bias[t0 + i] + so[1] + so[0] * (float)sums[i];
    }
}

/* -------------------------------------------------------------------------------------------- run */

static void net_ws_free(const net_t *net, net_ws_t *ws) {
    free(ws->act[0]); free(ws->act[1]); free(ws->tr); free(ws->pad); free(ws->lut); free(ws->q);
    if (ws->conv)
        for (Py_ssize_t i = 0; i < net->n_ops; i++) conv_free(&ws->conv[i]);
    free(ws->conv);
}

static int net_ws_alloc(const net_t *net, net_ws_t *ws) {
    Py_ssize_t pad = 1, lut = 1, q = 1;
    for (Py_ssize_t i = 0; i < net->n_ops; i++) {
        const net_op_t *op = &net->ops[i];
        const conv_t *c = &op->c;
        Py_ssize_t padded = (c->H + c->pt + c->pb) * (c->W + c->pl + c->pr) * c->C;
        if (op->kind == NET_CONV && padded > pad) pad = padded;
        if (op->kind == NET_PQGEMM) {
            lut = c->M * 17 > lut ? c->M * 17 : lut;
            q = c->Mp * 16 > q ? c->Mp * 16 : q;
        }
    }
    ws->act[0] = malloc(sizeof(float) * (size_t)net->act_size);
    ws->act[1] = malloc(sizeof(float) * (size_t)net->act_size);
    ws->tr = malloc(sizeof(float) * (size_t)(net->act_size > net->in_size ? net->act_size : net->in_size));
    ws->pad = malloc(sizeof(float) * (size_t)pad);
    ws->lut = malloc(sizeof(float) * (size_t)lut);
    ws->q = calloc((size_t)q, 1);
    ws->conv = calloc((size_t)net->n_ops, sizeof(conv_buf_t));
    if (!ws->act[0] || !ws->act[1] || !ws->tr || !ws->pad || !ws->lut || !ws->q || !ws->conv) return -1;
    for (Py_ssize_t i = 0; i < net->n_ops; i++)
        if (net->ops[i].kind == NET_PQCONV && conv_alloc(&net->ops[i].c, &ws->conv[i])) return -1;
    return 0;
}

static long long net_clock_ns(void) {
#if defined(CLOCK_MONOTONIC)
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
#else
    return 0;
#endif
}

#if NET_WS_CACHE
typedef atomic_long net_claim_t;
static Py_ssize_t net_claim(net_claim_t *next) { return (Py_ssize_t)atomic_fetch_add(next, 1); }
#else
typedef long net_claim_t;
static Py_ssize_t net_claim(net_claim_t *next) { return (Py_ssize_t)(*next)++; }
#endif

/* y [N, out_size] = the net applied to x [N, in_size]; ns (optional, [n_ops]) gains each layer's time,
 * its input transpose included. next (optional): a counter shared with another thread running the same batch,
 * each taking the next sample not yet taken. 0, or -1 when out of memory. */
static int net_run_timed(const path_t *p, const net_t *net, const float *x, Py_ssize_t N, float *y, long long *ns,
                         net_claim_t *next) {
    net_ws_t local = {0}, *ws = &local;
    int slot = -1;
#if NET_WS_CACHE
    net_t *kept = (net_t *)net; /* the cache is the only part of the net a run changes */
    for (int k = 0; k < NET_WS_CACHE && slot < 0; k++) {
        int idle = 0;
        if (atomic_compare_exchange_strong(&kept->ws_busy[k], &idle, 1)) slot = k, ws = &kept->ws[k];
    }
#endif
    int rc = ws->act[0] ? 0 : net_ws_alloc(net, ws);
    for (Py_ssize_t n = next ? net_claim(next) : 0; n < N && !rc; n = next ? net_claim(next) : n + 1) {
        const float *in = x + n * net->in_size;
        int flip = 0;
        for (Py_ssize_t i = 0; i < net->n_ops; i++) {
            const net_op_t *op = &net->ops[i];
            if (op->fused) continue; /* a 2 x 2 pooling done by the conv before it */
            int last = i == net->n_ops - 1 || (i == net->n_ops - 2 && net->ops[i + 1].fused);
            long long t0 = ns ? net_clock_ns() : 0;
            float *out = last && !net->tr_out ? y + n * net->out_size : ws->act[flip];
            flip ^= 1;
            if (op->tr_in) {
                net_transpose(in, op->tc, op->thw, op->tr_in, ws->tr);
                in = ws->tr;
            }
            switch (op->kind) {
            case NET_CONV:
                if (op->pool2) net_conv_pool_hwc(&op->c, in, op->wt, op->bp, op->relu, ws->pad, out);
                else net_conv_hwc(&op->c, in, op->wt, op->bp, op->relu, ws->pad, out);
                break;
            case NET_PQCONV:
                net_pqconv_hwc(p, &op->c, &ws->conv[i], in, fbuf(op, 0), op->arrays[1].buf, fbuf(op, 2), op->relu,
                               out);
                break;
            case NET_PQGEMM: net_pqgemm(p, op, in, ws->lut, ws->q, out); break;
            case NET_GEMM: net_gemm(in, op->c.C, fbuf(op, 0), fbuf(op, 1), op->c.C_out, out); break;
            case NET_RELU: net_relu(in, out, op->in_size); break;
            case NET_MAXPOOL: net_maxpool_hwc(&op->c, in, out); break;
            }
            if (op->relu && op->kind != NET_CONV && op->kind != NET_PQCONV) /* convs: in registers */
                net_relu(out, out, op->out_size);
            if (last && net->tr_out) net_transpose(out, net->oc, net->ohw, 2, y + n * net->out_size);
            if (ns) ns[i] += net_clock_ns() - t0;
            in = out;
        }
    }
    if (slot < 0 || rc) {
        net_ws_free(net, ws);
        memset(ws, 0, sizeof *ws);
    }
#if NET_WS_CACHE
    if (slot >= 0) atomic_store(&kept->ws_busy[slot], 0);
#endif
    return rc;
}

static int net_run(const path_t *p, const net_t *net, const float *x, Py_ssize_t N, float *y) {
    return net_run_timed(p, net, x, N, y, NULL, NULL);
}

/* ------------------------------------------------------------------------- a second thread, spinning */
/* Splitting a batch over two threads pays only if the second one starts at once: a pool thread that
 * sleeps between calls must be woken, and on a VM waking an idle vCPU cost about as much as the split
 * saved (edge CNN, batch 32: 1.85 ms on one thread, 1.89 ms split over two Python threads). Like
 * onnxruntime's workers, this helper spins for a while (NET_SPIN_NS) after each job before it sleeps.
 * The two threads take samples one by one from a shared counter rather than half the batch each, and the
 * caller withdraws a job the helper has not taken yet: on a shared machine the helper can be descheduled,
 * and a fixed half then stalled the call (edge CNN, batch 32, 2 threads: a 0.65 ms median, p90 5.9 ms). */
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>
#define NET_HELPER 1
#define NET_SPIN_NS 2000000 /* 2 ms */

static struct {
    pthread_mutex_t mu;      /* guards sleeping + the condition */
    pthread_cond_t cv;
    pthread_mutex_t busy;    /* one caller at a time; others run on their own thread */
    atomic_int job;          /* 0 none, 1 posted, 3 taken by the helper, 2 done */
    net_claim_t next;        /* the batch's next sample not yet taken */
    int started, sleeping, rc;
    const path_t *p;
    const net_t *net;
    const float *x;
    float *y;
    Py_ssize_t N;
} net_helper = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_MUTEX_INITIALIZER};

static long long net_now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void *net_helper_main(void *unused) {
    (void)unused;
    for (;;) {
        long long until = net_now_ns() + NET_SPIN_NS;
        while (atomic_load(&net_helper.job) != 1)
            if (net_now_ns() > until) { /* nothing came: sleep until a job is posted */
                pthread_mutex_lock(&net_helper.mu);
                net_helper.sleeping = 1;
                while (atomic_load(&net_helper.job) != 1) pthread_cond_wait(&net_helper.cv, &net_helper.mu);
                net_helper.sleeping = 0;
                pthread_mutex_unlock(&net_helper.mu);
            }
        int posted = 1;
        if (!atomic_compare_exchange_strong(&net_helper.job, &posted, 3)) continue; /* withdrawn by the caller */
        net_helper.rc = net_run_timed(net_helper.p, net_helper.net, net_helper.x, net_helper.N, net_helper.y, NULL,
                                      &net_helper.next);
        atomic_store(&net_helper.job, 2);
    }
    return NULL;
}

/* In a forked child the helper thread does not exist: start afresh. */
static void net_helper_forked(void) {
    pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
    net_helper.mu = fresh, net_helper.busy = fresh, net_helper.cv = cv;
    net_helper.started = net_helper.sleeping = 0;
    atomic_store(&net_helper.job, 0);
    atomic_store(&net_helper.next, 0);
}

/* net_run over two halves of the batch, the second on the helper thread; falls back to one thread when
 * the helper is taken by another caller or cannot be started. */
static int net_run2(const path_t *p, const net_t *net, const float *x, Py_ssize_t N, float *y) {
    if (N < 2 || pthread_mutex_trylock(&net_helper.busy)) return net_run(p, net, x, N, y);
    if (!net_helper.started) {
        pthread_t th;
        if (pthread_create(&th, NULL, net_helper_main, NULL)) {
            pthread_mutex_unlock(&net_helper.busy);
            return net_run(p, net, x, N, y);
        }
        pthread_detach(th);
        static int registered;
        if (!registered++) pthread_atfork(NULL, NULL, net_helper_forked);
        net_helper.started = 1;
    }
    net_helper.p = p, net_helper.net = net, net_helper.x = x, net_helper.y = y, net_helper.N = N;
    atomic_store(&net_helper.next, 0);
    pthread_mutex_lock(&net_helper.mu);
    atomic_store(&net_helper.job, 1);
    if (net_helper.sleeping) pthread_cond_signal(&net_helper.cv);
    pthread_mutex_unlock(&net_helper.mu);
    int rc = net_run_timed(p, net, x, N, y, NULL, &net_helper.next);
    int posted = 1;
    if (!atomic_compare_exchange_strong(&net_helper.job, &posted, 0)) { /* the helper took the job: */
        while (atomic_load(&net_helper.job) != 2) { /* wait for its last sample (spin: one sample at most) */ }
        rc |= net_helper.rc;
        atomic_store(&net_helper.job, 0);
    }
    pthread_mutex_unlock(&net_helper.busy);
    return rc;
}
#endif

/* ----------------------------------------------------------------------------------- Python glue */

static void net_free(net_t *net) {
    if (!net) return;
    for (Py_ssize_t i = 0; net->ops && i < net->n_ops; i++) {
        release(net->ops[i].arrays, NET_MAX_ARRAYS);
        free(net->ops[i].wt);
        free(net->ops[i].bp);
    }
#if NET_WS_CACHE
    for (int k = 0; net->ops && k < NET_WS_CACHE; k++) net_ws_free(net, &net->ws[k]);
#endif
    free(net->ops);
    free(net);
}

static void net_capsule_free(PyObject *capsule) { net_free(PyCapsule_GetPointer(capsule, NET_CAPSULE)); }

/* Sizes of one layer from its kind and geometry; checks them and its arrays. 0, or -1 with an exception. */
static int net_op_check(net_op_t *op, Py_ssize_t index) {
    conv_t *c = &op->c;
    Py_ssize_t S = c->kh * c->kw, nblk = (c->C_out + FS_BLOCK - 1) / FS_BLOCK;
    Py_ssize_t want[NET_MAX_ARRAYS] = {0, 0, 0}; /* bytes per array; 0 = no array */
    int bad = c->C < 1 || c->H < 1 || c->W < 1;
    int window = op->kind == NET_CONV || op->kind == NET_PQCONV || op->kind == NET_MAXPOOL;
    if (window) {
        if (op->kind == NET_MAXPOOL) c->dh = c->dw = 1;
        bad |= c->kh < 1 || c->kw < 1 || c->sh < 1 || c->sw < 1 || c->dh < 1 || c->dw < 1 || c->OH < 1 ||
               c->OW < 1 || c->pt < 0 || c->pl < 0 || c->pb < 0 || c->pr < 0 ||
               (c->OH - 1) * c->sh + (c->kh - 1) * c->dh >= c->H + c->pt + c->pb ||
               (c->OW - 1) * c->sw + (c->kw - 1) * c->dw >= c->W + c->pl + c->pr;
    }
    op->in_size = c->C * c->H * c->W;
    switch (op->kind) {
    case NET_CONV:
        bad |= c->C_out < 1 || c->group != 1;
        op->out_size = c->C_out * c->OH * c->OW;
        want[0] = 4 * c->C_out * c->C * S;
        want[1] = 4 * c->C_out;
        break;
    case NET_PQCONV:
        bad |= c->group < 1 || c->M != c->group * c->Mg || c->C != c->M * c->dsub || c->K < 1 || c->K > 16 ||
               c->Mp < S * c->Mg || c->Mp % 4 || c->C_out < 1 || c->C_out % c->group;
        nblk = (c->C_out / (c->group > 0 ? c->group : 1) + FS_BLOCK - 1) / FS_BLOCK;
        op->out_size = c->C_out * c->OH * c->OW;
        want[0] = 4 * c->M * c->dsub * 16;
        want[1] = c->group * nblk * c->Mp * 16;
        want[2] = 4 * c->C_out;
        break;
    case NET_PQGEMM:
        bad |= c->M < 1 || c->Mp < c->M || c->Mp % 4 || c->K < 1 || c->K > 16 || c->dsub < 1 || c->C_out < 1 ||
               op->in_size != c->M * c->dsub;
        op->out_size = c->C_out;
        want[0] = 4 * c->M * c->dsub * 16;
        want[1] = nblk * c->Mp * 16;
        want[2] = 4 * c->C_out;
        break;
    case NET_GEMM:
        bad |= c->C_out < 1;
        op->out_size = c->C_out;
        want[0] = 4 * c->C_out * op->in_size;
        want[1] = 4 * c->C_out;
        break;
    case NET_RELU: op->out_size = op->in_size; break;
    case NET_MAXPOOL: op->out_size = c->C * c->OH * c->OW; break;
    default:
        PyErr_Format(PyExc_ValueError, "net layer %zd: unknown kind %d", index, op->kind);
        return -1;
    }
    if (bad) {
        PyErr_Format(PyExc_ValueError, "net layer %zd (kind %d): inconsistent sizes", index, op->kind);
        return -1;
    }
    char what[48];
    for (int i = 0; i < NET_MAX_ARRAYS; i++) {
        snprintf(what, sizeof what, "net layer %zd array %d", index, i);
        if (want[i] && (!op->arrays[i].obj || !need(&op->arrays[i], want[i], what))) {
            if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "%s: missing", what);
            return -1;
        }
    }
    return 0;
}

/* A 2 x 2, stride 2, unpadded max pooling of the conv's whole output rows and columns (floor mode). */
static int net_poolable(const conv_t *conv, const net_op_t *next) {
    const conv_t *c = &next->c;
    return next->kind == NET_MAXPOOL && c->kh == 2 && c->kw == 2 && c->sh == 2 && c->sw == 2 && !c->pt && !c->pl &&
           !c->pb && !c->pr && c->OH == conv->OH / 2 && c->OW == conv->OW / 2 && c->OH > 0 && c->OW > 0;
}

/* Channels-last between window layers (net_hwc.h): marks the transposes, lays out the float conv weights.
 * 0, or -1 when out of memory. */
static int net_layout(net_t *net) {
    int hwc = 0;                 /* the current activation is [HW, C] */
    Py_ssize_t C = 1, HW = 1;    /* its channels and positions while hwc */
    for (Py_ssize_t i = 0; i < net->n_ops; i++) {
        net_op_t *op = &net->ops[i];
        const conv_t *c = &op->c;
        switch (op->kind) {
        case NET_CONV: case NET_PQCONV: case NET_MAXPOOL:
            if (!hwc && c->C > 1 && c->H * c->W > 1) op->tr_in = 1, op->tc = c->C, op->thw = c->H * c->W;
            hwc = 1;
            C = op->kind == NET_MAXPOOL ? c->C : c->C_out, HW = c->OH * c->OW;
            break;
        case NET_GEMM: case NET_PQGEMM:
            if (hwc && C > 1 && HW > 1) op->tr_in = 2, op->tc = C, op->thw = HW;
            hwc = 0;
            break;
        }
        if (op->kind == NET_CONV && i + 1 < net->n_ops && net_poolable(c, &net->ops[i + 1])) {
            op->pool2 = net->ops[i + 1].fused = 1;
            C = c->C_out, HW = net->ops[i + 1].c.OH * net->ops[i + 1].c.OW;
        }
        if (op->kind == NET_CONV) {
            Py_ssize_t cop = (c->C_out + 15) / 16 * 16;
            op->wt = malloc(sizeof(float) * (size_t)(c->kh * c->kw * c->C * cop));
            op->bp = malloc(sizeof(float) * (size_t)cop);
            if (!op->wt || !op->bp) return -1;
            net_conv_weights(c, fbuf(op, 0), fbuf(op, 1), cop, op->wt, op->bp);
        }
    }
    if (hwc && C > 1 && HW > 1) net->tr_out = 1, net->oc = C, net->ohw = HW;
    return 0;
}

PyDoc_STRVAR(net_new_doc,
             "net_new(layers) -> net (a capsule)\n"
             "layers: sequence of (kind, sizes, arrays[, relu]); sizes as conv()'s 23-tuple (N ignored), arrays a\n"
             "tuple of up to 3 contiguous buffers (kept referenced by the net), relu: max(y, 0) on the layer's\n"
             "output. See net.h for the kinds.");

static PyObject *py_net_new(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *layers;
    if (!PyArg_ParseTuple(args, "O", &layers)) return NULL;
    PyObject *seq = PySequence_Fast(layers, "layers must be a sequence");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    net_t *net = calloc(1, sizeof *net);
    if (!net || !(net->ops = calloc((size_t)(n ? n : 1), sizeof(net_op_t)))) {
        free(net);
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    if (n < 1) {
        PyErr_SetString(PyExc_ValueError, "a net needs at least one layer");
        goto fail;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        net_op_t *op = &net->ops[i];
        conv_t *c = &op->c;
        PyObject *arrays;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "i(nnnnnnnnnnnnnnnnnnnnnnn)O!|p", &op->kind, &c->N,
                              &c->C, &c->H, &c->W, &c->M, &c->K, &c->dsub, &c->Mg, &c->Mp, &c->C_out, &c->group,
                              &c->kh, &c->kw, &c->sh, &c->sw, &c->pt, &c->pl, &c->pb, &c->pr, &c->dh, &c->dw, &c->OH,
                              &c->OW, &PyTuple_Type, &arrays, &op->relu))
            goto fail;
        net->n_ops = i + 1; /* from here on net_free releases this layer's buffers */
        if (PyTuple_GET_SIZE(arrays) > NET_MAX_ARRAYS) {
            PyErr_Format(PyExc_ValueError, "net layer %zd: at most %d arrays", i, NET_MAX_ARRAYS);
            goto fail;
        }
        for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(arrays); j++)
            if (PyObject_GetBuffer(PyTuple_GET_ITEM(arrays, j), &op->arrays[j], PyBUF_SIMPLE)) goto fail;
        if (net_op_check(op, i)) goto fail;
        if (i && op->in_size != net->ops[i - 1].out_size) {
            PyErr_Format(PyExc_ValueError, "net layer %zd takes %zd values, layer %zd gives %zd", i, op->in_size,
                         i - 1, net->ops[i - 1].out_size);
            goto fail;
        }
        net->act_size = op->out_size > net->act_size ? op->out_size : net->act_size;
    }
    net->in_size = net->ops[0].in_size;
    net->out_size = net->ops[n - 1].out_size;
    if (net_layout(net)) {
        PyErr_NoMemory();
        goto fail;
    }
    Py_DECREF(seq);
    PyObject *capsule = PyCapsule_New(net, NET_CAPSULE, net_capsule_free);
    if (!capsule) net_free(net);
    return capsule;
fail:
    Py_DECREF(seq);
    net_free(net);
    return NULL;
}

PyDoc_STRVAR(net_run_doc,
             "net_run(net, x, y, N, path='', threads=1)\n"
             "y float32 [N, out] (written) = the net applied to x float32 [N, in], sample by sample;\n"
             "threads >= 2: the second half of the batch on a helper thread that spins between calls.");

PyDoc_STRVAR(net_profile_doc,
             "net_profile(net, x, y, N, path='') -> list of int\n"
             "As net_run on one thread, timing each layer: nanoseconds per layer summed over the N samples.");

static PyObject *py_net_profile(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *capsule;
    Py_buffer b[2] = {{0}};
    Py_ssize_t N;
    const char *path = "";
    if (!PyArg_ParseTuple(args, "Oy*w*n|s", &capsule, &b[0], &b[1], &N, &path)) return NULL;
    const net_t *net = PyCapsule_GetPointer(capsule, NET_CAPSULE);
    const path_t *p = net ? find_path(path) : NULL;
    long long *ns = net ? calloc((size_t)net->n_ops, sizeof(long long)) : NULL;
    if (!p || !ns || N < 0 || !need(&b[0], 4 * N * net->in_size, "x") || !need(&b[1], 4 * N * net->out_size, "y")) {
        free(ns);
        release(b, 2);
        return net && p && !ns ? PyErr_NoMemory() : NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = net_run_timed(p, net, b[0].buf, N, b[1].buf, ns, NULL);
    Py_END_ALLOW_THREADS
    release(b, 2);
    PyObject *out = rc ? PyErr_NoMemory() : PyList_New(net->n_ops);
    for (Py_ssize_t i = 0; out && !rc && i < net->n_ops; i++) PyList_SET_ITEM(out, i, PyLong_FromLongLong(ns[i]));
    free(ns);
    return out;
}

static PyObject *py_net_run(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *capsule;
    Py_buffer b[2] = {{0}};
    Py_ssize_t N;
    const char *path = "";
    int threads = 1;
    if (!PyArg_ParseTuple(args, "Oy*w*n|si", &capsule, &b[0], &b[1], &N, &path, &threads)) return NULL;
    const net_t *net = PyCapsule_GetPointer(capsule, NET_CAPSULE);
    const path_t *p = net ? find_path(path) : NULL;
    if (!p) goto done;
    if (N < 0 || !need(&b[0], 4 * N * net->in_size, "x") || !need(&b[1], 4 * N * net->out_size, "y")) goto done;
    int rc;
    Py_BEGIN_ALLOW_THREADS
#ifdef NET_HELPER
    rc = threads > 1 ? net_run2(p, net, b[0].buf, N, b[1].buf) : net_run(p, net, b[0].buf, N, b[1].buf);
#else
    rc = net_run(p, net, b[0].buf, N, b[1].buf);
#endif
    Py_END_ALLOW_THREADS
    return finish(rc, b, 2);
done:
    release(b, 2);
    return NULL;
}

#endif /* EDGEQ_FASTSCAN_NET_H */
