"""The fused-Mamba tutorial's `mamba_v3` loop nest in NKI 0.2.0: the cost model's calibration kernel.

The tutorial (aws-neuron-sdk `nki/guides/tutorials/fused_mamba.rst`) measured its
`mamba_v3` at 27.8 ms on a Trn1 (batch 1, 4096 channels, L 8192, 16 states; 1.6 ms at
L 512). This file is our own NKI 0.2 rendering of the instruction mix the tutorial
describes, so the emulator's timeline can be compared with that measurement on the same
work: per (channel tile of 128, state, time tile of 512)

    deltaA  = exp(delta * A[:, n])            activation (Scalar)
    deltaU  = delta * u                       tensor_tensor (Vector), SBUF x SBUF
    deltaBu = deltaU * B[n] broadcast         tensor_tensor (Vector), SBUF x SBUF
    h       = scan(deltaA, deltaBu, carry)    tensor_tensor_scan (Vector)
    scanC   = h * C[n] broadcast              tensor_tensor (Vector), SBUF x SBUF
    acc    += scanC                           tensor_tensor (Vector)

with delta, u and the accumulator held for the whole sequence per channel tile, and the
B / C rows broadcast to the 128 partitions by the DMA (a partition step of 0). The
output is y = sum_n C_n h_n (no D, no gate), as the tutorial's kernel computes.
Not used by the model: `nki_kernels.selective_scan_fwd` is the Mamba-1 forward.
"""

from __future__ import annotations

from nki_kernels.common import PMAX, SEQ_TILE
from nki_kernels.compat import nisa, nki, nl


def _row_broadcast(mat, b, n, t0, t):
    """Row n of mat[b] (time t0..t0+t) on all 128 partitions, loaded by the DMA with partition step 0."""
    length = mat.shape[2]
    rows = nl.ndarray((PMAX, t), dtype=nl.float32, buffer=nl.sbuf)
    offset = (b * mat.shape[1] + n) * length + t0
    nisa.dma_copy(dst=rows, src=mat.ap([[0, PMAX], [1, t]], offset=offset))
    return rows


@nki.jit
def tutorial_mamba_v3(delta, u, A, B, C):
    """y (batch, channels, L) = the tutorial's selective scan; channels a multiple of 128, L of 512."""
    batch, channels, length = delta.shape
    n_states = A.shape[1]
    assert channels % PMAX == 0 and length % SEQ_TILE == 0
    out = nl.ndarray((batch, channels, length), dtype=delta.dtype, buffer=nl.shared_hbm)
    for b in nl.affine_range(batch):
        for c0 in range(0, channels, PMAX):
            acc = nl.ndarray((PMAX, length), dtype=nl.float32, buffer=nl.sbuf)
            nisa.memset(dst=acc, value=0.0)
            delta_i = nl.ndarray((PMAX, length), dtype=nl.float32, buffer=nl.sbuf)
            nisa.dma_copy(dst=delta_i, src=delta[b, c0:c0 + PMAX, :])
            u_i = nl.ndarray((PMAX, length), dtype=nl.float32, buffer=nl.sbuf)
            nisa.dma_copy(dst=u_i, src=u[b, c0:c0 + PMAX, :])
            a_i = nl.ndarray((PMAX, n_states), dtype=nl.float32, buffer=nl.sbuf)
            nisa.dma_copy(dst=a_i, src=A[c0:c0 + PMAX, :])
            carry = nl.ndarray((PMAX, n_states), dtype=nl.float32, buffer=nl.sbuf)
            nisa.memset(dst=carry, value=0.0)
            for n in range(n_states):
                for t0 in range(0, length, SEQ_TILE):
                    _step(delta_i, u_i, a_i, carry, acc, B, C, b, n, t0)
            nisa.dma_copy(dst=out[b, c0:c0 + PMAX, :], src=acc)
    return out


def _step(delta_i, u_i, a_i, carry, acc, B, C, b, n, t0):
    """One (state, time tile) of the tutorial's inner loop."""
    t = SEQ_TILE
    window = delta_i[:, t0:t0 + t]
    delta_a = nl.ndarray((PMAX, t), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=delta_a, op=nl.exp, data=window, scale=a_i[:, n:n + 1])
    delta_u = nl.ndarray((PMAX, t), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=delta_u, data1=window, data2=u_i[:, t0:t0 + t], op=nl.multiply)
    delta_bu = nl.ndarray((PMAX, t), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=delta_bu, data1=delta_u, data2=_row_broadcast(B, b, n, t0, t), op=nl.multiply)
    h = nl.ndarray((PMAX, t), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor_scan(dst=h, data0=delta_a, data1=delta_bu, initial=carry[:, n:n + 1], op0=nl.multiply,
                            op1=nl.add)
    nisa.tensor_copy(dst=carry[:, n:n + 1], src=h[:, t - 1:t])
    scan_c = nl.ndarray((PMAX, t), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=scan_c, data1=h, data2=_row_broadcast(C, b, n, t0, t), op=nl.multiply)
    nisa.tensor_tensor(dst=acc[:, t0:t0 + t], data1=acc[:, t0:t0 + t], data2=scan_c, op=nl.add)
