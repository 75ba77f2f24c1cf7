/* RMS norms, forward and backward, for float32 CPU buffers: the plain norm and Mamba-2's gated norm.
 *
 * Same math as bmojo_neuron/ops/reference/elementwise_fused.py (`_RMSNorm`, `_GatedRMSNorm`), one row at a
 * time: a row (a few KiB) stays in L1 while every pass over it runs, so each input is read from memory once
 * per direction and no intermediate is written back.
 *
 * Layouts (contiguous, row-major):
 *   plain: x, out, gy, dx (n, dim); w, dw (dim); inv_rms (n)
 *   gated: x, z, out, gy, dx, dz (n, groups * size); w, dw (groups * size); inv_rms (n, groups)
 *
 * Math, per row (per group of `size` channels for the gated norm), h the normalised input
 * (plain: h = x; gated: h = x * silu(z), silu(z) = z s, s = sigmoid(z)):
 *   forward   r = 1 / sqrt(mean(h^2) + eps);  out = (h r) w;  inv_rms = r (saved for the backward)
 *   backward  u = h r, gu = gy w:
 *             dw += gy u (summed over rows)
 *             dh = (gu - u mean(gu u)) r
 *             plain: dx = dh;  gated: dx = dh silu(z), dz = dh x silu'(z), silu'(z) = s (1 + z (1 - s))
 * The backward recomputes u and silu(z) from the saved inputs and inv_rms instead of saving them.
 *
 * Order of sums (the same bits for any thread count):
 *   - a row's mean goes through LANES running sums (vectorised) added up in a fixed tree;
 *   - dw: rows in blocks of BLOCK_ROWS; each block sums its rows in order into its own slot, then the slots
 *     are added in block order. Threads take whole blocks.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* GCC vectorises a loop with float comparisons (exp_clamped's clamps) only where they may not trap; these
 * kernels never read the floating-point exception flags, so this changes no result. */
#if defined(__GNUC__) && !defined(__clang__) /* clang defines __GNUC__ too, and warns on GCC's optimize pragma; */
#pragma GCC optimize("no-trapping-math")     /* its default already lets compares be if-converted */
#endif

#include "fast_exp.h"

#define LANES 16
#define BLOCK_ROWS 64

static inline float sigmoid(float z) { return 1.f / (1.f + exp_clamped(-z)); }

static inline float tree_sum(float acc[LANES]) {
    for (int width = LANES / 2; width > 0; width /= 2)
        for (int l = 0; l < width; l++) acc[l] += acc[l + width];
    return acc[0];
}

/* sum_i a[i] b[i] over n, in LANES running sums then a fixed tree. */
static float dot(const float *a, const float *b, long n) {
    float acc[LANES] = {0};
    long i = 0;
    for (; i + LANES <= n; i += LANES)
#pragma omp simd
        for (int l = 0; l < LANES; l++) acc[l] += a[i + l] * b[i + l];
    for (int l = 0; i + l < n; l++) acc[l] += a[i + l] * b[i + l];
    return tree_sum(acc);
}

static inline float inv_rms_of(const float *h, long n, float eps) {
    return 1.f / sqrtf(dot(h, h, n) / (float)n + eps);
}

static long blocks_of(long n) { return (n + BLOCK_ROWS - 1) / BLOCK_ROWS; }

/* dw[j] = sum over blocks, in block order, of partial[block][j]. */
static void reduce_blocks(const float *partial, long blocks, long dim, float *dw) {
    memset(dw, 0, (size_t)dim * sizeof(float));
    for (long b = 0; b < blocks; b++) {
        const float *p = partial + b * dim;
#pragma omp simd
        for (long j = 0; j < dim; j++) dw[j] += p[j];
    }
}

/* ------------------------------------------------------------------------------------------ plain norm */

int norms_rms_forward(const float *x, const float *w, float *out, float *inv_rms, long n, long dim, float eps,
                      int threads) {
    (void)threads; /* read by the OpenMP pragmas only: unused in a build without OpenMP */
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long row = 0; row < n; row++) {
        const float *xr = x + row * dim;
        float *o = out + row * dim;
        float r = inv_rms_of(xr, dim, eps);
        inv_rms[row] = r;
#pragma omp simd
        for (long j = 0; j < dim; j++) o[j] = xr[j] * r * w[j];
    }
    return 0;
}

/* One row's backward: dx, and gy u added into `dw_part`. */
static void rms_backward_row(const float *xr, const float *gr, const float *w, float r, long dim, float *dxr,
                             float *dw_part) {
    float acc[LANES] = {0};
    long j = 0;
    for (; j + LANES <= dim; j += LANES)
#pragma omp simd
        for (int l = 0; l < LANES; l++) {
            float u = xr[j + l] * r;
            dw_part[j + l] += gr[j + l] * u;
            acc[l] += gr[j + l] * w[j + l] * u;
        }
    for (int l = 0; j + l < dim; l++) {
        float u = xr[j + l] * r;
        dw_part[j + l] += gr[j + l] * u;
        acc[l] += gr[j + l] * w[j + l] * u;
    }
    float mean = tree_sum(acc) / (float)dim;
#pragma omp simd
    for (long k = 0; k < dim; k++) dxr[k] = (gr[k] * w[k] - xr[k] * r * mean) * r;
}

int norms_rms_backward(const float *x, const float *w, const float *inv_rms, const float *gy, float *dx, float *dw,
                       long n, long dim, int threads) {
    (void)threads; /* read by the OpenMP pragmas only: unused in a build without OpenMP */
    long blocks = blocks_of(n);
    float *partial = calloc((size_t)(blocks > 0 ? blocks : 1) * dim, sizeof(float));
    if (!partial) return 1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long b = 0; b < blocks; b++) {
        long end = (b + 1) * BLOCK_ROWS < n ? (b + 1) * BLOCK_ROWS : n;
        for (long row = b * BLOCK_ROWS; row < end; row++)
            rms_backward_row(x + row * dim, gy + row * dim, w, inv_rms[row], dim, dx + row * dim,
                             partial + b * dim);
    }
    reduce_blocks(partial, blocks, dim, dw);
    free(partial);
    return 0;
}

/* ------------------------------------------------------------------------------------------ gated norm */

int norms_gated_forward(const float *x, const float *z, const float *w, float *out, float *inv_rms, long n,
                        long groups, long size, float eps, int threads) {
    (void)threads; /* read by the OpenMP pragmas only: unused in a build without OpenMP */
    long dim = groups * size;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long row = 0; row < n; row++) {
        for (long g = 0; g < groups; g++) {
            long at = row * dim + g * size;
            const float *xr = x + at, *zr = z + at, *wg = w + g * size;
            float *h = out + at; /* h = x silu(z), normalised in place */
#pragma omp simd
            for (long j = 0; j < size; j++) h[j] = zr[j] * sigmoid(zr[j]) * xr[j];
            float r = inv_rms_of(h, size, eps);
            inv_rms[row * groups + g] = r;
#pragma omp simd
            for (long j = 0; j < size; j++) h[j] = h[j] * r * wg[j];
        }
    }
    return 0;
}

/* One group of one row: dx, dz, and gy u added into `dw_part`; `s` and `u` are scratch of `size` floats. */
static void gated_backward_group(const float *xr, const float *zr, const float *gr, const float *wg, float r,
                                 long size, float *dxr, float *dzr, float *dw_part, float *s, float *u) {
#pragma omp simd
    for (long j = 0; j < size; j++) {
        s[j] = sigmoid(zr[j]);
        u[j] = zr[j] * s[j] * xr[j] * r;
        dw_part[j] += gr[j] * u[j];
    }
    float acc[LANES] = {0};
    long j = 0;
    for (; j + LANES <= size; j += LANES)
#pragma omp simd
        for (int l = 0; l < LANES; l++) acc[l] += gr[j + l] * wg[j + l] * u[j + l];
    for (int l = 0; j + l < size; l++) acc[l] += gr[j + l] * wg[j + l] * u[j + l];
    float mean = tree_sum(acc) / (float)size;
#pragma omp simd
    for (long k = 0; k < size; k++) {
        float dh = (gr[k] * wg[k] - u[k] * mean) * r;
        dxr[k] = dh * zr[k] * s[k];
        dzr[k] = dh * xr[k] * s[k] * (1.f + zr[k] * (1.f - s[k]));
    }
}

int norms_gated_backward(const float *x, const float *z, const float *w, const float *inv_rms, const float *gy,
                         float *dx, float *dz, float *dw, long n, long groups, long size, int threads) {
    (void)threads; /* read by the OpenMP pragmas only: unused in a build without OpenMP */
    long dim = groups * size, blocks = blocks_of(n);
    float *partial = calloc((size_t)(blocks > 0 ? blocks : 1) * dim, sizeof(float));
    if (!partial) return 1;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *scratch = malloc(2 * (size_t)size * sizeof(float));
        failed = scratch == NULL;
#pragma omp for schedule(static)
        for (long b = 0; b < blocks; b++) {
            if (failed) continue;
            long end = (b + 1) * BLOCK_ROWS < n ? (b + 1) * BLOCK_ROWS : n;
            for (long row = b * BLOCK_ROWS; row < end; row++)
                for (long g = 0; g < groups; g++) {
                    long at = row * dim + g * size;
                    gated_backward_group(x + at, z + at, gy + at, w + g * size, inv_rms[row * groups + g], size,
                                         dx + at, dz + at, partial + b * dim + g * size, scratch,
                                         scratch + size);
                }
        }
        free(scratch);
    }
    if (!failed) reduce_blocks(partial, blocks, dim, dw);
    free(partial);
    return failed;
}
