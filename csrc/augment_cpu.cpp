// The CPU kernel of the op "augment" (its "native" backend; fastclip/ops/augment.py).
//
// One image at a time, in one call: uint8 -> float, horizontal flip, separable Gaussian blur,
// the mean luma, the colour map (jitter + grayscale + normalisation composed into one 3x3 matrix
// and offset, derived in fastclip/ops/augment.py), the clamp, the float32 write.  The torch backend
// does the same as a dozen whole-image tensor operations, each a pass over memory; here the
// image stays in this thread's cache between the steps, and the blur is one pass per axis
// instead of one per tap.
//
// C-style C++ with no Python or torch headers, built into fastclip._C by setup.py;
// csrc/bindings.cpp checks every argument and calls it with the GIL released.  Nothing here
// validates.
#include "augment_cpu.h"

#include <cstring>

/* CLONES, INLINE: vector widths chosen at load time on x86-64 (clones.h). */

/* Reflect an index into [0, n) the way torch's "reflect" padding does (the edge is not repeated). */
INLINE int64_t reflect(int64_t i, int64_t n) { return i < 0 ? -i : (i >= n ? 2 * (n - 1) - i : i); }

/* Planes x [planes][h][w] blurred in place with symmetric taps k[0..r] (k[t] weighs the pixels
   t away; each pair is added before the multiply), reflect padding; needs r <= min(h, w) - 1 and
   scratch of h*w + w + 2r floats. */
INLINE void blur_planes(float *x, int64_t planes, int64_t h, int64_t w, const float *k, int64_t r,
                        float *scratch) {
    float *tmp = scratch, *pad = scratch + h * w;
    for (int64_t p = 0; p < planes; p++) {
        float *img = x + p * h * w;
        for (int64_t y = 0; y < h; y++) {  /* along W, through a padded copy of the row */
            const float *row = img + y * w;
            for (int64_t i = 0; i < r; i++) {
                pad[i] = row[r - i];
                pad[r + w + i] = row[w - 2 - i];
            }
            memcpy(pad + r, row, (size_t)w * sizeof(float));
            const float *c = pad + r;
            float *o = tmp + y * w;
            for (int64_t j = 0; j < w; j++) o[j] = k[0] * c[j];
            for (int64_t t = 1; t <= r; t++) {
                const float kt = k[t];
                const float *a = c - t, *b = c + t;
                for (int64_t j = 0; j < w; j++) o[j] += kt * (a[j] + b[j]);
            }
        }
        for (int64_t y = 0; y < h; y++) {  /* along H, rows of tmp (reflected at the edges) */
            const float *c = tmp + y * w;
            float *o = img + y * w;
            for (int64_t j = 0; j < w; j++) o[j] = k[0] * c[j];
            for (int64_t t = 1; t <= r; t++) {
                const float kt = k[t];
                const float *a = tmp + reflect(y - t, h) * w, *b = tmp + reflect(y + t, h) * w;
                for (int64_t j = 0; j < w; j++) o[j] += kt * (a[j] + b[j]);
            }
        }
    }
}

/* One image.
   src: uint8, element strides (sc, sh, sw) over [3][h][w] (any layout: HWC, CHW, views).
   flip: mirror along W.   k, r: blur taps k[0..r] (r = 0: no blur; k may then be NULL).
   a [3][3], off [3]: out_c = sum_j a[c][j] x_j + off[c] (+ kl[c] * m when kl is not NULL, m the
   mean over the image of luma . x after the blur), then clamped to [lo_c, hi_c] when lo is
   not NULL.   out: float32 [3][h][w], contiguous.   scratch: fc_augment_scratch(h, w, r) floats. */
CLONES
void fc_augment_image(const uint8_t *src, int64_t sc, int64_t sh, int64_t sw, int64_t h, int64_t w,
                      int32_t flip, const float *k, int64_t r, const float *a, const float *off,
                      const float *kl, const float *luma, const float *lo, const float *hi, float *out,
                      float *scratch) {
    const int64_t n = h * w;
    float *x = scratch;
    for (int64_t c = 0; c < 3; c++)
        for (int64_t y = 0; y < h; y++) {
            const uint8_t *s = src + c * sc + y * sh;
            float *d = x + c * n + y * w;
            if (flip)
                for (int64_t j = 0; j < w; j++) d[j] = (float)s[(w - 1 - j) * sw];
            else if (sw == 1)
                for (int64_t j = 0; j < w; j++) d[j] = (float)s[j];
            else
                for (int64_t j = 0; j < w; j++) d[j] = (float)s[j * sw];
        }
    if (r > 0) blur_planes(x, 3, h, w, k, r, scratch + 3 * n);

    float bias[3] = {off[0], off[1], off[2]};
    if (kl) {
        /* per-row partial sums in 16 lanes (vectorisable without reassociation flags), rows in double */
        double s[3] = {0.0, 0.0, 0.0};
        for (int64_t y = 0; y < h; y++)
            for (int c = 0; c < 3; c++) {
                float lane[16] = {0};
                const float *p = x + c * n + y * w;
                int64_t j = 0;
                for (; j + 16 <= w; j += 16)
                    for (int q = 0; q < 16; q++) lane[q] += p[j + q];
                for (; j < w; j++) lane[0] += p[j];
                for (int q = 0; q < 16; q++) s[c] += lane[q];
            }
        const double m = (luma[0] * s[0] + luma[1] * s[1] + luma[2] * s[2]) / (double)n;
        for (int c = 0; c < 3; c++) bias[c] += kl[c] * (float)m;
    }
    const float *x0 = x, *x1 = x + n, *x2 = x + 2 * n;
    for (int c = 0; c < 3; c++) {
        const float a0 = a[3 * c], a1 = a[3 * c + 1], a2 = a[3 * c + 2], b = bias[c];
        float *d = out + c * n;
        if (lo) {
            const float l = lo[c], u = hi[c];
            for (int64_t i = 0; i < n; i++) {
                float v = a0 * x0[i] + a1 * x1[i] + a2 * x2[i] + b;
                v = v < l ? l : v;
                d[i] = v > u ? u : v;
            }
        } else {
            for (int64_t i = 0; i < n; i++) d[i] = a0 * x0[i] + a1 * x1[i] + a2 * x2[i] + b;
        }
    }
}
