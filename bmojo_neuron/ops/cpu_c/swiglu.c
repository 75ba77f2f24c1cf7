/* SwiGLU's product silu(gate) * up, forward and backward, for float32 CPU buffers.
 *
 * Layouts: gate, up, out, gy, d_gate, d_up all contiguous with n elements (any shape, read flat).
 * Math, element by element, s = sigmoid(gate), silu(gate) = gate s:
 *   forward   out = gate s up
 *   backward  d_up = gy gate s;  d_gate = gy up s (1 + gate (1 - s))   (d silu / d gate)
 * One pass each way: the backward recomputes s from the saved inputs instead of reading a saved silu(gate),
 * so nothing but the two inputs is kept for it. Threads take contiguous spans of SPAN elements.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* GCC vectorises a loop with float comparisons (exp_clamped's clamps) only where they may not trap; these
 * kernels never read the floating-point exception flags, so this changes no result. */
#if defined(__GNUC__) && !defined(__clang__) /* clang defines __GNUC__ too, and warns on GCC's optimize pragma; */
#pragma GCC optimize("no-trapping-math")     /* its default already lets compares be if-converted */
#endif

#include "fast_exp.h"

#define SPAN 8192

static inline float sigmoid(float z) { return 1.f / (1.f + exp_clamped(-z)); }

int swiglu_forward(const float *gate, const float *up, float *out, long n, int threads) {
    (void)threads; /* read by the OpenMP pragmas only: unused in a build without OpenMP */
    long spans = (n + SPAN - 1) / SPAN;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long sp = 0; sp < spans; sp++) {
        long end = (sp + 1) * SPAN < n ? (sp + 1) * SPAN : n;
#pragma omp simd
        for (long i = sp * SPAN; i < end; i++) out[i] = gate[i] * sigmoid(gate[i]) * up[i];
    }
    return 0;
}

int swiglu_backward(const float *gate, const float *up, const float *gy, float *d_gate, float *d_up, long n,
                    int threads) {
    (void)threads; /* read by the OpenMP pragmas only: unused in a build without OpenMP */
    long spans = (n + SPAN - 1) / SPAN;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long sp = 0; sp < spans; sp++) {
        long end = (sp + 1) * SPAN < n ? (sp + 1) * SPAN : n;
#pragma omp simd
        for (long i = sp * SPAN; i < end; i++) {
            float s = sigmoid(gate[i]);
            d_up[i] = gy[i] * gate[i] * s;
            d_gate[i] = gy[i] * up[i] * s * (1.f + gate[i] * (1.f - s));
        }
    }
    return 0;
}
