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

/* GCC vectorises a loop with float comparisons (fast_exp's clamps) only where they may not trap; these
 * kernels never read the floating-point exception flags, so this changes no result (clang ignores it). */
#pragma GCC optimize("no-trapping-math")

#define SPAN 8192

/* exp(x) to 1 ulp (within 9e-8 relative, measured on [-87, 88]), written so that loops over it vectorise
 * (libm's expf is a scalar call): x = n ln2 + r with |r| <= ln2 / 2, n rounded by adding 1.5 * 2^23 (its bits
 * then hold n), exp(r) by its Taylor series to r^7, 2^n put into the exponent bits. x is clamped to
 * [-87, 88] first, so the result is a normal float: exp(-87) = 1.6e-38 below, exp(88) = 1.7e38 above. In a
 * sigmoid, 1 / (1 + exp(-z)), the clamp changes nothing visible: s is 1 within round-off for z > 17, and for
 * z < -88 it stays at sigmoid(-88) = 6e-39 instead of falling further. */
static inline float fast_exp(float x) {
    const float shifter = 12582912.0f;
    float xc = x < -87.0f ? -87.0f : x;
    xc = xc > 88.0f ? 88.0f : xc;
    float t = xc * 1.44269504088896341f + shifter;
    float n = t - shifter;
    float r = xc - n * 0.693145751953125f - n * 1.42860682030941723e-6f;
    float p = 1.f / 5040.f;
    p = p * r + 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    int32_t t_bits, bits;
    memcpy(&t_bits, &t, sizeof t_bits);
    bits = (t_bits - 0x4B400000 + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float sigmoid(float z) { return 1.f / (1.f + fast_exp(-z)); }

int swiglu_forward(const float *gate, const float *up, float *out, long n, int threads) {
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
