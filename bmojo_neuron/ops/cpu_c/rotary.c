/* The rotary op (rotate-half RoPE) for float32 CPU buffers, forward and backward.
 *
 * Same math as bmojo_neuron/ops/reference/rotary.py (`_Rotary`). With the two halves
 * a, b of a row of width D and the row's tables c = cos, s = sin (width D each):
 *   forward:   out_a = x_a c_a - x_b s_a     out_b = x_b c_b + x_a s_b
 *   backward:  dx_a  = g_a c_a + g_b s_b     dx_b  = g_b c_b - g_a s_a   (the transposed rotation)
 * Each product is rounded before the sum, as the torch ops compute it (no fused multiply-add:
 * contraction is off for this file), so the forward is bit for bit the torch path's.
 *
 * Layouts: the input and the output are (n0, n1, R, D) with their own strides in elements
 * for the first three axes and the last axis contiguous, so a rotation can read a transposed
 * view (queries (batch, heads, L, D) that sit in memory as (batch, L, heads, D)) and write
 * another layout in the same pass; cos and sin are (R, D), contiguous, shared by every
 * (n0, n1). Rows are independent: one OpenMP loop over all n0 * n1 * R of them.
 */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

/* One row: `sign` -1 rotates forward (the first half subtracts), +1 applies the transpose. */
static void rotary_row(const float *restrict in, float *restrict out, const float *restrict c,
                       const float *restrict s, long half, float sign) {
    const float *s_first = sign < 0 ? s : s + half;   /* the sin half the first output half reads */
    const float *s_second = sign < 0 ? s + half : s;
    for (long i = 0; i < half; i++) {
        float product = in[i] * c[i], cross = in[half + i] * s_first[i];
        out[i] = sign < 0 ? product - cross : product + cross;
    }
    for (long i = 0; i < half; i++) {
        float product = in[half + i] * c[half + i], cross = in[i] * s_second[i];
        out[half + i] = sign < 0 ? product + cross : product - cross;
    }
}

/* forward (transpose 0) or backward (transpose 1) rotation of every row; returns 0, or 1 for an odd D. */
int rotary_apply(const float *in, long in0, long in1, long in_r, float *out, long out0, long out1, long out_r,
                 const float *cos_table, const float *sin_table, long n0, long n1, long rows, long width,
                 int transpose, int threads) {
    (void)threads; /* read by the OpenMP pragmas only: unused in a build without OpenMP */
    if (width % 2)
        return 1;
    long half = width / 2, total = n0 * n1 * rows;
    float sign = transpose ? 1.0f : -1.0f;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long index = 0; index < total; index++) {
        long r = index % rows, j = (index / rows) % n1, i = index / (rows * n1);
        rotary_row(in + i * in0 + j * in1 + r * in_r, out + i * out0 + j * out1 + r * out_r,
                   cos_table + r * width, sin_table + r * width, half, sign);
    }
    return 0;
}
