/* exp for float32 loops that GCC vectorises (libm's expf is a scalar call), shared by the cpu-c kernels.
 *
 * x = n ln2 + r with |r| <= ln2 / 2: n rounded by adding and subtracting 1.5 * 2^23 (no floorf, which GCC
 * keeps a call), exp(r) by its Taylor series to r^7 (truncation under 1e-8 relative), 2^n put into the
 * exponent bits. Within 9e-8 relative of exp on [-87, 88] (measured). Each kernel clamps its argument the
 * way its loop vectorises and its edges need (a file with float compares in its loops asks GCC for
 * `no-trapping-math` before including this).
 */
#ifndef BMOJO_FAST_EXP_H
#define BMOJO_FAST_EXP_H

#include <stdint.h>
#include <string.h>

/* exp(x) for x in [-88, 88] (below -87 the result is subnormal or 0: 2^n's bits underflow to 0). */
static inline float exp_in_range(float x) {
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693145751953125f - n * 1.42860682030941723e-6f;
    float p = 1.f / 5040.f;
    p = p * r + 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* exp(x) with x clamped to [-87, 88] first, so the result is always a normal float: exp(-87) = 1.6e-38 below,
 * exp(88) = 1.7e38 above. In a sigmoid, 1 / (1 + exp(-z)), the clamp changes nothing visible: s is 1 within
 * round-off for z > 17, and for z < -88 it stays at sigmoid(-88) = 6e-39 instead of falling further. */
static inline float exp_clamped(float x) {
    float xc = x < -87.0f ? -87.0f : x;
    xc = xc > 88.0f ? 88.0f : xc;
    return exp_in_range(xc);
}

#endif
