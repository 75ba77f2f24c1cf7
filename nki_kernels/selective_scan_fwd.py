"""Mamba-1 selective scan, forward, in NKI 0.2.0.

Layout (docs/kernels.md): channels on the 128 partitions (the last channel tile may
be shorter), time on the free axis in tiles of 512 (one fp32 PSUM bank), states in an
inner loop. Per (batch, channel tile) the scan state of every state `n` is a column
of a (P, N) SBUF tile, carried from one time tile to the next through `initial`.

Per time tile, once:   dt = softplus(delta + bias) (Scalar), du = dt * u (Vector).
Per state n:           dA = exp(dt * A[:, n]) (Scalar), B_n/C_n broadcast to all
                       partitions by a 0/1 selector matmul into PSUM (Tensor),
                       dBu = du * B_n, h = scan(dA, dBu, initial=carry[:, n]),
                       y += h * C_n (Vector; the PSUM operands halve two of them).
Then y = (y + D u) * silu(z). All math fp32; inputs of any float dtype are cast by
the DMA on load and the output on store.
"""

from __future__ import annotations

from nki_kernels.common import PMAX, SEQ_TILE, broadcast_row, load_column, selectors
from nki_kernels.compat import nisa, nki, nl


def _time_inputs(delta, u, b, c0, p, t0, t, bias, delta_softplus):
    """dt (after bias / softplus) and dt*u for one (channel tile, time tile), fp32."""
    d_in = nl.ndarray((p, t), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=d_in, src=delta[b, c0:c0 + p, t0:t0 + t])
    u_t = nl.ndarray((p, t), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=u_t, src=u[b, c0:c0 + p, t0:t0 + t])
    dt = nl.ndarray((p, t), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=dt, op=nl.softplus if delta_softplus else nl.copy, data=d_in, bias=bias)
    du = nl.ndarray((p, t), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=du, data1=dt, data2=u_t, op=nl.multiply)
    return dt, du, u_t


def _state_rows(mat, b, t0, t):
    """B or C rows (N, t) of one time tile, fp32 (N states on partitions)."""
    rows = nl.ndarray((mat.shape[1], t), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=rows, src=mat[b, :, t0:t0 + t])
    return rows


def scan_state(dt, du, a_col, carry_col, sel, n, b_rows, p, t):
    """h over one time tile for state n; updates carry_col to h's last column."""
    d_a = nl.ndarray((p, t), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=d_a, op=nl.exp, data=dt, scale=a_col)
    b_bc = broadcast_row(sel, n, b_rows, p)
    d_bu = nl.ndarray((p, t), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=d_bu, data1=du, data2=b_bc, op=nl.multiply)
    h = nl.ndarray((p, t), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor_scan(dst=h, data0=d_a, data1=d_bu, initial=carry_col, op0=nl.multiply, op1=nl.add)
    nisa.tensor_copy(dst=carry_col, src=h[:, t - 1:t])
    return h, d_a


def _tile_output(y, z, d_col, u_t, b, c0, p, t0, t, y_pre_out=None):
    """y (SBUF accumulator) += D*u (stored to y_pre_out when given), then *= silu(z)."""
    if d_col is not None:
        du_skip = nl.ndarray((p, t), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=du_skip, data=u_t, op0=nl.multiply, operand0=d_col)
        nisa.tensor_tensor(dst=y, data1=y, data2=du_skip, op=nl.add)
    if y_pre_out is not None:
        nisa.dma_copy(dst=y_pre_out[b, c0:c0 + p, t0:t0 + t], src=y)
    if z is not None:
        z_t = nl.ndarray((p, t), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=z_t, src=z[b, c0:c0 + p, t0:t0 + t])
        gate = nl.ndarray((p, t), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=gate, op=nl.silu, data=z_t)
        nisa.tensor_tensor(dst=y, data1=y, data2=gate, op=nl.multiply)


@nki.jit
def selective_scan_fwd(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       initial_state=None, save_for_backward=False):
    """y (batch, dim, L) in u's dtype, and the last state (batch, dim, N) fp32.

    u, delta, z (batch, dim, L); A (dim, N); B, C (batch, N, L); D, delta_bias (dim,);
    initial_state (batch, dim, N) or None. dim any size, L a multiple of 128, N <= 128.
    With save_for_backward, also the state entering each time tile, (batch, dim, N · tiles)
    fp32 (tile k in columns k·N .. k·N + N - 1), and y before the gate, (batch, dim, L) fp32:
    what `selective_scan_bwd` would otherwise recompute in a pass of its own.
    """
    batch, dim, length = u.shape
    n_states = A.shape[1]
    assert length % PMAX == 0 and n_states <= PMAX
    y_out = nl.ndarray((batch, dim, length), dtype=u.dtype, buffer=nl.shared_hbm)
    last = nl.ndarray((batch, dim, n_states), dtype=nl.float32, buffer=nl.shared_hbm)
    n_tiles = (length + SEQ_TILE - 1) // SEQ_TILE
    snaps, y_pre = None, None  # outputs only when saved: an unreturned shared_hbm tensor needs a name
    if save_for_backward:
        snaps = nl.ndarray((batch, dim, n_states * n_tiles), dtype=nl.float32, buffer=nl.shared_hbm)
        y_pre = nl.ndarray((batch, dim, length), dtype=nl.float32, buffer=nl.shared_hbm)
    sel = selectors(n_states, PMAX)
    for b in nl.affine_range(batch):
        for c0 in range(0, dim, PMAX):
            p = min(PMAX, dim - c0)
            a_t = nl.ndarray((p, n_states), dtype=nl.float32, buffer=nl.sbuf)
            nisa.dma_copy(dst=a_t, src=A[c0:c0 + p, :])
            bias = load_column(delta_bias, c0, p, 0.0)
            d_col = load_column(D, c0, p) if D is not None else None
            carry = nl.ndarray((p, n_states), dtype=nl.float32, buffer=nl.sbuf)
            if initial_state is None:
                nisa.memset(dst=carry, value=0.0)
            else:
                nisa.dma_copy(dst=carry, src=initial_state[b, c0:c0 + p, :])
            for k, t0 in enumerate(range(0, length, SEQ_TILE)):
                t = min(SEQ_TILE, length - t0)
                if save_for_backward:
                    nisa.dma_copy(dst=snaps[b, c0:c0 + p, k * n_states:(k + 1) * n_states], src=carry)
                dt, du, u_t = _time_inputs(delta, u, b, c0, p, t0, t, bias, delta_softplus)
                b_rows, c_rows = _state_rows(B, b, t0, t), _state_rows(C, b, t0, t)
                y = nl.ndarray((p, t), dtype=nl.float32, buffer=nl.sbuf)
                for n in range(n_states):
                    h, _ = scan_state(dt, du, a_t[:, n:n + 1], carry[:, n:n + 1], sel, n, b_rows, p, t)
                    c_bc = broadcast_row(sel, n, c_rows, p)
                    if n == 0:
                        nisa.tensor_tensor(dst=y, data1=h, data2=c_bc, op=nl.multiply)
                    else:
                        hc = nl.ndarray((p, t), dtype=nl.float32, buffer=nl.sbuf)
                        nisa.tensor_tensor(dst=hc, data1=h, data2=c_bc, op=nl.multiply)
                        nisa.tensor_tensor(dst=y, data1=y, data2=hc, op=nl.add)
                _tile_output(y, z, d_col, u_t, b, c0, p, t0, t, y_pre if save_for_backward else None)
                nisa.dma_copy(dst=y_out[b, c0:c0 + p, t0:t0 + t], src=y)
            nisa.dma_copy(dst=last[b, c0:c0 + p, :], src=carry)
    if save_for_backward:
        return y_out, last, snaps, y_pre
    return y_out, last
