/* Mamba-2's causal depthwise conv over time, with its optional SiLU, forward and backward, for float32
 * CPU buffers.
 *
 * Same math as bmojo_neuron/ops/reference/causal_conv.py (`causal_conv1d_rows`, whose eager-CPU form is
 * `elementwise_fused._ConvRows`), done in one pass over each row of channels instead of K + 2 torch ops per
 * slice of rows, with the history read from a separate `head` buffer instead of a concatenated copy of x.
 *
 * Layouts (contiguous, row-major; channels fastest, so every loop over channels is one vector loop):
 *   x, out, g (the gradient of out), dx   (batch, L, C): time-major rows
 *   head, d_head   (batch, K - 1, C): the K - 1 inputs before x[:, 0], oldest first (the conv state,
 *                  transposed; zeros at the start of a sequence)
 *   w, dw          (C, K): the conv weight, oldest tap first
 *   bias, dbias    (C), or NULL for a conv without bias
 *
 * Math, per batch row and channel c, with xin[s] = x[s] for s >= 0 and head[K - 1 + s] for s < 0:
 *   pre[t] = bias + sum_k w[k] xin[t - K + 1 + k]          out[t] = silu(pre[t]) or pre[t]
 *   d_pre[t] = g[t] silu'(pre[t]) = g[t] sig (1 + pre (1 - sig)),  sig = 1 / (1 + exp(-pre))  (or g[t])
 *   dxin[s] = sum_k w[k] d_pre[s + K - 1 - k]    over the k with 0 <= s + K - 1 - k < L
 *   dw[k] = sum_{b, t} d_pre[t] xin[t - K + 1 + k]         dbias = sum_{b, t} d_pre[t]
 * The backward recomputes pre from x (K multiply-adds per element) instead of reading a saved copy.
 *
 * Work is split into blocks of BLOCK_ROWS time rows of one batch row, run in parallel (OpenMP). A block
 * writes its own rows of out / dx (the backward recomputes the K - 1 rows of d_pre after its last row,
 * which its dx rows also read) and its own partial sums of dw and dbias; the partials are then added in
 * block order, so the gradients do not depend on the number of threads.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fast_exp.h"

#define BLOCK_ROWS 64

/* exp(x) (fast_exp.h) with |x| first clamped to 88 by an integer compare of its bits: GCC keeps a loop with a
 * float compare feeding arithmetic scalar unless -fno-trapping-math. exp(88) is finite; a NaN becomes 88,
 * and the SiLU still returns NaN through its other factor; x below about -87.7 gives 0. Within 1.3 ulp of
 * exp over [-87, 87]; for the SiLU only exp(-pre) near 1 and above matters. */
static inline float vexp(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    uint32_t mag = u & 0x7fffffffu;
    mag = mag > 0x42b00000u ? 0x42b00000u : mag; /* 0x42b00000 is 88.0f */
    u = (u & 0x80000000u) | mag;
    memcpy(&x, &u, sizeof x);
    return exp_in_range(x);
}

static inline float sigmoid(float x) { return 1.f / (1.f + vexp(-x)); }

#define INLINE static inline __attribute__((always_inline))

typedef struct {
    long L, C, K;
    const float *wt;    /* the weight transposed, (K, C): one contiguous row of channels per tap */
    const float *bias;  /* (C): the bias, or zeros for a conv without one */
    const float *zeros; /* (C) zeros: the d_pre of a row past the end */
} conv_t;

/* Row s of one batch row's input: x for s >= 0, the head (the history before x) for s < 0. */
static inline const float *input_row(const conv_t *cv, const float *xb, const float *hb, long s) {
    return s >= 0 ? xb + s * cv->C : hb + (cv->K - 1 + s) * cv->C;
}

/* The pre-activation of channel c from the K input rows of its output row: the newest tap first, then
 * the older ones oldest first, then the bias (the order in which `_ConvRows` adds them). */
INLINE float pre_at(const float *restrict wt, const float *const *rows, const float *restrict bias, long C,
                    long K, long c) {
    float acc = wt[(K - 1) * C + c] * rows[K - 1][c];
    for (long k = 0; k + 1 < K; k++) acc += wt[k * C + c] * rows[k][c];
    return acc + bias[c];
}

/* The pre-activations of one row into o for a K that is not a constant: one vector loop over the
 * channels per tap (a loop over the taps inside the channel loop has a trip count unknown to the
 * compiler and stays scalar), adding in `pre_at`'s order, so any K gives the bits K = 4 gives. */
INLINE void pre_row_by_taps(const conv_t *cv, const float *const *rows, long K, float *restrict o) {
    const float *restrict wt = cv->wt, *restrict bias = cv->bias, *newest = rows[K - 1];
    long C = cv->C;
#pragma omp simd
    for (long c = 0; c < C; c++) o[c] = wt[(K - 1) * C + c] * newest[c];
    for (long k = 0; k + 1 < K; k++) {
        const float *restrict wk = wt + k * C, *restrict rk = rows[k];
#pragma omp simd
        for (long c = 0; c < C; c++) o[c] += wk[c] * rk[c];
    }
#pragma omp simd
    for (long c = 0; c < C; c++) o[c] += bias[c];
}

/* One output row: out = silu(pre) or pre. Where K is the constant 4 (Mamba's) the taps unroll and each
 * channel is done in registers in one pass; any other K goes tap by tap (`pre_row_by_taps`). */
INLINE void forward_row(const conv_t *cv, const float *const *rows, long K, int silu, float *restrict o) {
    const float *restrict wt = cv->wt, *restrict bias = cv->bias;
    long C = cv->C;
    if (K != 4) {
        pre_row_by_taps(cv, rows, K, o);
        if (silu) {
#pragma omp simd
            for (long c = 0; c < C; c++) o[c] = o[c] * sigmoid(o[c]);
        }
        return;
    }
    if (silu) {
#pragma omp simd
        for (long c = 0; c < C; c++) {
            float a = pre_at(wt, rows, bias, C, K, c);
            o[c] = a * sigmoid(a);
        }
    } else {
#pragma omp simd
        for (long c = 0; c < C; c++) o[c] = pre_at(wt, rows, bias, C, K, c);
    }
}

/* d_pre of one row into d; with `part` (the block's (K + 1, C) partial sums) also adds the row's
 * terms of dw (d * input, per tap) and dbias (d). */
INLINE void d_pre_row(const conv_t *cv, const float *const *rows, long K, int silu, const float *restrict g,
                      float *restrict d, float *restrict part) {
    const float *restrict wt = cv->wt, *restrict bias = cv->bias;
    long C = cv->C;
    if (silu && K != 4) {  /* tap by tap (`pre_row_by_taps`) */
        pre_row_by_taps(cv, rows, K, d);
#pragma omp simd
        for (long c = 0; c < C; c++) {
            float a = d[c], s = sigmoid(a);
            d[c] = g[c] * (s * (1.f + a * (1.f - s)));
        }
    } else if (silu) {
#pragma omp simd
        for (long c = 0; c < C; c++) {
            float a = pre_at(wt, rows, bias, C, K, c), s = sigmoid(a);
            d[c] = g[c] * (s * (1.f + a * (1.f - s)));
        }
    } else {
        memcpy(d, g, sizeof(float) * (size_t)C);
    }
    if (!part) return;
    if (K != 4) {  /* one vector loop per tap, as above */
        for (long k = 0; k < K; k++) {
            float *restrict pk = part + k * C;
            const float *restrict rk = rows[k];
#pragma omp simd
            for (long c = 0; c < C; c++) pk[c] += d[c] * rk[c];
        }
#pragma omp simd
        for (long c = 0; c < C; c++) part[K * C + c] += d[c];
        return;
    }
#pragma omp simd
    for (long c = 0; c < C; c++) {
        float dc = d[c];
        for (long k = 0; k < K; k++) part[k * C + c] += dc * rows[k][c];
        part[K * C + c] += dc;
    }
}

/* dxin of one row from the K rows of d_pre that read it (drows[k]: the row of output s + K - 1 - k,
 * zeros past the end). */
INLINE void dx_row(const conv_t *cv, const float *const *drows, long K, float *restrict o) {
    const float *restrict wt = cv->wt;
    long C = cv->C;
    if (K != 4) {  /* one vector loop per tap, adding in the order below */
#pragma omp simd
        for (long c = 0; c < C; c++) o[c] = 0.f;
        for (long k = 0; k < K; k++) {
            const float *restrict wk = wt + k * C, *restrict dk = drows[k];
#pragma omp simd
            for (long c = 0; c < C; c++) o[c] += wk[c] * dk[c];
        }
        return;
    }
#pragma omp simd
    for (long c = 0; c < C; c++) {
        float acc = 0.f;
        for (long k = 0; k < K; k++) acc += wt[k * C + c] * drows[k][c];
        o[c] = acc;
    }
}

/* Rows [t0, t1) of batch row b of the forward. */
INLINE void forward_block(const conv_t *cv, long K, long b, long t0, long t1, const float *x, const float *head,
                          int silu, float *out) {
    long L = cv->L, C = cv->C;
    const float *xb = x + b * L * C, *hb = head + b * (K - 1) * C;
    const float *rows[K];
    for (long t = t0; t < t1; t++) {
        for (long k = 0; k < K; k++) rows[k] = input_row(cv, xb, hb, t - K + 1 + k);
        forward_row(cv, rows, K, silu, out + (b * L + t) * C);
    }
}

/* One block's backward: rows [t0, t1) of batch row b. `dp` holds (t1 - t0 + K - 1) rows of d_pre; `part`
 * is the block's (K + 1, C) partial sums: dw transposed, then dbias. In the first block of a batch row
 * (with d_head) the head's K - 1 rows of dxin are written too. */
INLINE void backward_block(const conv_t *cv, long K, long b, long t0, long t1, const float *x, const float *head,
                           const float *g, int silu, float *dx, float *d_head, float *dp, float *part) {
    long L = cv->L, C = cv->C;
    const float *xb = x + b * L * C, *hb = head + b * (K - 1) * C;
    long end = t1 + K - 1 < L ? t1 + K - 1 : L; /* d_pre rows this block's dx reads */
    const float *rows[K];
    memset(part, 0, sizeof(float) * (size_t)((K + 1) * C));
    for (long t = t0; t < end; t++) {
        for (long k = 0; k < K; k++) rows[k] = input_row(cv, xb, hb, t - K + 1 + k);
        /* a row past t1 belongs to the next block: its sums are that block's */
        d_pre_row(cv, rows, K, silu, g + (b * L + t) * C, dp + (t - t0) * C, t < t1 ? part : NULL);
    }
    for (long s = (t0 == 0 && d_head) ? -(K - 1) : t0; s < t1; s++) {
        for (long k = 0; k < K; k++) {
            long t = s + K - 1 - k;
            rows[k] = t >= 0 && t < L ? dp + (t - t0) * C : cv->zeros;
        }
        dx_row(cv, rows, K, s >= 0 ? dx + (b * L + s) * C : d_head + (b * (K - 1) + K - 1 + s) * C);
    }
}

/* The weight transposed (K, C), then the bias (C, zeros if none), then a row of zeros (C). */
static float *constants(const float *w, const float *bias, long C, long K) {
    float *buf = calloc((size_t)((K + 2) * C + 1), sizeof(float));
    if (buf) {
        for (long c = 0; c < C; c++)
            for (long k = 0; k < K; k++) buf[k * C + c] = w[c * K + k];
        if (bias) memcpy(buf + K * C, bias, sizeof(float) * (size_t)C);
    }
    return buf;
}

int causal_conv_forward(const float *x, const float *head, const float *w, const float *bias, float *out,
                        long batch, long L, long C, long K, int silu, int threads) {
    (void)threads; /* read by the OpenMP pragmas only: unused in a build without OpenMP */
    if (K < 1 || L < 0 || C < 0 || batch < 0) return -2;
    float *consts = constants(w, bias, C, K);
    if (!consts) return -1;
    conv_t cv = {L, C, K, consts, consts + K * C, consts + (K + 1) * C};
    long blocks = (L + BLOCK_ROWS - 1) / BLOCK_ROWS;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long i = 0; i < batch * blocks; i++) {
        long b = i / blocks, t0 = (i % blocks) * BLOCK_ROWS, t1 = t0 + BLOCK_ROWS < L ? t0 + BLOCK_ROWS : L;
        if (K == 4) /* Mamba's kernel size, with the taps unrolled */
            forward_block(&cv, 4, b, t0, t1, x, head, silu, out);
        else
            forward_block(&cv, K, b, t0, t1, x, head, silu, out);
    }
    free(consts);
    return 0;
}

int causal_conv_backward(const float *x, const float *head, const float *w, const float *bias, const float *g,
                         float *dx, float *d_head, float *dw, float *dbias, long batch, long L, long C, long K,
                         int silu, int threads) {
    (void)threads; /* read by the OpenMP pragmas only: unused in a build without OpenMP */
    if (K < 1 || L < 0 || C < 0 || batch < 0) return -2;
    long blocks = (L + BLOCK_ROWS - 1) / BLOCK_ROWS, n_parts = batch * blocks;
    float *consts = constants(w, bias, C, K);
    float *parts = malloc(sizeof(float) * (size_t)((n_parts > 0 ? n_parts : 1) * (K + 1) * C));
    if (!consts || !parts) {
        free(consts);
        free(parts);
        return -1;
    }
    conv_t cv = {L, C, K, consts, consts + K * C, consts + (K + 1) * C};
    if (d_head && L == 0) memset(d_head, 0, sizeof(float) * (size_t)(batch * (K - 1) * C));
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *dp = malloc(sizeof(float) * (size_t)((BLOCK_ROWS + K - 1) * C + 1));
        if (!dp) {
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (long i = 0; i < n_parts; i++) {
                long b = i / blocks, t0 = (i % blocks) * BLOCK_ROWS;
                long t1 = t0 + BLOCK_ROWS < L ? t0 + BLOCK_ROWS : L;
                float *part = parts + i * (K + 1) * C;
                if (K == 4)
                    backward_block(&cv, 4, b, t0, t1, x, head, g, silu, dx, d_head, dp, part);
                else
                    backward_block(&cv, K, b, t0, t1, x, head, g, silu, dx, d_head, dp, part);
            }
            free(dp);
        }
    }
    if (!failed) { /* the blocks' partial sums, added in block order: the same result for any thread count */
        memset(dw, 0, sizeof(float) * (size_t)(C * K));
        if (dbias) memset(dbias, 0, sizeof(float) * (size_t)C);
        for (long i = 0; i < n_parts; i++) {
            const float *part = parts + i * (K + 1) * C;
            for (long c = 0; c < C; c++)
                for (long k = 0; k < K; k++) dw[c * K + k] += part[k * C + c];
            if (dbias)
                for (long c = 0; c < C; c++) dbias[c] += part[K * C + c];
        }
    }
    free(consts);
    free(parts);
    return failed ? -1 : 0;
}
