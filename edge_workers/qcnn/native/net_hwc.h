/* edgeq native net: the window layers (float conv, PQ conv, max pooling) on channels-last activations.
 *
 * Included once, by net.h. Inside a net, activations between window layers are [H, W, C] per sample
 * (channels last, "HWC"): a position's C values are contiguous, so
 *   - the float conv is direct (no im2col): each output position's C_out sums are vector registers (16
 *     channels each) fed by broadcast input values times one weight vector per tap and input channel;
 *     a 1-channel first layer (the edge and cloud CNNs') reads the model input as is, since [1, H, W] is
 *     both layouts;
 *   - a PQ conv builds the tables of a position from contiguous inputs and scans an output position's
 *     kernel rows in place (scan_seg.h: one segment per kernel row) instead of gathering them;
 *   - max pooling takes the maximum of whole channel vectors.
 * net.h's planner transposes where a layer needs the other layout (a multi-channel net input, an FC layer
 * after a flatten, a net ending on a window layer), so the net's inputs and outputs stay [C, H, W].
 */
#ifndef EDGEQ_FASTSCAN_NET_HWC_H
#define EDGEQ_FASTSCAN_NET_HWC_H

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define NET_CLONES4 __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NET_CLONES4
#endif

typedef float net_v16 __attribute__((vector_size(64))); /* 16 floats: one AVX-512 register, 2 AVX, 4 SSE */
typedef int32_t net_i16 __attribute__((vector_size(64)));
#define NET_LOAD16(p) ({ net_v16 v_; memcpy(&v_, (p), sizeof v_); v_; })
#define NET_RELU16(v) ((v) = (net_v16)((net_i16)(v) & (net_i16)((v) > 0.0f)))
#define NET_MAX16(a, b) ((net_v16)(((net_i16)((a) > (b)) & (net_i16)(a)) | (~(net_i16)((a) > (b)) & (net_i16)(b))))
#define NET_TILE 8 /* output positions per direct-conv tile: 8 sums of 16 channels in registers */

/* y [HW, C] = x [C, HW] transposed (dir 1), or y [C, HW] = x [HW, C] (dir 2). */
static void net_transpose(const float *x, Py_ssize_t C, Py_ssize_t HW, int dir, float *y) {
    for (Py_ssize_t c = 0; c < C; c++)
        for (Py_ssize_t i = 0; i < HW; i++) {
            if (dir == 1) y[i * C + c] = x[c * HW + i];
            else y[c * HW + i] = x[i * C + c];
        }
}

/* Conv weights w float32 [C_out, C, kh, kw] -> wt [kh*kw*C, cop] (cop = C_out rounded up to 16, zeros past
 * C_out) and bias bp [cop]. */
static void net_conv_weights(const conv_t *c, const float *w, const float *b, Py_ssize_t cop, float *wt, float *bp) {
    Py_ssize_t S = c->kh * c->kw;
    memset(wt, 0, sizeof(float) * (size_t)(S * c->C * cop));
    memset(bp, 0, sizeof(float) * (size_t)cop);
    for (Py_ssize_t o = 0; o < c->C_out; o++) {
        bp[o] = b[o];
        for (Py_ssize_t ch = 0; ch < c->C; ch++)
            for (Py_ssize_t s = 0; s < S; s++) wt[(s * c->C + ch) * cop + o] = w[(o * c->C + ch) * S + s];
    }
}

/* x [H, W, C] -> xp [H+pt+pb, W+pl+pr, C] with zeros around; returns xp, or x itself without pads. */
static const float *net_pad_hwc(const conv_t *c, const float *x, float *xp) {
    if (!c->pt && !c->pl && !c->pb && !c->pr) return x;
    Py_ssize_t Wp = c->W + c->pl + c->pr, Hp = c->H + c->pt + c->pb;
    memset(xp, 0, sizeof(float) * (size_t)(Hp * Wp * c->C));
    for (Py_ssize_t h = 0; h < c->H; h++)
        memcpy(xp + ((h + c->pt) * Wp + c->pl) * c->C, x + h * c->W * c->C, sizeof(float) * (size_t)(c->W * c->C));
    return xp;
}

/* n (<= NET_TILE, a constant where inlined) output positions of one row, 16 output channels (chunk k0 .. k0+15):
 * xr points at the padded input of the first position's top-left tap, tap s at xr + offs[s]; positions are sw*C
 * floats apart. One flat loop over taps x input channels (a 1-channel layer has one multiply-add per tap and
 * position). */
__attribute__((always_inline)) static inline void net_conv_tile_n(const conv_t *c, const float *xr,
                                                                  const Py_ssize_t *offs, const float *wt,
                                                                  Py_ssize_t cop, Py_ssize_t k0, const float *bp,
                                                                  int relu, const int n, float *y) {
    Py_ssize_t C = c->C, step = c->sw * C, S = c->kh * c->kw;
    net_v16 acc[NET_TILE], bias = NET_LOAD16(bp + k0);
    for (int t = 0; t < n; t++) acc[t] = bias;
    const float *wk = wt + k0;
    if (C == 1 && step == 1) { /* a first layer: the positions' inputs at constant offsets */
        for (Py_ssize_t s = 0; s < S; s++) {
            const float *xt = xr + offs[s];
            net_v16 wv = NET_LOAD16(wk + s * cop);
            for (int t = 0; t < n; t++) acc[t] += xt[t] * wv;
        }
    } else if (C == 1) {
        for (Py_ssize_t s = 0; s < S; s++) {
            const float *xt = xr + offs[s];
            net_v16 wv = NET_LOAD16(wk + s * cop);
            for (int t = 0; t < n; t++) acc[t] += xt[t * step] * wv;
        }
    } else {
        for (Py_ssize_t s = 0; s < S; s++) {
            const float *xt = xr + offs[s], *ws = wk + s * C * cop;
            for (Py_ssize_t ch = 0; ch < C; ch++) {
                net_v16 wv = NET_LOAD16(ws + ch * cop);
                for (int t = 0; t < n; t++) acc[t] += xt[t * step + ch] * wv;
            }
        }
    }
    Py_ssize_t keep = c->C_out - k0 < 16 ? c->C_out - k0 : 16;
    for (int t = 0; t < n; t++) {
        net_v16 v = acc[t]; /* a copy: taking acc's address would keep the whole tile in memory */
        if (relu) NET_RELU16(v);
        if (keep == 16) memcpy(y + t * c->C_out + k0, &v, sizeof v); /* a constant size: one store */
        else memcpy(y + t * c->C_out + k0, &v, sizeof(float) * (size_t)keep);
    }
}

/* 8 positions x output channels k0 .. k0+31 (all real) of a 1-channel, stride-1 conv: each input broadcast feeds
 * two multiply-adds (the cloud CNN's 32-channel first layer). */
NET_CLONES4 static void net_conv_tile_c1x32(const conv_t *c, const float *xr, const Py_ssize_t *offs, const float *wt,
                                            Py_ssize_t cop, Py_ssize_t k0, const float *bp, int relu, float *y) {
    net_v16 a[NET_TILE], b[NET_TILE], b0 = NET_LOAD16(bp + k0), b1 = NET_LOAD16(bp + k0 + 16);
    for (int t = 0; t < NET_TILE; t++) a[t] = b0, b[t] = b1;
    for (Py_ssize_t s = 0; s < c->kh * c->kw; s++) {
        const float *xt = xr + offs[s];
        net_v16 w0 = NET_LOAD16(wt + s * cop + k0), w1 = NET_LOAD16(wt + s * cop + k0 + 16);
        for (int t = 0; t < NET_TILE; t++) {
            float v = xt[t];
            a[t] += v * w0;
            b[t] += v * w1;
        }
    }
    for (int t = 0; t < NET_TILE; t++) {
        net_v16 u = a[t], v = b[t];
        if (relu) NET_RELU16(u), NET_RELU16(v);
        memcpy(y + t * c->C_out + k0, &u, sizeof u);
        memcpy(y + t * c->C_out + k0 + 16, &v, sizeof v);
    }
}

/* net_conv_tile_n with n a constant (one specialized loop nest per tile width). */
NET_CLONES4 static void net_conv_tile(const conv_t *c, const float *xr, const Py_ssize_t *offs, const float *wt,
                                      Py_ssize_t cop, Py_ssize_t k0, const float *bp, int relu, Py_ssize_t n,
                                      float *y) {
    switch (n) {
    case 8: net_conv_tile_n(c, xr, offs, wt, cop, k0, bp, relu, 8, y); break;
    case 7: net_conv_tile_n(c, xr, offs, wt, cop, k0, bp, relu, 7, y); break;
    case 6: net_conv_tile_n(c, xr, offs, wt, cop, k0, bp, relu, 6, y); break;
    case 5: net_conv_tile_n(c, xr, offs, wt, cop, k0, bp, relu, 5, y); break;
    case 4: net_conv_tile_n(c, xr, offs, wt, cop, k0, bp, relu, 4, y); break;
    case 3: net_conv_tile_n(c, xr, offs, wt, cop, k0, bp, relu, 3, y); break;
    case 2: net_conv_tile_n(c, xr, offs, wt, cop, k0, bp, relu, 2, y); break;
    default: net_conv_tile_n(c, xr, offs, wt, cop, k0, bp, relu, 1, y); break;
    }
}

/* y [OH, OW, C_out] = the convolution of x [H, W, C] (direct; wt, bp from net_conv_weights). xp: padded
 * input scratch. */
static void net_conv_hwc(const conv_t *c, const float *x, const float *wt, const float *bp, int relu, float *xp,
                         float *y) {
    Py_ssize_t Wp = c->W + c->pl + c->pr, cop = (c->C_out + 15) / 16 * 16, S = c->kh * c->kw;
    const float *in = net_pad_hwc(c, x, xp);
    Py_ssize_t offs_local[64], *offs = S <= 64 ? offs_local : malloc(sizeof(Py_ssize_t) * (size_t)S);
    if (!offs) return; /* never for the kernels of these nets; a huge kernel without memory leaves y unset */
    for (Py_ssize_t a = 0; a < c->kh; a++)
        for (Py_ssize_t bb = 0; bb < c->kw; bb++) offs[a * c->kw + bb] = (a * c->dh * Wp + bb * c->dw) * c->C;
    for (Py_ssize_t oh = 0; oh < c->OH; oh++)
        for (Py_ssize_t ow = 0; ow < c->OW; ow += NET_TILE) {
            Py_ssize_t n = c->OW - ow < NET_TILE ? c->OW - ow : NET_TILE;
            const float *xr = in + (oh * c->sh * Wp + ow * c->sw) * c->C;
            Py_ssize_t k0 = 0;
            float *yt = y + (oh * c->OW + ow) * c->C_out;
            if (n == NET_TILE && c->C == 1 && c->sw == 1) /* a first layer: 32 channels per pass */
                for (; k0 + 32 <= c->C_out; k0 += 32) net_conv_tile_c1x32(c, xr, offs, wt, cop, k0, bp, relu, yt);
            for (; k0 < c->C_out; k0 += 16) net_conv_tile(c, xr, offs, wt, cop, k0, bp, relu, n, yt);
        }
    if (offs != offs_local) free(offs);
}

#define NET_PTILE 4 /* pooled outputs per fused conv + pool tile: 2 conv rows x 8 positions in registers */

/* The 2 x 2 max pooling of n (<= NET_PTILE) pairs of conv positions on two conv rows, 16 output channels from k0:
 * xr points at the padded input of the top-left conv position's top-left tap (as net_conv_tile). */
NET_CLONES4 static void net_conv_pool_tile(const conv_t *c, const float *xr, Py_ssize_t Wp, const Py_ssize_t *offs,
                                           const float *wt, Py_ssize_t cop, Py_ssize_t k0, const float *bp, int relu,
                                           Py_ssize_t n, float *y) {
    Py_ssize_t C = c->C, step = c->sw * C, S = c->kh * c->kw, row = c->sh * Wp * C;
    net_v16 top[2 * NET_PTILE], bot[2 * NET_PTILE], bias = NET_LOAD16(bp + k0);
    for (int t = 0; t < 2 * NET_PTILE; t++) top[t] = bot[t] = bias;
    const float *wk = wt + k0;
    if (n == NET_PTILE && C == 1 && step == 1) { /* a first layer: one multiply-add per tap and position, the */
        for (Py_ssize_t s = 0; s < S; s++) {       /* positions' inputs at constant offsets */
            const float *xt = xr + offs[s], *xb = xt + row;
            net_v16 wv = NET_LOAD16(wk + s * cop);
            for (int t = 0; t < 2 * NET_PTILE; t++) {
                top[t] += xt[t] * wv;
                bot[t] += xb[t] * wv;
            }
        }
    } else if (n == NET_PTILE && C == 1) {
        for (Py_ssize_t s = 0; s < S; s++) {
            const float *xt = xr + offs[s];
            net_v16 wv = NET_LOAD16(wk + s * cop);
            for (int t = 0; t < 2 * NET_PTILE; t++) {
                top[t] += xt[t * step] * wv;
                bot[t] += xt[row + t * step] * wv;
            }
        }
    } else {
        for (Py_ssize_t s = 0; s < S; s++) {
            const float *xt = xr + offs[s], *ws = wk + s * C * cop;
            for (Py_ssize_t ch = 0; ch < C; ch++) {
                net_v16 wv = NET_LOAD16(ws + ch * cop);
                for (Py_ssize_t t = 0; t < 2 * n; t++) {
                    top[t] += xt[t * step + ch] * wv;
                    bot[t] += xt[row + t * step + ch] * wv;
                }
            }
        }
    }
    Py_ssize_t keep = c->C_out - k0 < 16 ? c->C_out - k0 : 16;
    for (Py_ssize_t t = 0; t < n; t++) {
        net_v16 a = NET_MAX16(top[2 * t], top[2 * t + 1]), b = NET_MAX16(bot[2 * t], bot[2 * t + 1]);
        net_v16 m = NET_MAX16(a, b);
        if (relu) NET_RELU16(m);
        if (keep == 16) memcpy(y + t * c->C_out + k0, &m, sizeof m);
        else memcpy(y + t * c->C_out + k0, &m, sizeof(float) * (size_t)keep);
    }
}

/* y [OH/2, OW/2, C_out] = the 2 x 2 max pooling (stride 2, floor) of the convolution of x [H, W, C]. */
static void net_conv_pool_hwc(const conv_t *c, const float *x, const float *wt, const float *bp, int relu, float *xp,
                              float *y) {
    Py_ssize_t Wp = c->W + c->pl + c->pr, cop = (c->C_out + 15) / 16 * 16, S = c->kh * c->kw;
    Py_ssize_t PH = c->OH / 2, PW = c->OW / 2;
    const float *in = net_pad_hwc(c, x, xp);
    Py_ssize_t offs_local[64], *offs = S <= 64 ? offs_local : malloc(sizeof(Py_ssize_t) * (size_t)S);
    if (!offs) return;
    for (Py_ssize_t a = 0; a < c->kh; a++)
        for (Py_ssize_t bb = 0; bb < c->kw; bb++) offs[a * c->kw + bb] = (a * c->dh * Wp + bb * c->dw) * c->C;
    for (Py_ssize_t ph = 0; ph < PH; ph++)
        for (Py_ssize_t pw = 0; pw < PW; pw += NET_PTILE) {
            Py_ssize_t n = PW - pw < NET_PTILE ? PW - pw : NET_PTILE;
            const float *xr = in + (2 * ph * c->sh * Wp + 2 * pw * c->sw) * c->C;
            for (Py_ssize_t k0 = 0; k0 < c->C_out; k0 += 16)
                net_conv_pool_tile(c, xr, Wp, offs, wt, cop, k0, bp, relu, n, y + (ph * PW + pw) * c->C_out);
        }
    if (offs != offs_local) free(offs);
}

/* y [OH, OW, C] = max over each window of x [H, W, C] (padding never wins). */
NET_CLONES4 static void net_maxpool_hwc(const conv_t *c, const float *x, float *y) {
    Py_ssize_t C = c->C;
    for (Py_ssize_t oh = 0; oh < c->OH; oh++)
        for (Py_ssize_t ow = 0; ow < c->OW; ow++) {
            float *yo = y + (oh * c->OW + ow) * C;
            if (c->kh == 2 && c->kw == 2 && !c->pt && !c->pl && oh * c->sh + 1 < c->H && ow * c->sw + 1 < c->W) { /* a whole 2 x 2 window */
                const float *r0 = x + (oh * c->sh * c->W + ow * c->sw) * C, *r1 = r0 + c->W * C;
                for (Py_ssize_t ch = 0; ch < C; ch++) {
                    float a = r0[ch] > r0[C + ch] ? r0[ch] : r0[C + ch];
                    float b = r1[ch] > r1[C + ch] ? r1[ch] : r1[C + ch];
                    yo[ch] = a > b ? a : b;
                }
                continue;
            }
            for (Py_ssize_t ch = 0; ch < C; ch++) yo[ch] = -INFINITY;
            for (Py_ssize_t a = 0; a < c->kh; a++) {
                Py_ssize_t ih = oh * c->sh + a - c->pt;
                if (ih < 0 || ih >= c->H) continue;
                for (Py_ssize_t bb = 0; bb < c->kw; bb++) {
                    Py_ssize_t iw = ow * c->sw + bb - c->pl;
                    if (iw < 0 || iw >= c->W) continue;
                    const float *xi = x + (ih * c->W + iw) * C;
                    for (Py_ssize_t ch = 0; ch < C; ch++) yo[ch] = xi[ch] > yo[ch] ? xi[ch] : yo[ch];
                }
            }
        }
}

/* yo[i] = bo[i] + off + s * sums[i], i < nt: conv_sample's arithmetic (no multiply-add contraction), vectorized. */
__attribute__((optimize("fp-contract=off"))) NET_CLONES4 static void net_sums_out(const uint32_t *sums, Py_ssize_t nt,
                                                                                 const float *bo, float off, float s,
                                                                                 int relu, float *yo) {
    for (Py_ssize_t i = 0; i < nt; i++) {
        float v = bo[i] + off + s * (float)(int32_t)sums[i]; /* sums < 2^31 */
        yo[i] = relu && !(v > 0.0f) ? 0.0f : v;
    }
}

/* One sample of a PQ convolution on x [H, W, C] -> y [OH, OW, C_out] (relu: max(y, 0)): the same tables,
 * quantization, offsets and integer sums as conv_sample (fastscan.c), hence the same outputs, in the other layout.
 * Without groups or dilation a whole output row is one scan_seg call. */
static void net_pqconv_hwc(const path_t *p, const conv_t *c, conv_buf_t *wb, const float *xn, const float *cbt,
                           const uint8_t *codes, const float *bias, int relu, float *yn) {
    Py_ssize_t Wp = c->W + c->pl + c->pr, P = (c->H + c->pt + c->pb) * Wp, M = c->M, Mg = c->Mg, G = c->group;
    float widest = 0.0f;
    for (Py_ssize_t h = 0; h < c->H; h++) { /* one image row of positions at a time */
        Py_ssize_t row0 = (h + c->pt) * Wp + c->pl;
        float r = p->rows_n(xn + h * c->W * c->C, c->W, c->C, 1, cbt, M, c->dsub, wb->lut + row0 * M * 16,
                            wb->mins + row0 * M);
        widest = r > widest ? r : widest;
        for (Py_ssize_t w = 0; w < c->W; w++) {
            Py_ssize_t pos = row0 + w;
            for (Py_ssize_t g = 0; g < G; g++) {
                double off = 0.0;
                for (Py_ssize_t j = 0; j < Mg; j++) off += wb->mins[pos * M + g * Mg + j];
                wb->rowsum[pos * G + g] = (float)off;
            }
        }
    }
    float s = scale_for(widest);
    p->quantize(wb->lut, wb->mins, P * M, 1.0f / s, wb->q);
    for (Py_ssize_t h = 0; h < c->H + c->pt + c->pb; h++)
        for (Py_ssize_t ow = 0; ow < c->OW; ow++)
            for (Py_ssize_t g = 0; g < G; g++) {
                double off = 0.0;
                for (Py_ssize_t b = 0; b < c->kw; b++) off += wb->rowsum[(h * Wp + ow * c->sw + b * c->dw) * G + g];
                wb->hsum[(h * c->OW + ow) * G + g] = off;
            }
    Py_ssize_t Cog = c->C_out / G, nblk = (Cog + FS_BLOCK - 1) / FS_BLOCK, seglen = c->kw * Mg;
    size_t tap_bytes = (size_t)(Mg * 16);
    int in_place = G == 1 && c->dw == 1; /* a kernel row's tables are contiguous */
    uint32_t sums[FS_BLOCK];
    for (Py_ssize_t oh = 0; oh < c->OH; oh++)
        for (Py_ssize_t g = 0; g < G; g++) {
            for (Py_ssize_t ow = 0; ow < c->OW; ow++) { /* the row's offsets, as conv_sample sums them */
                double off = 0.0;
                for (Py_ssize_t a = 0; a < c->kh; a++) off += wb->hsum[((oh * c->sh + a * c->dh) * c->OW + ow) * G + g];
                wb->offs[ow] = (float)off;
            }
            float *yrow = yn + oh * c->OW * c->C_out + g * Cog;
            const float *bo = bias + g * Cog;
            for (Py_ssize_t blk = 0; blk < nblk; blk++) {
                const uint8_t *cb = codes + (g * nblk + blk) * c->Mp * 16;
                Py_ssize_t t0 = blk * FS_BLOCK, nt = Cog - t0 < FS_BLOCK ? Cog - t0 : FS_BLOCK;
                if (in_place) { /* the whole output row in one call */
                    seg_out_t o = {bo + t0, wb->offs, s, nt, c->OW, c->sw * M * 16, c->C_out, relu, yrow + t0};
                    p->scan_seg(cb, wb->q + oh * c->sh * Wp * M * 16, c->kh, seglen, c->dh * Wp * M * 16, &o, sums);
                    continue;
                }
                for (Py_ssize_t ow = 0; ow < c->OW; ow++) {
                    uint8_t *dst = wb->gathered;
                    for (Py_ssize_t a = 0; a < c->kh; a++) {
                        Py_ssize_t pos0 = (oh * c->sh + a * c->dh) * Wp + ow * c->sw;
                        for (Py_ssize_t b = 0; b < c->kw; b++, dst += tap_bytes)
                            memcpy(dst, wb->q + ((pos0 + b * c->dw) * M + g * Mg) * 16, tap_bytes);
                    }
                    p->scan(cb, wb->gathered, c->Mp, sums);
                    net_sums_out(sums, nt, bo + t0, wb->offs[ow], s, relu, yrow + ow * c->C_out + t0);
                }
            }
        }
}

#endif /* EDGEQ_FASTSCAN_NET_HWC_H */
