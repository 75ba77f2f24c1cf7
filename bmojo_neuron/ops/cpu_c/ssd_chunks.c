/* The SSD scan (`ssd_scan` without its casts), forward and backward, for float32 CPU buffers.
 *
 * Same math as bmojo_neuron/ops/reference/ssd.py and ssd_fused.py (`SSDChunks`), plus what
 * `ssd_scan` does around that core: dt = softplus(dt + dt_bias), y += D x, and a last chunk
 * shorter than the others instead of padding. Per (batch, B/C group) one OpenMP task runs
 * the chunks in order (the state is carried); the groups are independent.
 *
 * Per chunk of T tokens (cs = in-chunk cumulative sum of dt A, e = decay(cs),
 * to_end_j = decay(cs_end - cs_j), w_ij = (C_i . B_j) decay(cs_i - cs_j) for j <= i, S the
 * state (N x P) entering the chunk):
 *   y_i   = e_i C_i S + sum_{j <= i} w_ij dt_j x_j + D x_i
 *   S_out = e_end S + sum_j to_end_j B_j^T (dt_j x_j)
 * The forward forms y as ONE product per head, [e C | w] (T x (N + T)) times [S ; dt x]
 * ((N + T) x P), the state and the chunk's inputs stacked in one buffer; the backward runs
 * the transposed products (the state, its gradient and dt x read through transposed copies,
 * `transpose`) and stacks the operands that two products share (scratch_t) so that those run
 * as one.
 * Decays exp(t) are taken at t >= floor (2 log eps of float32), as `ssd_fused._exp` does,
 * so that no product reads a subnormal float.
 *
 * Layouts (row-major):
 *   x, y, gy, dx (batch, L, H, P), contiguous; dt, dt_raw (batch, L, H), contiguous; A, D, dt_bias (H)
 *   B, C (batch, L, G, N): element (b, t, g, n) at (b L + t) bc_row + g bc_group + n (the model's B and C
 *   are strided views of one projection); dB, dC contiguous (batch, L, G, N)
 *   h0, h_final, d_h0 (batch, H, P, N); starts (batch, ceil(L / T), H, N, P): the state entering each
 *   chunk, saved by the forward for the backward in the (N, P) layout the forward keeps it in
 *   d_a, d_d, d_bias (batch, H): per batch row, summed by the caller (no two tasks write one float)
 * Head h reads group h / (H / G).
 */
/* Float compares may be if-converted (GCC's default -ftrapping-math keeps every `x < lo ? lo : x` a
 * branch, and a loop with a branch is not vectorised). The kernels never read the floating-point
 * exception flags, and no result changes. */
#if defined(__GNUC__) && !defined(__clang__) /* clang defines __GNUC__ too, and warns on GCC's optimize pragma; */
#pragma GCC optimize("no-trapping-math")     /* its default already lets compares be if-converted */
#endif

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "fast_exp.h"

/* exp(x) (fast_exp.h) with the edges of libm's expf: below -87 gives 0 (no subnormals), above 88.7 inf. */
static inline float fast_exp(float x) {
    float v = exp_clamped(x);
    v = x < -87.0f ? 0.f : v;
    return x > 88.7f ? INFINITY : v;
}

static inline float decay(float t, float floor) { return fast_exp(t < floor ? floor : t); }

/* ---- The small products: register tiles of up to 6 rows x 16 columns. ----
 * 12 accumulators of 8 floats, two vectors of a row of b and one broadcast of a: 15 of the 16
 * AVX2 registers, two fused multiply-adds per broadcast. Written with GCC's vector extension
 * (no intrinsics), so other targets get their own vectors of 8 floats. No function takes or returns a
 * vector: the helpers below write or read one at an address. Without AVX (build.py's portable build)
 * a 32-byte vector passed or returned by value has a calling convention that changed in GCC 4.6, and
 * GCC says so (-Wpsabi) even for a static inline function. splat8 is a helper rather than an
 * initializer written in the tile's loop, which GCC's portable build builds an element at a time (the
 * scan then runs seven times slower there). */
typedef float v8 __attribute__((vector_size(32)));

static inline void load8(v8 *v, const float *p) { memcpy(v, p, sizeof *v); }
static inline void store8(float *p, const v8 *v) { memcpy(p, v, sizeof *v); }
static inline void splat8(v8 *v, float x) { *v = (v8){x, x, x, x, x, x, x, x}; }

enum { KEEP = 0, ZERO = 1 };      /* out += a b, or out = a b */
enum { FULL, LOWER, UPPER };      /* which part of a is not zero: see rows_block */

/* Rows [0, R) x columns [0, 16) of out (+)= a[:, k0:k1] b[k0:k1, :]; R is a constant at each call. */
static inline __attribute__((always_inline)) void tile16(int R, long k0, long k1, const float *a, long ars, long acs,
                                                         const float *b, long ldb, float *out, long ldc, int zero) {
    v8 c0[6], c1[6], b0, b1;
    for (int r = 0; r < R; r++) {
        splat8(&c0[r], 0.f);
        c1[r] = c0[r];
    }
    const float *ak = a + k0 * acs, *bk = b + k0 * ldb;
    for (long k = k0; k < k1; k++, ak += acs, bk += ldb) {
        load8(&b0, bk);
        load8(&b1, bk + 8);
        for (int r = 0; r < R; r++) {
            v8 av;
            splat8(&av, ak[r * ars]);
            c0[r] += av * b0;
            c1[r] += av * b1;
        }
    }
    for (int r = 0; r < R; r++) {
        float *o = out + r * ldc;
        /* out is read for ZERO too, where the select drops it: a branch instead costs GCC's portable build 25 % */
        v8 o0, o1;
        load8(&o0, o);
        load8(&o1, o + 8);
        o0 = zero ? c0[r] : o0 + c0[r];
        o1 = zero ? c1[r] : o1 + c1[r];
        store8(o, &o0);
        store8(o + 8, &o1);
    }
}

/* The same for the last nc < 16 columns (odd sizes only). */
static void tile_tail(int R, long nc, long k0, long k1, const float *a, long ars, long acs, const float *b, long ldb,
                      float *out, long ldc, int zero) {
    for (int r = 0; r < R; r++)
        for (long j = 0; j < nc; j++) {
            float s = 0.f;
            for (long k = k0; k < k1; k++) s += a[r * ars + k * acs] * b[k * ldb + j];
            out[r * ldc + j] = zero ? s : out[r * ldc + j] + s;
        }
}

/* Rows [i0, i0 + R) of the product, columns [0, min(n, ncols)). The k it reads: all of [0, kk) for a
 * FULL a; for a LOWER one (a[i][k] = 0 for k > i + shift) [0, i0 + R + shift), for an UPPER one
 * (a[i][k] = 0 for k < i + shift) [i0 + shift, kk). */
static inline __attribute__((always_inline)) void rows_block(int R, long i0, long n, long kk, const float *a,
                                                             long ars, long acs, const float *b, long ldb, float *out,
                                                             long ldc, int shape, long shift, long ncols, int zero) {
    long k0 = 0, k1 = kk;
    if (shape == LOWER && i0 + R + shift < kk) k1 = i0 + R + shift;
    if (shape == UPPER && i0 + shift > 0) k0 = i0 + shift;
    const float *ai = a + i0 * ars;
    float *oi = out + i0 * ldc;
    long j0 = 0, nend = ncols < n ? ncols : n;
    for (; j0 + 16 <= nend; j0 += 16) tile16(R, k0, k1, ai, ars, acs, b + j0, ldb, oi + j0, ldc, zero);
    if (j0 < nend) tile_tail(R, nend - j0, k0, k1, ai, ars, acs, b + j0, ldb, oi + j0, ldc, zero);
}

enum { ALL_COLUMNS = -1 };

/* out (m x n, row stride ldc) (+)= a (m x kk, a[i][k] at a[i ars + k acs]) times b (kk x n, row stride
 * ldb). `shape` and `shift` say which part of a may be non-zero (rows_block). `lower_from` >= 0 forms
 * only the columns j < lower_from + i + 1 of row i (rounded up to whole tiles past lower_from), for an
 * output whose columns from lower_from on hold a lower triangle and whose upper one is never read;
 * ALL_COLUMNS forms every column. */
static void gemm(long m, long n, long kk, const float *a, long ars, long acs, const float *b, long ldb, float *out,
                 long ldc, int shape, long shift, long lower_from, int zero) {
    int lower = lower_from >= 0;
    long i0 = 0;
    for (; i0 + 6 <= m; i0 += 6)
        rows_block(6, i0, n, kk, a, ars, acs, b, ldb, out, ldc, shape, shift,
                   lower ? lower_from + (i0 + 21) / 16 * 16 : n, zero);
    long cols = lower ? lower_from + (m + 15) / 16 * 16 : n;
    if (m - i0 >= 4) {
        rows_block(4, i0, n, kk, a, ars, acs, b, ldb, out, ldc, shape, shift, cols, zero);
        i0 += 4;
    }
    if (m - i0 >= 2) {
        rows_block(2, i0, n, kk, a, ars, acs, b, ldb, out, ldc, shape, shift, cols, zero);
        i0 += 2;
    }
    if (m - i0 >= 1) rows_block(1, i0, n, kk, a, ars, acs, b, ldb, out, ldc, shape, shift, cols, zero);
}

/* ---- Transposes: the tiles read b a row at a time, so B (the scores), and in the backward the saved
 * state and its gradient, are read through transposed copies. ----
 * An element at a time, a transpose stores one float at a time into a column of strided rows; 8 x 8
 * blocks transposed in registers (three rounds of shuffles, the AVX unpack / shuffle / lane-swap
 * pattern) load and store whole rows instead. Only values move: every result has the same bits either
 * way. Compilers without `__builtin_shufflevector` (GCC < 12) keep the element loop. */
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define HAVE_SHUFFLEVECTOR 1
#endif
#endif

/* dst (cols x rows, row stride ld_dst) = transpose of src (rows x cols, row stride ld_src), elements
 * [r0, rows) x [c0, cols) only: the part the 8 x 8 blocks leave. */
static void transpose_rest(long r0, long c0, long rows, long cols, const float *src, long ld_src, float *dst,
                           long ld_dst) {
    for (long r = 0; r < rows; r++)
        for (long c = r < r0 ? c0 : 0; c < cols; c++) dst[c * ld_dst + r] = src[r * ld_src + c];
}

#ifdef HAVE_SHUFFLEVECTOR
#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)

/* One 8 x 8 block: rows a..h of src become columns of dst. */
static inline void transpose8(const float *src, long ld_src, float *dst, long ld_dst) {
    v8 r[8], t[8], u[8];
    for (int i = 0; i < 8; i++) load8(&r[i], src + i * ld_src);
    for (int i = 0; i < 8; i += 2) { /* pairs of rows interleaved: (a0 b0 a1 b1 | a4 b4 a5 b5), ... */
        t[i] = SHUF(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        t[i + 1] = SHUF(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int i = 0; i < 8; i += 4) { /* quads: (a0 b0 c0 d0 | a4 b4 c4 d4), ... */
        u[i] = SHUF(t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
        u[i + 1] = SHUF(t[i], t[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        u[i + 2] = SHUF(t[i + 1], t[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
        u[i + 3] = SHUF(t[i + 1], t[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
    }
    for (int i = 0; i < 4; i++) { /* the two halves of rows a-d and e-h joined: columns i and i + 4 */
        v8 col = SHUF(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        v8 col4 = SHUF(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
        store8(dst + i * ld_dst, &col);
        store8(dst + (i + 4) * ld_dst, &col4);
    }
}
#endif

/* dst (cols x rows, row stride ld_dst) = transpose of src (rows x cols, row stride ld_src). */
static void transpose(long rows, long cols, const float *src, long ld_src, float *dst, long ld_dst) {
    long r0 = 0, c0 = 0;
#ifdef HAVE_SHUFFLEVECTOR
    r0 = rows / 8 * 8, c0 = cols / 8 * 8;
    for (long r = 0; r < r0; r += 8)
        for (long c = 0; c < c0; c += 8) transpose8(src + r * ld_src + c, ld_src, dst + c * ld_dst + r, ld_dst);
#endif
    transpose_rest(r0, c0, rows, cols, src, ld_src, dst, ld_dst);
}

/* ---- Shapes, inputs and the per-task scratch. ---- */

typedef struct {
    long batch, L, H, P, G, N, T, bc_row, bc_group;
    float floor;
    int dt_softplus;
} dims_t;

typedef struct {
    const float *x, *dt_raw, *dt_bias, *A, *B, *C, *D;
} inputs_t;

/* softplus(v) = max(v, 0) + log1p(exp(-|v|)), log1p(u) for u in (0, 1] as 2 atanh(u / (2 + u)) by its
 * series (s <= 1/3: eight terms leave under 1e-8 relative), so that a loop over it vectorises; within
 * an ulp or two of torch's float32 softplus (beta 1, threshold 20: above 20 both give v). */
static inline float softplus(float v) {
    float u = fast_exp(v < 0.f ? v : -v), s = u / (2.f + u), s2 = s * s;
    float p = 1.f / 15.f;
    p = p * s2 + 1.f / 13.f;
    p = p * s2 + 1.f / 11.f;
    p = p * s2 + 1.f / 9.f;
    p = p * s2 + 1.f / 7.f;
    p = p * s2 + 1.f / 5.f;
    p = p * s2 + 1.f / 3.f;
    p = p * s2 + 1.f;
    return (v > 0.f ? v : 0.f) + 2.f * s * p;
}

/* softplus's derivative, sigmoid(v) (the argument kept where exp stays normal). */
static inline float sigmoid(float v) {
    float vc = v < -80.f ? -80.f : (v > 80.f ? 80.f : v);
    return 1.f / (1.f + fast_exp(-vc));
}

/* dt of one chunk of tc tokens (rows row0 ...) for the group's heads [h0, h0 + hpg): dt_raw + dt_bias,
 * through softplus where asked, into dt_out (rows of H, as dt_raw). */
static void discretise(const dims_t *d, const inputs_t *in, long row0, long tc, long h0, float *dt_out) {
    long H = d->H, hpg = H / d->G;
    for (long t = 0; t < tc; t++) {
        const float *raw = in->dt_raw + (row0 + t) * H + h0;
        float *out = dt_out + (row0 + t) * H + h0;
#pragma omp simd
        for (long k = 0; k < hpg; k++) {
            float v = raw[k] + (in->dt_bias ? in->dt_bias[h0 + k] : 0.f);
            out[k] = d->dt_softplus ? softplus(v) : v;
        }
    }
}

/* softplus's derivative at the same dt_raw + dt_bias, into slope (tc x hpg). */
static void softplus_slopes(const dims_t *d, const inputs_t *in, long row0, long tc, long h0, float *slope) {
    long H = d->H, hpg = H / d->G;
    for (long t = 0; t < tc; t++) {
        const float *raw = in->dt_raw + (row0 + t) * H + h0;
#pragma omp simd
        for (long k = 0; k < hpg; k++) slope[t * hpg + k] = sigmoid(raw[k] + (in->dt_bias ? in->dt_bias[h0 + k] : 0.f));
    }
}

/* The backward stacks operands as the forward does, so that products sharing one operand run as one:
 * [q | dw] = gy [S^T | (dt x)^T] reads each row of gy once, and [dS ; d(dt x)] += [e C | w]^T gy each
 * column of gy once (the transposed product of the forward's). */
typedef struct {
    float *sx;           /* per head ((N + T) x P): forward the state over the chunk's dt x; backward dS over
                            d(dt x) */
    float *ay;           /* (T x (N + T)): rows [e_i C_i | w_i] */
    float *qdw;          /* backward (T x (N + T)): rows [q_i | dw_i], q = gy S^T, dw = gy (dt x)^T */
    float *sxt;          /* backward (P x (N + T)): rows [S^T_p | (dt x)^T_p] */
    float *dm;           /* backward: decay(cs_i - cs_j) (T x T) */
    float *cb, *dcb;     /* (T x T) */
    float *bt;           /* (N x T): B^T of the chunk */
    float *xs;           /* (T x P): to_end_j dt_j x_j */
    float *dst;          /* (P x N): dS^T */
    float *dt, *cs, *e, *to_end, *dcs; /* (T) */
    float *slope;        /* (T x heads per group): softplus's derivative at the chunk's dt */
    float *block;
} scratch_t;

static int scratch_new(scratch_t *s, const dims_t *d) {
    long hpg = d->H / d->G, T = d->T, N = d->N, P = d->P, TT = T * T, NT = N + T;
    long sizes[] = {hpg * NT * P, T * NT, T * NT, P * NT, TT, TT, TT, N * T, T * P, P * N, T, T, T, T, T, T * hpg};
    float **slots[] = {&s->sx, &s->ay, &s->qdw, &s->sxt, &s->dm, &s->cb, &s->dcb, &s->bt, &s->xs, &s->dst, &s->dt,
                       &s->cs, &s->e, &s->to_end, &s->dcs, &s->slope};
    long total = 0;
    for (unsigned i = 0; i < sizeof sizes / sizeof *sizes; i++) total += sizes[i];
    float *p = calloc((size_t)total, sizeof(float)); /* zero: the parts above the diagonals are never written */
    if (!p) return -1;
    s->block = p;
    for (unsigned i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        *slots[i] = p;
        p += sizes[i];
    }
    return 0;
}

/* One head's dt (from the discretised `dt`), cs, e and to_end over a chunk of tc tokens starting at
 * row `row0`. */
static void chunk_decays(const dims_t *d, const inputs_t *in, const float *dt, long row0, long h, long tc,
                         scratch_t *s) {
    float a = in->A[h], run = 0.f;
    for (long t = 0; t < tc; t++) {
        float dtt = dt[(row0 + t) * d->H + h];
        s->dt[t] = dtt;
        run += dtt * a;
        s->cs[t] = run;
    }
    float floor = d->floor, cs_end = s->cs[tc - 1];
#pragma omp simd
    for (long t = 0; t < tc; t++) {
        s->e[t] = decay(s->cs[t], floor);
        s->to_end[t] = decay(cs_end - s->cs[t], floor);
    }
}

/* The chunk's B^T (N x tc) and lower triangle of the scores C B^T (tc x tc). */
static void chunk_scores(const dims_t *d, const float *Bc, const float *Cc, long tc, scratch_t *s) {
    long T = d->T, N = d->N;
    transpose(tc, N, Bc, d->bc_row, s->bt, T);
    gemm(tc, tc, N, Cc, d->bc_row, 1, s->bt, T, s->cb, T, FULL, 0, 0, ZERO);
}

/* ---- Prefetch. A head's rows of x (and, backward, gy) in a chunk are tc pieces of P floats at a
 * stride of H P: each piece's first touch would wait on memory, one head after the other. So each
 * head's loop first asks for the next head's pieces (the next chunk's first head after the last),
 * which then arrive while the current head runs. Into L2 and not L1 (prefetcht1): a head's working set
 * already fills L1, and pulling the next head's rows into it (or non-temporal) gained nothing. ---- */

/* Ask for head h's rows [row0, row0 + tc) of a (batch L, H, P) tensor. */
static inline void prefetch_head_rows(const dims_t *d, const float *t, long row0, long tc, long h) {
    long HP = d->H * d->P;
    for (long r = 0; r < tc; r++)
        for (long p = 0; p < d->P; p += 16) __builtin_prefetch(t + (row0 + r) * HP + h * d->P + p, 0, 2);
}

/* ---- Forward. ---- */

static void forward_head(const dims_t *d, const inputs_t *in, long b, long h, long c, long tc, const float *Cc,
                         const float *Bc, float *y, float *starts, float *dt_out, float *sx, scratch_t *s) {
    long L = d->L, H = d->H, P = d->P, N = d->N, T = d->T, HP = H * P, NT = N + T;
    long n_chunks = (L + T - 1) / T, row0 = b * L + c * T;
    chunk_decays(d, in, dt_out, row0, h, tc, s);
    float dd = in->D ? in->D[h] : 0.f;
    float *xdt = sx + N * P;
    for (long t = 0; t < tc; t++) {  /* dt x into the stack under the state, to_end dt x, y = D x */
        const float *xr = in->x + (row0 + t) * HP + h * P;
        float *o = xdt + t * P, *os = s->xs + t * P, *yr = y + (row0 + t) * HP + h * P;
        float dtt = s->dt[t], te = s->to_end[t];
#pragma omp simd
        for (long p = 0; p < P; p++) {
            o[p] = dtt * xr[p];
            os[p] = te * o[p];
            yr[p] = dd * xr[p];
        }
    }
    float floor = d->floor;
    for (long i = 0; i < tc; i++) {  /* rows [e_i C_i | w_i] */
        float *row = s->ay + i * NT, *wr = row + N, ei = s->e[i], csi = s->cs[i];
        const float *ci = Cc + i * d->bc_row, *cb = s->cb + i * T;
#pragma omp simd
        for (long n = 0; n < N; n++) row[n] = ei * ci[n];
#pragma omp simd
        for (long j = 0; j <= i; j++) wr[j] = cb[j] * decay(csi - s->cs[j], floor);
    }
    memcpy(starts + ((b * n_chunks + c) * H + h) * N * P, sx, sizeof(float) * N * P);
    gemm(tc, P, N + tc, s->ay, NT, 1, sx, P, y + row0 * HP + h * P, HP, LOWER, N, ALL_COLUMNS, KEEP);
    float e_end = s->e[tc - 1];  /* S = e_end S + B^T (to_end dt x) */
    for (long i = 0; i < N * P; i++) sx[i] *= e_end;
    gemm(N, P, tc, Bc, 1, d->bc_row, s->xs, P, sx, P, FULL, 0, ALL_COLUMNS, KEEP);
}

static void forward_group(const dims_t *d, const inputs_t *in, long b, long g, const float *h0, float *y,
                          float *h_final, float *starts, float *dt_out, scratch_t *s) {
    long L = d->L, H = d->H, P = d->P, N = d->N, T = d->T, hpg = H / d->G, NTP = (N + T) * P;
    for (long k = 0; k < hpg; k++) {  /* the states as (N, P), on top of each head's stack */
        float *st = s->sx + k * NTP;
        if (h0)
            transpose(P, N, h0 + (b * H + g * hpg + k) * P * N, N, st, P);
        else
            memset(st, 0, sizeof(float) * N * P);
    }
    for (long c = 0, t0 = 0; t0 < L; c++, t0 += T) {
        long tc = L - t0 < T ? L - t0 : T;
        const float *Bc = in->B + (b * L + t0) * d->bc_row + g * d->bc_group;
        const float *Cc = in->C + (b * L + t0) * d->bc_row + g * d->bc_group;
        chunk_scores(d, Bc, Cc, tc, s);
        discretise(d, in, b * L + t0, tc, g * hpg, dt_out);
        for (long k = 0; k < hpg; k++) {
            if (k + 1 < hpg)
                prefetch_head_rows(d, in->x, b * L + t0, tc, g * hpg + k + 1);
            else if (t0 + T < L)  /* the next chunk's first head */
                prefetch_head_rows(d, in->x, b * L + t0 + T, L - t0 - T < T ? L - t0 - T : T, g * hpg);
            forward_head(d, in, b, g * hpg + k, c, tc, Cc, Bc, y, starts, dt_out, s->sx + k * NTP, s);
        }
    }
    for (long k = 0; k < hpg; k++) /* back to the caller's (P, N) */
        transpose(N, P, s->sx + k * NTP, P, h_final + (b * H + g * hpg + k) * P * N, N);
}

int ssd_chunks_forward(const float *x, const float *dt_raw, const float *dt_bias, const float *A, const float *B,
                       const float *C, const float *D, const float *h0, float *y, float *h_final, float *starts,
                       float *dt_out, long batch, long L, long H, long P, long G, long N, long T, long bc_row,
                       long bc_group, int softplus_dt, float floor, int threads) {
    (void)threads; /* read by the OpenMP pragmas only: unused in a build without OpenMP */
    dims_t d = {batch, L, H, P, G, N, T, bc_row, bc_group, floor, softplus_dt};
    inputs_t in = {x, dt_raw, dt_bias, A, B, C, D};
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        scratch_t s;
        if (scratch_new(&s, &d)) {
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (long bg = 0; bg < batch * G; bg++)
                forward_group(&d, &in, bg / G, bg % G, h0, y, h_final, starts, dt_out, &s);
            free(s.block);
        }
    }
    return failed ? -1 : 0;
}

/* ---- Backward. ---- */

typedef struct {
    const float *dt, *starts, *gy;
    float *dx, *d_dt, *d_a, *d_d, *d_bias, *dB, *dC;
} grads_t;

/* Gradients of one head in one chunk. Accumulates the group's score gradient (dcb) and the chunk's
 * rows of dB and dC, writes the head's dx and dt rows, and turns dS (the gradient of the state
 * leaving the chunk, the top N x P of the head's stack `ds`) into that of the state entering it. */
static void backward_head(const dims_t *d, const inputs_t *in, const grads_t *gr, long b, long h, long c, long tc,
                          const float *Bc, const float *Cc, float *dBc, float *dCc, float *ds, scratch_t *s) {
    long L = d->L, H = d->H, P = d->P, N = d->N, T = d->T, HP = H * P, GN = d->G * N, NT = N + T;
    long n_chunks = (L + T - 1) / T, row0 = b * L + c * T;
    const float *gyc = gr->gy + row0 * HP + h * P, *xc = in->x + row0 * HP + h * P;
    const float *start = gr->starts + ((b * n_chunks + c) * H + h) * N * P; /* (N, P) */
    float a = in->A[h], floor = d->floor, *dcs = s->dcs, *dm = s->dm, *dS = ds, *dxdt = ds + N * P;
    chunk_decays(d, in, gr->dt, row0, h, tc, s);
    transpose(N, P, start, P, s->sxt, NT);  /* S^T beside (dt x)^T */
    for (long t = 0; t < tc; t++) {  /* to_end dt x, (dt x)^T */
        const float *xr = xc + t * HP;
        float dtt = s->dt[t], te = s->to_end[t], *os = s->xs + t * P, *xt = s->sxt + N + t;
        for (long p = 0; p < P; p++) {
            float v = dtt * xr[p];
            os[p] = te * v;
            xt[p * NT] = v;
        }
        dcs[t] = 0.f;
    }
    for (long i = 0; i < tc; i++) {  /* rows [e_i C_i | w_i], w and decay(cs_i - cs_j) on and below the diagonal */
        float csi = s->cs[i], ei = s->e[i], *eci = s->ay + i * NT, *wr = eci + N, *dmr = dm + i * T;
        const float *cb = s->cb + i * T, *ci = Cc + i * d->bc_row;
#pragma omp simd
        for (long n = 0; n < N; n++) eci[n] = ei * ci[n];
#pragma omp simd
        for (long j = 0; j <= i; j++) {
            dmr[j] = decay(csi - s->cs[j], floor);
            wr[j] = cb[j] * dmr[j];
        }
    }
    float e_end = s->e[tc - 1];

    /* The state leaving the chunk, e_end S + B^T (to_end dt x). */
    transpose(N, P, dS, P, s->dst, N);
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (long i = 0; i < N * P; i++) dot += dS[i] * start[i];
    dcs[tc - 1] += e_end * dot;
    gemm(tc, P, N, Bc, d->bc_row, 1, dS, P, dxdt, P, FULL, 0, ALL_COLUMNS, ZERO);  /* u = B dS */
    float to_end_sum = 0.f;
    for (long j = 0; j < tc; j++) {  /* d to_end_j to_end_j = (to_end dt x)_j . u_j; d(dt x)_j = to_end_j u_j */
        float *u = dxdt + j * P, t = 0.f, te = s->to_end[j];
        const float *xs = s->xs + j * P;
#pragma omp simd reduction(+ : t)
        for (long p = 0; p < P; p++) {
            t += xs[p] * u[p];
            u[p] *= te;
        }
        if (j < tc - 1) {  /* - to cs_j, + to cs_end: the last token's two cancel exactly */
            dcs[j] -= t;
            to_end_sum += t;
        }
    }
    dcs[tc - 1] += to_end_sum;
    gemm(tc, N, P, s->xs, P, 1, s->dst, N, dBc, GN, FULL, 0, ALL_COLUMNS, KEEP);  /* dB += (to_end dt x) dS^T */

    /* One product for the read-out of the entering state (q) and the in-chunk outputs (dw):
     * [q | dw] = gy [S^T | (dt x)^T], dw's lower part only. */
    gemm(tc, N + tc, P, gyc, HP, 1, s->sxt, NT, s->qdw, NT, FULL, 0, N, ZERO);
    for (long i = 0; i < tc; i++) {  /* y_i += e_i C_i S */
        const float *q = s->qdw + i * NT, *ci = Cc + i * d->bc_row;
        float *dci = dCc + i * GN, ei = s->e[i], t = 0.f;
#pragma omp simd reduction(+ : t)
        for (long n = 0; n < N; n++) {
            dci[n] += ei * q[n];
            t += ci[n] * q[n];
        }
        dcs[i] += ei * t;
    }
    for (long i = 0; i < tc; i++) {  /* y_i += sum_{j <= i} w_ij (dt x)_j */
        const float *dw = s->qdw + i * NT + N, *wr = s->ay + i * NT + N, *dmr = dm + i * T;
        float *dcb = s->dcb + i * T, row = 0.f;
#pragma omp simd
        for (long j = 0; j <= i; j++) dcb[j] += dw[j] * dmr[j];
        /* d/d(cs_i - cs_j): + to cs_i, - to cs_j; the diagonal's two cancel exactly, so it is left out
         * (its terms are the largest, and their round-off would add up in the cumulative sum below). */
#pragma omp simd reduction(+ : row)
        for (long j = 0; j < i; j++) {
            float dseg = dw[j] * wr[j];
            row += dseg;
            dcs[j] -= dseg;
        }
        dcs[i] += row;
    }

    /* One product for the gradients of the entering state and of dt x:
     * [dS ; d(dt x)] = [e_end dS ; d(dt x)] + [e C | w]^T gy, in place (w^T is upper triangular: rows
     * N + j read k >= j, the UPPER shape with shift -N). */
    for (long i = 0; i < N * P; i++) dS[i] *= e_end;
    gemm(N + tc, P, tc, s->ay, 1, NT, gyc, HP, ds, P, UPPER, -N, ALL_COLUMNS, KEEP);

    /* Back through dt x, cs = cumsum(dt a), y += D x and dt = softplus(dt_raw + dt_bias). */
    double da = 0., acc = 0.;
    float dd = 0.f, dbias = 0.f, dh = in->D ? in->D[h] : 0.f;
    for (long t = tc - 1; t >= 0; t--) {
        acc += dcs[t];
        float dtt = s->dt[t], s_dot = 0.f, gx = 0.f;
        const float *xt = xc + t * HP, *gt = gyc + t * HP, *dxr = dxdt + t * P;
        float *dxt = gr->dx + (row0 + t) * HP + h * P;
#pragma omp simd reduction(+ : s_dot, gx)
        for (long p = 0; p < P; p++) {
            dxt[p] = dtt * dxr[p] + dh * gt[p];
            s_dot += xt[p] * dxr[p];
            gx += gt[p] * xt[p];
        }
        float g_dt = s_dot + (float)acc * a;
        if (d->dt_softplus) g_dt *= s->slope[t * (H / d->G) + h % (H / d->G)];
        gr->d_dt[(row0 + t) * H + h] = g_dt;
        da += acc * dtt;
        dd += gx;
        dbias += g_dt;
    }
    gr->d_a[b * H + h] += da;
    gr->d_d[b * H + h] += dd;
    gr->d_bias[b * H + h] += dbias;
}

static void backward_group(const dims_t *d, const inputs_t *in, const grads_t *gr, long b, long g,
                           const float *g_final, float *d_h0, scratch_t *s) {
    long L = d->L, H = d->H, P = d->P, N = d->N, T = d->T, hpg = H / d->G, NP = N * P, GN = d->G * N;
    long NTP = (N + T) * P;
    for (long k = 0; k < hpg; k++) {  /* the gradient of the final state, as (N, P), on top of each head's stack */
        float *dS = s->sx + k * NTP;
        if (g_final)
            transpose(P, N, g_final + (b * H + g * hpg + k) * P * N, N, dS, P);
        else
            memset(dS, 0, sizeof(float) * NP);
    }
    long n_chunks = (L + T - 1) / T;
    for (long c = n_chunks - 1; c >= 0; c--) {
        long t0 = c * T, tc = L - t0 < T ? L - t0 : T;
        const float *Bc = in->B + (b * L + t0) * d->bc_row + g * d->bc_group;
        const float *Cc = in->C + (b * L + t0) * d->bc_row + g * d->bc_group;
        float *dBc = gr->dB + (b * L + t0) * GN + g * N, *dCc = gr->dC + (b * L + t0) * GN + g * N;
        chunk_scores(d, Bc, Cc, tc, s);
        if (d->dt_softplus) softplus_slopes(d, in, b * L + t0, tc, g * hpg, s->slope);
        memset(s->dcb, 0, sizeof(float) * T * T);
        for (long k = 0; k < hpg; k++) {
            long next_row0 = b * L + t0, next_tc = tc, next_h = g * hpg + k + 1;
            if (k + 1 == hpg)  /* the previous chunk's first head (a whole chunk: only the last may be short) */
                next_row0 -= T, next_tc = T, next_h = g * hpg;
            if (next_row0 >= b * L) {
                prefetch_head_rows(d, in->x, next_row0, next_tc, next_h);
                prefetch_head_rows(d, gr->gy, next_row0, next_tc, next_h);
            }
            backward_head(d, in, gr, b, g * hpg + k, c, tc, Bc, Cc, dBc, dCc, s->sx + k * NTP, s);
        }
        /* scores C B^T: dC += dcb B, dB += dcb^T C */
        gemm(tc, N, tc, s->dcb, T, 1, Bc, d->bc_row, dCc, GN, LOWER, 0, ALL_COLUMNS, KEEP);
        gemm(tc, N, tc, s->dcb, 1, T, Cc, d->bc_row, dBc, GN, UPPER, 0, ALL_COLUMNS, KEEP);
    }
    for (long k = 0; k < hpg; k++) /* back to the caller's (P, N) */
        transpose(N, P, s->sx + k * NTP, P, d_h0 + (b * H + g * hpg + k) * P * N, N);
}

/* dB, dC, d_a, d_d and d_bias must be zero on entry; dx, d_dt (the gradient of dt_raw) and d_h0 are
 * written whole. g_final, dt_bias and D may be NULL. */
int ssd_chunks_backward(const float *x, const float *dt_raw, const float *dt_bias, const float *A, const float *B,
                        const float *C, const float *D, const float *dt, const float *starts, const float *gy,
                        const float *g_final, float *dx, float *d_dt, float *d_a, float *d_d, float *d_bias,
                        float *dB, float *dC, float *d_h0, long batch, long L, long H, long P, long G, long N, long T,
                        long bc_row, long bc_group, int softplus_dt, float floor, int threads) {
    (void)threads; /* read by the OpenMP pragmas only: unused in a build without OpenMP */
    dims_t d = {batch, L, H, P, G, N, T, bc_row, bc_group, floor, softplus_dt};
    inputs_t in = {x, dt_raw, dt_bias, A, B, C, D};
    grads_t gr = {dt, starts, gy, dx, d_dt, d_a, d_d, d_bias, dB, dC};
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        scratch_t s;
        if (scratch_new(&s, &d)) {
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (long bg = 0; bg < batch * G; bg++)
                backward_group(&d, &in, &gr, bg / G, bg % G, g_final, d_h0, &s);
            free(s.block);
        }
    }
    return failed ? -1 : 0;
}
