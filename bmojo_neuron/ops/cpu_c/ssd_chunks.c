/* The SSD scan's chunked core, forward and backward, for float32 CPU buffers.
 *
 * Same math as bmojo_neuron/ops/reference/ssd_fused.py (`SSDChunks`), written so that
 * each token's data is read once per pass: every product is a small matrix product on
 * one chunk of one (batch, B/C group), and the element-wise work around it (decays,
 * cumulative sums, the dt scaling, the causal mask) happens on the chunk while it sits
 * in the core's L1/L2 cache. One OpenMP task per (batch, group): the chunks of a group
 * are sequential (the state is carried), the groups are independent.
 *
 * Layouts (contiguous, row-major):
 *   x (batch, L, H, P); dt (batch, L, H), already discretised; A (H)
 *   B, C (batch, L, G, N); head h reads group h / (H / G)
 *   h0, h_final, d_h0 (batch, H, P, N)
 *   starts (batch, L / T, H, N, P): the state entering each chunk, transposed (saved
 *   by the forward for the backward)
 * L is a multiple of the chunk T (the caller pads with dt = 0).
 *
 * Decays exp(t) are taken at t >= floor (2 log eps of float32), as `ssd_fused._exp`
 * does, so that no product reads a subnormal float.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* exp(x) to about 1 ulp, written so that loops over it vectorise (libm's expf is a scalar call):
 * x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its Taylor series to r^7 (truncation < 1e-8
 * relative), 2^n put into the exponent bits. x below -87 gives 0 (no subnormals), above 88.7 inf. */
static inline float fast_exp(float x) {
    float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = floorf(xc * 1.44269504088896341f + 0.5f);
    float r = xc - n * 0.693145751953125f - n * 1.42860682030941723e-6f;
    float p = 1.f / 5040.f;
    p = p * r + 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    int bits = ((int)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    float v = p * scale;
    v = x < -87.0f ? 0.f : v;
    return x > 88.7f ? INFINITY : v;
}

static inline float decay(float t, float floor) { return fast_exp(t < floor ? floor : t); }

/* out[i*ldc + j] += sum_k a[i*ars + k*acs] * b[k*ldb + j], i < m, j < n, k < kk (k < min(kk, i + 1) rows
 * at a time when `lower`, for a lower-triangular a). Blocks of 4 rows x 16 columns kept in registers. */
static void gemm(long m, long n, long kk, const float *a, long ars, long acs, const float *b, long ldb,
                 float *out, long ldc, int lower) {
    long i0 = 0;
    for (; i0 + 4 <= m; i0 += 4) {
        long kend = lower ? (i0 + 4 < kk ? i0 + 4 : kk) : kk;
        long j0 = 0;
        for (; j0 + 16 <= n; j0 += 16) {
            float acc[4][16] = {{0}};
            for (long k = 0; k < kend; k++) {
                const float *bk = b + k * ldb + j0;
                for (int r = 0; r < 4; r++) {
                    float av = a[(i0 + r) * ars + k * acs];
#pragma omp simd
                    for (int j = 0; j < 16; j++) acc[r][j] += av * bk[j];
                }
            }
            for (int r = 0; r < 4; r++) {
                float *o = out + (i0 + r) * ldc + j0;
#pragma omp simd
                for (int j = 0; j < 16; j++) o[j] += acc[r][j];
            }
        }
        for (; j0 < n; j0++)
            for (int r = 0; r < 4; r++) {
                float s = 0.f;
                for (long k = 0; k < kend; k++) s += a[(i0 + r) * ars + k * acs] * b[k * ldb + j0];
                out[(i0 + r) * ldc + j0] += s;
            }
    }
    for (; i0 < m; i0++) {
        long kend = lower ? (i0 + 1 < kk ? i0 + 1 : kk) : kk;
        float *o = out + i0 * ldc;
        for (long k = 0; k < kend; k++) {
            float av = a[i0 * ars + k * acs];
            const float *bk = b + k * ldb;
#pragma omp simd
            for (long j = 0; j < n; j++) o[j] += av * bk[j];
        }
    }
}

/* dst (cols x rows) = transpose of src (rows x cols, row stride ld). */
static void transpose(long rows, long cols, const float *src, long ld, float *dst) {
    for (long r = 0; r < rows; r++)
        for (long c = 0; c < cols; c++) dst[c * rows + r] = src[r * ld + c];
}

typedef struct {
    long batch, L, H, P, G, N, T;
    float floor;
} dims_t;

/* Per-task scratch, all float. */
typedef struct {
    float *states;          /* (hpg, N, P): state (forward) or its gradient (backward) per head */
    float *cb, *w, *dcb, *dw, *dm; /* (T, T); dm: decay(cs_i - cs_j) on and below the diagonal */
    float *bt, *at;         /* (N, T) */
    float *xdt, *tp, *tp2;  /* (T, P) */
    float *tn;              /* (T, N) */
    float *np, *pn;         /* (N, P), (P, N) */
    float *pt;              /* (P, T) */
    float *cs, *e, *dcs, *to_end; /* (T); to_end: decay(cs_end - cs_j) */
    float *block;
} scratch_t;

static int scratch_new(scratch_t *s, const dims_t *d) {
    long hpg = d->H / d->G, T = d->T, N = d->N, P = d->P;
    long sizes[] = {hpg * N * P, T * T, T * T, T * T, T * T, T * T, N * T, N * T, T * P, T * P, T * P, T * N,
                    N * P, P * N, P * T, T, T, T, T};
    long total = 0;
    for (unsigned i = 0; i < sizeof sizes / sizeof *sizes; i++) total += sizes[i];
    float *p = calloc((size_t)total, sizeof(float));
    if (!p) return -1;
    s->block = p;
    float **slots[] = {&s->states, &s->cb, &s->w, &s->dcb, &s->dw, &s->dm, &s->bt, &s->at, &s->xdt, &s->tp,
                       &s->tp2, &s->tn, &s->np, &s->pn, &s->pt, &s->cs, &s->e, &s->dcs, &s->to_end};
    for (unsigned i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        *slots[i] = p;
        p += sizes[i];
    }
    return 0;
}

/* One chunk's shared pieces for a group: bt = B^T (N x T), cb = C B^T (T x T, lower part). */
static void chunk_scores(const dims_t *d, const float *Bc, const float *Cc, scratch_t *s) {
    long T = d->T, N = d->N, GN = d->G * d->N;
    transpose(T, N, Bc, GN, s->bt);
    memset(s->cb, 0, sizeof(float) * T * T);
    gemm(T, T, N, Cc, GN, 1, s->bt, T, s->cb, T, 0);
}

/* A head's per-chunk pieces: cs (in-chunk cumulative sum of dt A), e = decay(cs), xdt = dt x (T x P),
 * w = cb * decay(cs_i - cs_j) on and below the diagonal, zero above. */
static void chunk_head(const dims_t *d, const float *xc, const float *dtc, float a, scratch_t *s) {
    long T = d->T, P = d->P, H = d->H;
    float run = 0.f;
    for (long t = 0; t < T; t++) {
        float dtt = dtc[t * H];
        run += dtt * a;
        s->cs[t] = run;
        const float *xt = xc + t * H * P;
        float *o = s->xdt + t * P;
#pragma omp simd
        for (long p = 0; p < P; p++) o[p] = dtt * xt[p];
    }
    float floor = d->floor, cs_end = s->cs[T - 1];
#pragma omp simd
    for (long t = 0; t < T; t++) {
        s->e[t] = decay(s->cs[t], floor);
        s->to_end[t] = decay(cs_end - s->cs[t], floor);
    }
    for (long i = 0; i < T; i++) {
        float csi = s->cs[i];
        float *dm = s->dm + i * T, *w = s->w + i * T;
        const float *cb = s->cb + i * T;
#pragma omp simd
        for (long j = 0; j <= i; j++) {
            dm[j] = decay(csi - s->cs[j], floor);
            w[j] = cb[j] * dm[j];
        }
        for (long j = i + 1; j < T; j++) dm[j] = w[j] = 0.f;
    }
}

static void forward_group(const dims_t *d, long b, long g, const float *x, const float *dt, const float *A,
                          const float *B, const float *C, const float *h0, float *y, float *h_final,
                          float *starts, scratch_t *s) {
    long L = d->L, H = d->H, P = d->P, G = d->G, N = d->N, T = d->T, hpg = H / G, NP = N * P;
    long n_chunks = L / T;
    for (long k = 0; k < hpg; k++) {  /* states as (N, P) */
        long h = g * hpg + k;
        float *st = s->states + k * NP;
        const float *src = h0 + (b * H + h) * P * N;
        for (long p = 0; p < P; p++)
            for (long n = 0; n < N; n++) st[n * P + p] = src[p * N + n];
    }
    for (long c = 0; c < n_chunks; c++) {
        long t0 = c * T;
        const float *Bc = B + ((b * L + t0) * G + g) * N, *Cc = C + ((b * L + t0) * G + g) * N;
        chunk_scores(d, Bc, Cc, s);
        for (long k = 0; k < hpg; k++) {
            long h = g * hpg + k;
            const float *xc = x + ((b * L + t0) * H + h) * P;
            chunk_head(d, xc, dt + (b * L + t0) * H + h, A[h], s);
            float *st = s->states + k * NP;
            memcpy(starts + ((b * n_chunks + c) * H + h) * NP, st, sizeof(float) * NP);
            /* y = e * (C . state) + w (dt x) */
            memset(s->tp, 0, sizeof(float) * T * P);
            gemm(T, P, N, Cc, G * N, 1, st, P, s->tp, P, 0);
            for (long i = 0; i < T; i++)
                for (long p = 0; p < P; p++) s->tp[i * P + p] *= s->e[i];
            gemm(T, P, T, s->w, T, 1, s->xdt, P, s->tp, P, 1);
            for (long i = 0; i < T; i++) memcpy(y + ((b * L + t0 + i) * H + h) * P, s->tp + i * P, sizeof(float) * P);
            /* state = decay(cs_end) state + sum_j decay(cs_end - cs_j) B_j (dt x)_j */
            float e_end = s->e[T - 1];
            for (long i = 0; i < NP; i++) st[i] *= e_end;
            for (long n = 0; n < N; n++)
#pragma omp simd
                for (long t = 0; t < T; t++) s->at[n * T + t] = s->bt[n * T + t] * s->to_end[t];
            gemm(N, P, T, s->at, T, 1, s->xdt, P, st, P, 0);
        }
    }
    for (long k = 0; k < hpg; k++) /* the states are kept (N, P): the caller's are (P, N) */
        transpose(N, P, s->states + k * NP, P, h_final + (b * H + g * hpg + k) * P * N);
}

int ssd_chunks_forward(const float *x, const float *dt, const float *A, const float *B, const float *C,
                       const float *h0, float *y, float *h_final, float *starts, long batch, long L, long H,
                       long P, long G, long N, long T, float floor, int threads) {
    dims_t d = {batch, L, H, P, G, N, T, floor};
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        scratch_t s;
        if (scratch_new(&s, &d)) {
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (long bg = 0; bg < batch * G; bg++)
                forward_group(&d, bg / G, bg % G, x, dt, A, B, C, h0, y, h_final, starts, &s);
            free(s.block);
        }
    }
    return failed ? -1 : 0;
}

/* Gradients of one head in one chunk; accumulates into dcb (the group's score gradient), the rows of
 * d_b / d_c, and writes the head's dx, d_dt rows and the gradient of the state entering the chunk. */
static void backward_head(const dims_t *d, long b, long g, long h, long c, const float *x, const float *dt,
                          const float *A, const float *B, const float *C, const float *starts, const float *gy,
                          float *dx, float *d_dt, float *d_a, float *dB, float *dC, float *dstate, scratch_t *s) {
    long L = d->L, H = d->H, P = d->P, G = d->G, N = d->N, T = d->T, NP = N * P, GN = G * N, HP = H * P;
    long n_chunks = L / T, t0 = c * T;
    const float *Bc = B + ((b * L + t0) * G + g) * N, *Cc = C + ((b * L + t0) * G + g) * N;
    float *dBc = dB + ((b * L + t0) * G + g) * N, *dCc = dC + ((b * L + t0) * G + g) * N;
    const float *xc = x + ((b * L + t0) * H + h) * P, *dtc = dt + (b * L + t0) * H + h;
    const float *gyc = gy + ((b * L + t0) * H + h) * P;
    const float *st = starts + ((b * n_chunks + c) * H + h) * NP;
    float a = A[h];
    chunk_head(d, xc, dtc, a, s);
    float *dxdt = s->tp2, *dcs = s->dcs;
    memset(dxdt, 0, sizeof(float) * T * P);
    memset(dcs, 0, sizeof(float) * T);
    float e_end = s->e[T - 1];

    /* The state carried out of the chunk: e_end * start + sum_j decay(cs_end - cs_j) B_j (dt x)_j. */
    float dot = 0.f;
    for (long i = 0; i < NP; i++) dot += dstate[i] * st[i];
    dcs[T - 1] += e_end * dot;
    memset(s->tp, 0, sizeof(float) * T * P);  /* u = B . dstate */
    gemm(T, P, N, Bc, GN, 1, dstate, P, s->tp, P, 0);
    transpose(N, P, dstate, P, s->pn);
    memset(s->tn, 0, sizeof(float) * T * N);  /* v = (dt x) . dstate^T */
    gemm(T, N, P, s->xdt, P, 1, s->pn, N, s->tn, N, 0);
    for (long j = 0; j < T; j++) {
        float ej = s->to_end[j], t = 0.f;
        const float *u = s->tp + j * P, *xj = s->xdt + j * P;
        for (long p = 0; p < P; p++) {
            dxdt[j * P + p] += ej * u[p];
            t += xj[p] * u[p];
        }
        t *= ej;
        dcs[j] -= t;
        dcs[T - 1] += t;
        for (long n = 0; n < N; n++) dBc[j * GN + n] += ej * s->tn[j * N + n];
    }

    /* Read-out of the entering state: y_i += e_i C_i . start. */
    transpose(N, P, st, P, s->pn);
    memset(s->tn, 0, sizeof(float) * T * N);  /* q = gy . start^T */
    gemm(T, N, P, gyc, HP, 1, s->pn, N, s->tn, N, 0);
    for (long i = 0; i < T; i++) {
        float t = 0.f;
        for (long n = 0; n < N; n++) {
            float q = s->tn[i * N + n];
            dCc[i * GN + n] += s->e[i] * q;
            t += Cc[i * GN + n] * q;
        }
        dcs[i] += s->e[i] * t;
    }
    /* Gradient of the entering state: e_end * dstate + sum_i e_i C_i^T gy_i (into dstate, in place). */
    for (long i = 0; i < NP; i++) dstate[i] *= e_end;
    for (long n = 0; n < N; n++)
        for (long t = 0; t < T; t++) s->at[n * T + t] = Cc[t * GN + n] * s->e[t];
    gemm(N, P, T, s->at, T, 1, gyc, HP, dstate, P, 0);

    /* In-chunk outputs: y_i += sum_{j <= i} w_ij (dt x)_j. */
    transpose(T, P, s->xdt, P, s->pt);
    memset(s->dw, 0, sizeof(float) * T * T);
    gemm(T, T, P, gyc, HP, 1, s->pt, T, s->dw, T, 0);
    gemm(T, P, T, s->w, 1, T, gyc, HP, dxdt, P, 0);  /* w^T gy */
    for (long i = 0; i < T; i++) {
        const float *dw = s->dw + i * T, *w = s->w + i * T, *dm = s->dm + i * T;
        float *dcb = s->dcb + i * T, row = 0.f;
#pragma omp simd reduction(+ : row)
        for (long j = 0; j <= i; j++) {
            dcb[j] += dw[j] * dm[j];
            float dseg = dw[j] * w[j];
            row += dseg;
            dcs[j] -= dseg;
        }
        dcs[i] += row;
    }

    /* Back through xdt = dt x and cs = cumsum(dt a). */
    float da = 0.f, acc = 0.f;
    for (long t = T - 1; t >= 0; t--) {
        acc += dcs[t];
        float dtt = dtc[t * H], s_dot = 0.f;
        const float *xt = xc + t * HP;
        float *dxt = dx + ((b * L + t0 + t) * H + h) * P;
        for (long p = 0; p < P; p++) {
            dxt[p] = dtt * dxdt[t * P + p];
            s_dot += xt[p] * dxdt[t * P + p];
        }
        d_dt[(b * L + t0 + t) * H + h] = s_dot + acc * a;
        da += acc * dtt;
    }
    d_a[b * H + h] += da;
}

static void backward_group(const dims_t *d, long b, long g, const float *x, const float *dt, const float *A,
                           const float *B, const float *C, const float *starts, const float *gy,
                           const float *g_final, float *dx, float *d_dt, float *d_a, float *dB, float *dC,
                           float *d_h0, scratch_t *s) {
    long L = d->L, H = d->H, P = d->P, G = d->G, N = d->N, T = d->T, hpg = H / G, NP = N * P, GN = G * N;
    long n_chunks = L / T;
    for (long k = 0; k < hpg; k++) {  /* gradient of the final state, as (N, P) */
        long h = g * hpg + k;
        float *ds = s->states + k * NP;
        if (!g_final) {
            memset(ds, 0, sizeof(float) * NP);
            continue;
        }
        const float *src = g_final + (b * H + h) * P * N;
        for (long p = 0; p < P; p++)
            for (long n = 0; n < N; n++) ds[n * P + p] = src[p * N + n];
    }
    for (long c = n_chunks - 1; c >= 0; c--) {
        long t0 = c * T;
        const float *Bc = B + ((b * L + t0) * G + g) * N, *Cc = C + ((b * L + t0) * G + g) * N;
        chunk_scores(d, Bc, Cc, s);
        memset(s->dcb, 0, sizeof(float) * T * T);
        for (long k = 0; k < hpg; k++)
            backward_head(d, b, g, g * hpg + k, c, x, dt, A, B, C, starts, gy, dx, d_dt, d_a, dB, dC,
                          s->states + k * NP, s);
        /* scores cb = C B^T: dC += dcb B, dB += dcb^T C */
        gemm(T, N, T, s->dcb, T, 1, Bc, GN, dC + ((b * L + t0) * G + g) * N, GN, 1);
        gemm(T, N, T, s->dcb, 1, T, Cc, GN, dB + ((b * L + t0) * G + g) * N, GN, 0);
    }
    for (long k = 0; k < hpg; k++) /* (N, P) kept, (P, N) given back, as the forward's final states */
        transpose(N, P, s->states + k * NP, P, d_h0 + (b * H + g * hpg + k) * P * N);
}

/* dB, dC and d_a (batch, H) must be zero on entry; dx, d_dt and d_h0 are written whole. g_final may be NULL. */
int ssd_chunks_backward(const float *x, const float *dt, const float *A, const float *B, const float *C,
                        const float *starts, const float *gy, const float *g_final, float *dx, float *d_dt,
                        float *d_a, float *dB, float *dC, float *d_h0, long batch, long L, long H, long P, long G,
                        long N, long T, float floor, int threads) {
    dims_t d = {batch, L, H, P, G, N, T, floor};
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        scratch_t s;
        if (scratch_new(&s, &d)) {
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (long bg = 0; bg < batch * G; bg++)
                backward_group(&d, bg / G, bg % G, x, dt, A, B, C, starts, gy, g_final, dx, d_dt, d_a, dB, dC,
                               d_h0, &s);
            free(s.block);
        }
    }
    return failed ? -1 : 0;
}
