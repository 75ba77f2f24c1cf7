"""Mamba-2 / SSD chunked scan, forward, in NKI 0.2.0.

Layout (docs/kernels.md): chunks of T = 128 time steps with *time on the partitions*,
so the intra-chunk work is matmuls on the Tensor engine; per head the running state
S (N, P) lives in SBUF (states on partitions) and is carried from chunk to chunk.

Per (batch, chunk):  dt = softplus(dt + bias) and dt*A for all heads (T, H); the in-chunk
                     cumulative sum cs = U^T (dt A) with U upper-triangular ones (one
                     matmul for every head); per group G^T = B C^T (T_j, T_i).
Per head:            seg[j, i] = cs_i - cs_j, masked to i >= j *before* the exp
                     (affine_select to -inf), decay = exp(seg); M^T = G^T * decay;
                     y = M^T.T @ (dt x)  +  (C * exp(cs))^T-matmul with the entering S
                     (both accumulate in one PSUM tile); S <- exp(cs_end) S +
                     (B * exp(cs_end - cs))^T @ (dt x); y += D x.
No exp of a positive argument is ever formed, so nothing overflows.
"""

from __future__ import annotations

from nki_kernels.common import PMAX, broadcast_row, ones, selectors
from nki_kernels.compat import nisa, nki, nl

CHUNK = 128
NEG_BIG = -3.0e38


def head_rows(vec, n_heads, ones_row, fill=0.0):
    """(128, H) SBUF tile whose every partition holds vec (H,) (or `fill`)."""
    out = nl.ndarray((PMAX, n_heads), dtype=nl.float32, buffer=nl.sbuf)
    if vec is None:
        nisa.memset(dst=out, value=fill)
        return out
    row = nl.ndarray((1, n_heads), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=row, src=vec.reshape((1, n_heads)))
    bc = nl.ndarray((PMAX, n_heads), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(dst=bc, stationary=ones_row, moving=row, is_stationary_onezero=True)
    nisa.tensor_copy(dst=out, src=bc)
    return out


def upper_ones(size):
    """U[s, t] = 1 if s <= t: stationary of the in-chunk cumulative sum over partitions."""
    one = ones((size, size))
    tri = nl.ndarray((size, size), dtype=nl.float32, buffer=nl.sbuf)
    nisa.affine_select(dst=tri, pattern=[[1, size]], offset=0, channel_multiplier=-1, on_true_tile=one,
                       on_false_value=0.0, cmp_op=nl.greater_equal)
    return tri


def chunk_dt(dt, b, t0, bias_rows, a_rows, n_heads, dt_softplus, tri):
    """dt (T, H) after bias/softplus, and cs (T, H) = in-chunk cumsum of dt*A, plus cs^T (H, T)."""
    raw = nl.ndarray((CHUNK, n_heads), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=raw, src=dt[b, t0:t0 + CHUNK, :])
    nisa.tensor_tensor(dst=raw, data1=raw, data2=bias_rows, op=nl.add)
    dt_c = nl.ndarray((CHUNK, n_heads), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=dt_c, op=nl.softplus if dt_softplus else nl.copy, data=raw)
    dta = nl.ndarray((CHUNK, n_heads), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=dta, data1=dt_c, data2=a_rows, op=nl.multiply)
    cs_ps = nl.ndarray((CHUNK, n_heads), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(dst=cs_ps, stationary=tri, moving=dta, is_stationary_onezero=True)
    cs = nl.ndarray((CHUNK, n_heads), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=cs, src=cs_ps)
    cs_t_ps = nl.ndarray((n_heads, CHUNK), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_transpose(dst=cs_t_ps, data=cs)
    cs_t = nl.ndarray((n_heads, CHUNK), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=cs_t, src=cs_t_ps)
    return dt_c, cs, cs_t


def load_bc(mat, b, t0, g):
    """B or C of one chunk and group: natural (T, N) and transposed (N, T), fp32."""
    n = mat.shape[3]
    nat = nl.ndarray((CHUNK, n), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=nat, src=mat[b, t0:t0 + CHUNK, g, :])
    tr_ps = nl.ndarray((n, CHUNK), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_transpose(dst=tr_ps, data=nat)
    tr = nl.ndarray((n, CHUNK), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=tr, src=tr_ps)
    return nat, tr


def decay_matrix(cs_bc, cs_col):
    """L^T[j, i] = exp(cs_i - cs_j) for i >= j else 0 (masked before the exp)."""
    seg = nl.ndarray((CHUNK, CHUNK), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=seg, data=cs_bc, op0=nl.subtract, operand0=cs_col)
    masked = nl.ndarray((CHUNK, CHUNK), dtype=nl.float32, buffer=nl.sbuf)
    nisa.affine_select(dst=masked, pattern=[[1, CHUNK]], offset=0, channel_multiplier=-1, on_true_tile=seg,
                       on_false_value=NEG_BIG, cmp_op=nl.greater_equal)
    decay = nl.ndarray((CHUNK, CHUNK), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=decay, op=nl.exp, data=masked)
    return decay


def end_weights(cs_col, cs_bc, n):
    """exp(cs_end - cs_j) (T, 1) and exp(cs_end) (N, 1)."""
    w = nl.ndarray((CHUNK, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=w, op=nl.exp, data=cs_col, scale=-1.0, bias=cs_bc[:, CHUNK - 1:CHUNK])
    dec = nl.ndarray((n, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=dec, op=nl.exp, data=cs_bc[0:n, CHUNK - 1:CHUNK])
    return w, dec


@nki.jit
def ssd_fwd(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=True):
    """y (batch, L, H, P) in x's dtype and the final state (batch, H, P, N) fp32.

    x (batch, L, H, P); dt (batch, L, H); A, D, dt_bias (H,); B, C (batch, L, G, N);
    L a multiple of 128; P, N <= 128; G divides H.
    """
    batch, length, n_heads, head_dim = x.shape
    groups, n = B.shape[2], B.shape[3]
    hpg = n_heads // groups
    assert length % CHUNK == 0 and head_dim <= PMAX and n <= PMAX and n_heads <= PMAX
    y_out = nl.ndarray((batch, length, n_heads, head_dim), dtype=x.dtype, buffer=nl.shared_hbm)
    final = nl.ndarray((batch, n_heads, head_dim, n), dtype=nl.float32, buffer=nl.shared_hbm)
    ones_row = ones((1, PMAX))
    tri = upper_ones(CHUNK)
    sel_h = selectors(n_heads, PMAX)
    a_rows = head_rows(A, n_heads, ones_row)
    bias_rows = head_rows(dt_bias, n_heads, ones_row)
    d_rows = head_rows(D, n_heads, ones_row) if D is not None else None
    for b in nl.affine_range(batch):
        state = nl.ndarray((n, n_heads * head_dim), dtype=nl.float32, buffer=nl.sbuf)
        nisa.memset(dst=state, value=0.0)
        for t0 in range(0, length, CHUNK):
            dt_c, cs, cs_t = chunk_dt(dt, b, t0, bias_rows, a_rows, n_heads, dt_softplus, tri)
            for g in range(groups):
                b_nat, b_tr = load_bc(B, b, t0, g)
                c_nat, c_tr = load_bc(C, b, t0, g)
                gram = nl.ndarray((CHUNK, CHUNK), dtype=nl.float32, buffer=nl.psum)
                nisa.nc_matmul(dst=gram, stationary=b_tr, moving=c_tr)
                for h in range(g * hpg, (g + 1) * hpg):
                    _head_chunk(x, y_out, state, b, t0, h, head_dim, n, dt_c, cs, cs_t, sel_h, gram, b_nat, c_tr,
                                d_rows, first=t0 == 0)
        for h in range(n_heads):
            s_t_ps = nl.ndarray((head_dim, n), dtype=nl.float32, buffer=nl.psum)
            nisa.nc_transpose(dst=s_t_ps, data=state[:, h * head_dim:(h + 1) * head_dim])
            s_t = nl.ndarray((head_dim, n), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_copy(dst=s_t, src=s_t_ps)
            nisa.dma_copy(dst=final[b, h, :, :], src=s_t)
    return y_out, final


def _head_chunk(x, y_out, state, b, t0, h, head_dim, n, dt_c, cs, cs_t, sel_h, gram, b_nat, c_tr, d_rows, first):
    """One head of one chunk: outputs into HBM, state S_h updated in place."""
    cs_bc = broadcast_row(sel_h, h, cs_t, CHUNK)  # (T, T) PSUM, every row = cs of head h
    cs_col = cs[:, h:h + 1]
    m_t = nl.ndarray((CHUNK, CHUNK), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=m_t, data1=decay_matrix(cs_bc, cs_col), data2=gram, op=nl.multiply)
    x_t = nl.ndarray((CHUNK, head_dim), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=x_t, src=x[b, t0:t0 + CHUNK, h, :])
    xdt = nl.ndarray((CHUNK, head_dim), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=xdt, data=x_t, op0=nl.multiply, operand0=dt_c[:, h:h + 1], engine=nisa.engine.scalar)
    y_ps = nl.ndarray((CHUNK, head_dim), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(dst=y_ps, stationary=m_t, moving=xdt)
    s_h = state[:, h * head_dim:(h + 1) * head_dim]
    if not first:
        exp_cs = nl.ndarray((n, CHUNK), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=exp_cs, op=nl.exp, data=cs_bc[0:n, :])
        c_scaled = nl.ndarray((n, CHUNK), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=c_scaled, data1=c_tr, data2=exp_cs, op=nl.multiply)
        nisa.nc_matmul(dst=y_ps, stationary=c_scaled, moving=s_h)  # accumulates onto the intra-chunk y
    w, dec = end_weights(cs_col, cs_bc, n)
    b_w = nl.ndarray((CHUNK, n), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=b_w, data=b_nat, op0=nl.multiply, operand0=w, engine=nisa.engine.scalar)
    contrib = nl.ndarray((n, head_dim), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(dst=contrib, stationary=b_w, moving=xdt)
    nisa.tensor_scalar(dst=s_h, data=s_h, op0=nl.multiply, operand0=dec)
    nisa.tensor_tensor(dst=s_h, data1=s_h, data2=contrib, op=nl.add)
    y_sb = nl.ndarray((CHUNK, head_dim), dtype=nl.float32, buffer=nl.sbuf)
    if d_rows is not None:
        x_d = nl.ndarray((CHUNK, head_dim), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=x_d, data=x_t, op0=nl.multiply, operand0=d_rows[:, h:h + 1], engine=nisa.engine.scalar)
        nisa.tensor_tensor(dst=y_sb, data1=x_d, data2=y_ps, op=nl.add)
    else:
        nisa.tensor_copy(dst=y_sb, src=y_ps)
    nisa.dma_copy(dst=y_out[b, t0:t0 + CHUNK, h, :], src=y_sb)
