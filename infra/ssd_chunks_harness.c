/* Times ssd_chunks.c's two functions alone (no Python, no torch), for `perf` and chunk sweeps.
 *
 *   cc -O3 -march=native -fopenmp -g infra/ssd_chunks_harness.c bmojo_neuron/ops/cpu_c/ssd_chunks.c -lm \
 *      -o /tmp/ssd_harness
 *   /tmp/ssd_harness 32 8            # chunk 32, best of 8 calls: forward, backward, sum (CPU ms)
 *   perf record /tmp/ssd_harness 32 30 && perf report
 *
 * The shape is the bench's Mamba-2 layer: batch 4, L 1K, 8 heads x 64, one group of N 64, D and
 * dt_bias, one thread. Inputs are uniform in [-1, 1) from a fixed seed; the checksum printed with
 * the times must not change with the chunk (chunking is exact up to round-off).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int ssd_chunks_forward(const float *x, const float *dt_raw, const float *dt_bias, const float *A, const float *B,
                       const float *C, const float *D, const float *h0, float *y, float *h_final, float *starts,
                       float *dt_out, long batch, long L, long H, long P, long G, long N, long T, long bc_row,
                       long bc_group, int softplus_dt, float floor, int threads);
int ssd_chunks_backward(const float *x, const float *dt_raw, const float *dt_bias, const float *A, const float *B,
                        const float *C, const float *D, const float *dt, const float *starts, const float *gy,
                        const float *g_final, float *dx, float *d_dt, float *d_a, float *d_d, float *d_bias,
                        float *dB, float *dC, float *d_h0, long batch, long L, long H, long P, long G, long N, long T,
                        long bc_row, long bc_group, int softplus_dt, float floor, int threads);

static float *uniform(long n) {
    float *p = malloc(sizeof(float) * n);
    for (long i = 0; i < n; i++) p[i] = (float)rand() / RAND_MAX * 2.f - 1.f;
    return p;
}

static double cpu_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

int main(int argc, char **argv) {
    const long b = 4, L = 1024, H = 8, P = 64, G = 1, N = 64;
    long T = argc > 1 ? atol(argv[1]) : 32;
    int calls = argc > 2 ? atoi(argv[2]) : 8;
    if (T < 1 || calls < 1) {
        fprintf(stderr, "error: usage: %s [chunk >= 1] [calls >= 1]\n", argv[0]);
        return 2;
    }
    srand(0);
    float *x = uniform(b * L * H * P), *gy = uniform(b * L * H * P), *dt = uniform(b * L * H);
    float *B = uniform(b * L * G * N), *C = uniform(b * L * G * N), *D = uniform(H), *bias = uniform(H), A[8];
    for (long h = 0; h < H; h++) A[h] = -0.5f - 0.5f * (float)h;
    long n_chunks = (L + T - 1) / T;
    float *y = malloc(sizeof(float) * b * L * H * P), *dx = malloc(sizeof(float) * b * L * H * P);
    float *h_final = malloc(sizeof(float) * b * H * P * N), *d_h0 = malloc(sizeof(float) * b * H * P * N);
    float *starts = malloc(sizeof(float) * b * n_chunks * H * N * P), *dt_out = malloc(sizeof(float) * b * L * H);
    float *d_dt = malloc(sizeof(float) * b * L * H), *per_row = malloc(sizeof(float) * 3 * b * H);
    float *dB = malloc(sizeof(float) * b * L * G * N), *dC = malloc(sizeof(float) * b * L * G * N);
    float floor = 2.f * logf(1.1920929e-07f);
    double best_f = 1e9, best_b = 1e9, checksum = 0.;
    for (int r = 0; r < calls; r++) {
        double t0 = cpu_seconds();
        if (ssd_chunks_forward(x, dt, bias, A, B, C, D, NULL, y, h_final, starts, dt_out, b, L, H, P, G, N, T, G * N,
                               N, 1, floor, 1))
            return 1;
        double t1 = cpu_seconds();
        for (long i = 0; i < b * L * G * N; i++) dB[i] = dC[i] = 0.f;
        for (long i = 0; i < 3 * b * H; i++) per_row[i] = 0.f;
        double t2 = cpu_seconds();
        if (ssd_chunks_backward(x, dt, bias, A, B, C, D, dt_out, starts, gy, NULL, dx, d_dt, per_row, per_row + b * H,
                                per_row + 2 * b * H, dB, dC, d_h0, b, L, H, P, G, N, T, G * N, N, 1, floor, 1))
            return 1;
        double t3 = cpu_seconds();
        best_f = t1 - t0 < best_f ? t1 - t0 : best_f;
        best_b = t3 - t2 < best_b ? t3 - t2 : best_b;
    }
    for (long i = 0; i < b * L * H * P; i += 97) checksum += y[i] + dx[i];
    for (long i = 0; i < b * L * G * N; i += 7) checksum += dB[i] + dC[i];
    printf("chunk %ld: forward %.2f ms, backward %.2f ms, sum %.2f ms (checksum %.6g)\n", T, 1e3 * best_f,
           1e3 * best_b, 1e3 * (best_f + best_b), checksum);
    return 0;
}
