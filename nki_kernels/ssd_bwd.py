"""Mamba-2 / SSD chunked scan, backward, in NKI 0.2.0.

Same layout as `ssd_fwd`: chunks of T = 128 time steps with *time on the partitions*, so
the intra-chunk work is matmuls on the Tensor engine. Nothing from the forward is saved
but its inputs; per batch

* pass 1, chunks in order: recompute the state entering every chunk, kept transposed
  (S^T (P, N) per head, all heads side by side in one (P, H*N) tile), and store it to an
  HBM scratch (batch, chunks, P, H*N);
* pass 2, chunks in *reverse* order, carrying the state gradient Gam = dL/dS (N, P) per
  head backwards (Gam_c = exp(cs_end) Gam_{c+1} + (C exp(cs))^T dy).

Per chunk and head (i = output time, j = input time, both on partitions; u = dt x,
L[i, j] = exp(cs_i - cs_j) masked to i >= j before the exp, G = C B^T, M = G * L,
w_j = exp(cs_end - cs_j), S = state entering the chunk, Gam = gradient of the state
leaving it):

  dM = dy u^T (matmul of the transposed dy and u)     dG = dM * L
  du = M^T dy + w * (B Gam)                            dx = dt du + D dy
  dB_h = dG^T C + w * (u Gam^T)                        dC_h = dG B + Zh,  Zh = exp(cs) * (dy S^T)
  dcs = C . dC_h - B . dB_h   (= rowsum - colsum of dG * G, plus the state terms)
  da_s = sum_{i >= s} dcs_i + <Gam, S_end>             dD += sum dy x
  ddt = x . du + A da,   dA += sum dt da,   ddt_raw = ddt * sigmoid(dt_raw + bias)

(<Gam, S_end> is the derivative of the chunk's end state with respect to cs_end, which
every step's cumulative sum contains). dB / dC of a group are summed over its heads on
chip; the reverse in-chunk cumulative sum is a matmul with a triangular 0/1 matrix for
all heads at once.
"""

from __future__ import annotations

from nki_kernels.common import PMAX, broadcast_row, identity, ones, selectors, triangle
from nki_kernels.compat import nisa, nki, nl
from nki_kernels.ssd_fwd import CHUNK, NEG_BIG, head_rows, load_bc

F32 = nl.float32


def _sb(shape):
    return nl.ndarray(shape, dtype=F32, buffer=nl.sbuf)


def _ps(shape):
    return nl.ndarray(shape, dtype=F32, buffer=nl.psum)


def _transposed_copy(src, shape):
    """src^T in SBUF (Tensor-engine transpose into PSUM, Vector-engine copy out)."""
    tp = _ps(shape)
    nisa.nc_transpose(dst=tp, data=src)
    out = _sb(shape)
    nisa.tensor_copy(dst=out, src=tp)
    return out


def _transpose_into(src, dst, shape):
    """dst (SBUF) = src^T (Tensor-engine transpose into PSUM, Scalar-engine copy out)."""
    tp = _ps(shape)
    nisa.nc_transpose(dst=tp, data=src)
    nisa.activation(dst=dst, op=nl.copy, data=tp)


def _transpose_pair(a, b, dst):
    """dst (SBUF, (P, 2T)) = [a^T | b^T] for a, b (T, P): two transposes into one PSUM tile, one copy."""
    tp = _ps(dst.shape)
    nisa.nc_transpose(dst=tp[:, 0:CHUNK], data=a)
    nisa.nc_transpose(dst=tp[:, CHUNK:2 * CHUNK], data=b)
    nisa.activation(dst=dst, op=nl.copy, data=tp)


def _chunk_values(k, b, t0):
    """Per chunk, all heads (T, H): dt after bias/softplus, sigmoid' factor, cs, cs^T, exp(cs),
    exp(cs_end) broadcast to every partition, and w = exp(cs_end - cs)."""
    n_heads = k["H"]
    raw = _sb((CHUNK, n_heads))
    nisa.dma_copy(dst=raw, src=k["dt"][b, t0:t0 + CHUNK, :])
    nisa.tensor_tensor(dst=raw, data1=raw, data2=k["bias_rows"], op=nl.add)
    dt_c = _sb((CHUNK, n_heads))
    nisa.activation(dst=dt_c, op=nl.softplus if k["softplus"] else nl.copy, data=raw)
    dta = _sb((CHUNK, n_heads))
    nisa.tensor_tensor(dst=dta, data1=dt_c, data2=k["a_rows"], op=nl.multiply)
    cs_ps = _ps((CHUNK, n_heads))
    nisa.nc_matmul(dst=cs_ps, stationary=k["upper"], moving=dta, is_stationary_onezero=True)
    cs = _sb((CHUNK, n_heads))
    nisa.tensor_copy(dst=cs, src=cs_ps)
    end_ps = _ps((CHUNK, n_heads))  # every partition: the chunk's total = cs_end
    nisa.nc_matmul(dst=end_ps, stationary=k["ones_tt"], moving=dta, is_stationary_onezero=True)
    dec = _sb((CHUNK, n_heads))
    nisa.activation(dst=dec, op=nl.exp, data=end_ps)
    w = _sb((CHUNK, n_heads))
    nisa.tensor_tensor(dst=w, data1=end_ps, data2=cs, op=nl.subtract)
    nisa.activation(dst=w, op=nl.exp, data=w)
    return {"raw": raw, "dt": dt_c, "cs": cs, "dec": dec, "w": w}


def _forward_states(k, b, scratch):
    """Pass 1: S^T (P, H*N) entering chunks 1.., stored to scratch[b, c]."""
    n_heads, n, p, hpg = k["H"], k["N"], k["P"], k["hpg"]
    n_chunks = k["chunks"]
    state = _sb((p, n_heads * n))
    for c in range(n_chunks - 1):
        t0 = c * CHUNK
        v = _chunk_values(k, b, t0)
        for g in range(k["G"]):
            b_nat = _sb((CHUNK, n))
            nisa.dma_copy(dst=b_nat, src=k["B"][b, t0:t0 + CHUNK, g, :])
            for h in range(g * hpg, (g + 1) * hpg):
                x_t = _sb((CHUNK, p))
                nisa.dma_copy(dst=x_t, src=k["x"][b, t0:t0 + CHUNK, h, :])
                xdt = _sb((CHUNK, p))
                nisa.tensor_scalar(dst=xdt, data=x_t, op0=nl.multiply, operand0=v["dt"][:, h:h + 1],
                                   engine=nisa.engine.scalar)
                b_w = _sb((CHUNK, n))
                nisa.tensor_scalar(dst=b_w, data=b_nat, op0=nl.multiply, operand0=v["w"][:, h:h + 1],
                                   engine=nisa.engine.scalar)
                contrib = _ps((p, n))
                nisa.nc_matmul(dst=contrib, stationary=xdt, moving=b_w)
                s_h = state[:, h * n:(h + 1) * n]
                if c == 0:
                    nisa.tensor_copy(dst=s_h, src=contrib)
                else:
                    nisa.tensor_scalar(dst=s_h, data=s_h, op0=nl.multiply, operand0=v["dec"][0:p, h:h + 1],
                                       engine=nisa.engine.scalar)
                    nisa.tensor_tensor(dst=s_h, data1=s_h, data2=contrib, op=nl.add)
        nisa.dma_copy(dst=scratch[b, c + 1], src=state)


class _Chunk(nl.NKIObject):
    """Pass-2 tensors of one chunk (all heads) and the per-head adjoint step.

    The per-head step is split into methods so that each PSUM tile lives only inside the
    method that needs it (the emulator, like a reader, frees a tile when its last
    reference goes; 8 banks must suffice).
    """

    def __init__(self, k, b, c, scratch, gam, s_next_t):
        self.k, self.b, self.c, self.t0 = k, b, c, c * CHUNK
        self.first, self.last = c == 0, c == k["chunks"] - 1  # first: no entering state; last: no Gam yet
        self.gam, self.s_next_t = gam, s_next_t
        n_heads, n, p = k["H"], k["N"], k["P"]
        self.v = _chunk_values(k, b, self.t0)
        self.ecs = _sb((CHUNK, n_heads))
        nisa.activation(dst=self.ecs, op=nl.exp, data=self.v["cs"])
        self.cs_t = _transposed_copy(self.v["cs"], (n_heads, CHUNK))
        self.s_t = None  # S^T (P, H*N) entering this chunk
        if not self.first:
            self.s_t = _sb((p, n_heads * n))
            nisa.dma_copy(dst=self.s_t, src=scratch[b, c])
        self.gam_t = _sb((p, n_heads * n)) if not self.last else None
        self.dcs = _sb((CHUNK, n_heads))  # C.dC_h - B.dB_h
        self.pair = _sb((CHUNK, 2 * n_heads))  # per head: x.du, x.dy

    def group(self, g):
        k, n = self.k, self.k["N"]
        b_nat, b_tr = load_bc(k["B"], self.b, self.t0, g)
        c_nat, c_tr = load_bc(k["C"], self.b, self.t0, g)
        cb = _sb((CHUNK, 2 * n))  # [C | -B]
        nisa.tensor_copy(dst=cb[:, 0:n], src=c_nat)
        nisa.tensor_scalar(dst=cb[:, n:2 * n], data=b_nat, op0=nl.multiply, operand0=-1.0, engine=nisa.engine.scalar)
        gram = _ps((CHUNK, CHUNK))  # G[i, j] = C_i . B_j
        nisa.nc_matmul(dst=gram, stationary=c_tr, moving=b_tr)
        acc = _sb((CHUNK, 2 * n))  # [dC | dB] of the group, summed over its heads
        grp = {"b_nat": b_nat, "b_tr": b_tr, "c_nat": c_nat, "cb": cb, "gram": gram, "acc": acc}
        for i, h in enumerate(range(g * k["hpg"], (g + 1) * k["hpg"])):
            self.head(h, grp, i == 0)
        nisa.dma_copy(dst=k["dC_out"][self.b, self.t0:self.t0 + CHUNK, g, :], src=acc[:, 0:n])
        nisa.dma_copy(dst=k["dB_out"][self.b, self.t0:self.t0 + CHUNK, g, :], src=acc[:, n:2 * n])

    def head(self, h, grp, first_in_group):
        k, b, t0 = self.k, self.b, self.t0
        p = k["P"]
        decay, mat = self._decay(h, grp)
        # inputs; u = dt x; [dy^T | u^T]
        x2, dy_t = _sb((CHUNK, 2 * p)), _sb((CHUNK, p))  # x2 = [x | x]
        nisa.dma_copy(dst=x2[:, 0:p], src=k["x"][b, t0:t0 + CHUNK, h, :])
        nisa.dma_copy(dst=x2[:, p:2 * p], src=k["x"][b, t0:t0 + CHUNK, h, :])
        nisa.dma_copy(dst=dy_t, src=k["dy"][b, t0:t0 + CHUNK, h, :])
        u = _sb((CHUNK, p))
        nisa.tensor_scalar(dst=u, data=x2[:, 0:p], op0=nl.multiply, operand0=self.v["dt"][:, h:h + 1],
                           engine=nisa.engine.scalar)
        tr = _sb((p, 2 * CHUNK))  # [dy^T | u^T]
        _transpose_pair(dy_t, u, tr)
        dg = self._dg(tr, decay)
        self._cb_grads(h, grp, tr, dg, first_in_group)
        self._x_grads(h, grp, mat, dy_t, x2)
        if not self.first:
            self._gam_step(h, grp, dy_t)

    def _decay(self, h, grp):
        """L[i, j] = exp(cs_i - cs_j) (i on partitions), masked to i >= j before the exp; M = G * L."""
        k = self.k
        cs_bc = broadcast_row(k["sel_h"], h, self.cs_t, CHUNK)  # every row: cs_j
        seg = _sb((CHUNK, CHUNK))
        nisa.activation(dst=seg, op=nl.copy, data=cs_bc, scale=-1.0, bias=self.v["cs"][:, h:h + 1])  # cs_i - cs_j
        masked = _sb((CHUNK, CHUNK))
        nisa.affine_select(dst=masked, pattern=[[-1, CHUNK]], offset=0, channel_multiplier=1, on_true_tile=seg,
                           on_false_value=NEG_BIG, cmp_op=nl.greater_equal)
        decay = _sb((CHUNK, CHUNK))
        nisa.activation(dst=decay, op=nl.exp, data=masked)
        mat = _sb((CHUNK, CHUNK))
        nisa.tensor_tensor(dst=mat, data1=decay, data2=grp["gram"], op=nl.multiply)
        return decay, mat

    @staticmethod
    def _dg(tr, decay):
        """dG = dM * L with dM = dy u^T."""
        dm = _ps((CHUNK, CHUNK))
        nisa.nc_matmul(dst=dm, stationary=tr[:, 0:CHUNK], moving=tr[:, CHUNK:2 * CHUNK])
        dg = _sb((CHUNK, CHUNK))
        nisa.tensor_tensor(dst=dg, data1=dm, data2=decay, op=nl.multiply)
        return dg

    def _cb_grads(self, h, grp, tr, dg, first_in_group):
        """This head's [dC | dB] = [dG B | dG^T C] + [Zh | dBs]: into dcs and the group's sum."""
        k, n = self.k, self.k["N"]
        hcb = _ps((CHUNK, 2 * n))
        nisa.nc_matmul(dst=hcb[:, n:2 * n], stationary=dg, moving=grp["c_nat"])  # dB_j = sum_i dG[i,j] C_i
        dg_t = _transposed_copy(dg, (CHUNK, CHUNK))
        nisa.nc_matmul(dst=hcb[:, 0:n], stationary=dg_t, moving=grp["b_nat"])  # dC_i = sum_j dG[i,j] B_j
        if not (self.first and self.last):
            nisa.nc_matmul(dst=hcb, stationary=k["eye"], moving=self._state_terms(h, grp, tr),
                           is_stationary_onezero=True)
        # dcs = C.dC_h - B.dB_h (= rowsum - colsum of dG*G, + C.Zh - B.dBs); group sums of dC, dB
        prod = _sb((CHUNK, 2 * n))
        nisa.tensor_tensor(dst=prod, data1=hcb, data2=grp["cb"], op=nl.multiply)
        nisa.tensor_reduce(dst=self.dcs[:, h:h + 1], op=nl.add, data=prod, axis=1)
        if first_in_group:
            nisa.tensor_copy(dst=grp["acc"], src=hcb)
        else:
            nisa.tensor_tensor(dst=grp["acc"], data1=grp["acc"], data2=hcb, op=nl.add)

    def _state_terms(self, h, grp, tr):
        """[Zh | dBs] = [exp(cs) dy S^T | w u Gam^T] (SBUF); also Gam^T of this head into gam_t."""
        k, v, n, p = self.k, self.v, self.k["N"], self.k["P"]
        small = _ps((CHUNK, 2 * n))  # [dy S^T | u Gam^T] before their row scales
        if not self.last:
            gam_t = self.gam_t[:, h * n:(h + 1) * n]
            _transpose_into(self.gam[:, h * p:(h + 1) * p], gam_t, (p, n))
            nisa.nc_matmul(dst=small[:, n:2 * n], stationary=tr[:, CHUNK:2 * CHUNK], moving=gam_t)
        if not self.first:
            nisa.nc_matmul(dst=small[:, 0:n], stationary=tr[:, 0:CHUNK], moving=self.s_t[:, h * n:(h + 1) * n])
        scaled = _sb((CHUNK, 2 * n))
        if self.first:
            nisa.memset(dst=scaled[:, 0:n], value=0.0)
        else:
            nisa.tensor_scalar(dst=scaled[:, 0:n], data=small[:, 0:n], op0=nl.multiply,
                               operand0=self.ecs[:, h:h + 1], engine=nisa.engine.scalar)
        if self.last:
            nisa.memset(dst=scaled[:, n:2 * n], value=0.0)
        else:
            nisa.tensor_scalar(dst=scaled[:, n:2 * n], data=small[:, n:2 * n], op0=nl.multiply,
                               operand0=v["w"][:, h:h + 1], engine=nisa.engine.scalar)
        return scaled

    def _x_grads(self, h, grp, mat, dy_t, x2):
        """[du | dy] with du = M^T dy (+ w * B Gam); x.du (ddt direct) and x.dy (dD); dx = dt du + D dy."""
        k, v, b, t0, p = self.k, self.v, self.b, self.t0, self.k["P"]
        dudy = _ps((CHUNK, 2 * p))
        nisa.nc_matmul(dst=dudy[:, 0:p], stationary=mat, moving=dy_t)
        nisa.nc_matmul(dst=dudy[:, p:2 * p], stationary=k["eye"], moving=dy_t, is_stationary_onezero=True)
        if not self.last:
            nisa.nc_matmul(dst=dudy[:, 0:p], stationary=k["eye"], moving=self._b_gam(h, grp),
                           is_stationary_onezero=True)
        prod2 = _sb((CHUNK, 2 * p))
        nisa.tensor_tensor(dst=prod2, data1=dudy, data2=x2, op=nl.multiply)
        # NKI numbers tensor_reduce axes from the most minor free axis: axis=1 sums each p-block
        nisa.tensor_reduce(dst=self.pair[:, 2 * h:2 * h + 2], op=nl.add, data=prod2.reshape((CHUNK, 2, p)), axis=1)
        dx = _sb((CHUNK, p))
        nisa.tensor_scalar(dst=dx, data=dudy[:, 0:p], op0=nl.multiply, operand0=v["dt"][:, h:h + 1],
                           engine=nisa.engine.scalar)
        if k["D"] is not None:
            skip = _sb((CHUNK, p))
            nisa.tensor_scalar(dst=skip, data=dy_t, op0=nl.multiply, operand0=k["d_rows"][:, h:h + 1],
                               engine=nisa.engine.scalar)
            nisa.tensor_tensor(dst=dx, data1=dx, data2=skip, op=nl.add)
        nisa.dma_copy(dst=k["dx_out"][b, t0:t0 + CHUNK, h, :], src=dx)

    def _b_gam(self, h, grp):
        """w * (B Gam) of this head (SBUF)."""
        p = self.k["P"]
        bg_ps = _ps((CHUNK, p))
        nisa.nc_matmul(dst=bg_ps, stationary=grp["b_tr"], moving=self.gam[:, h * p:(h + 1) * p])
        bg = _sb((CHUNK, p))
        nisa.tensor_scalar(dst=bg, data=bg_ps, op0=nl.multiply, operand0=self.v["w"][:, h:h + 1],
                           engine=nisa.engine.scalar)
        return bg

    def _gam_step(self, h, grp, dy_t):
        """Gam <- exp(cs_end) Gam + (C exp(cs))^T dy: the gradient of the state entering this chunk."""
        k, v, n, p = self.k, self.v, self.k["N"], self.k["P"]
        c_e = _sb((CHUNK, n))
        nisa.tensor_scalar(dst=c_e, data=grp["c_nat"], op0=nl.multiply, operand0=self.ecs[:, h:h + 1],
                           engine=nisa.engine.scalar)
        new = _ps((n, p))
        nisa.nc_matmul(dst=new, stationary=c_e, moving=dy_t)
        gam = self.gam[:, h * p:(h + 1) * p]
        if self.last:
            nisa.tensor_copy(dst=gam, src=new)
        else:
            nisa.tensor_scalar(dst=gam, data=gam, op0=nl.multiply, operand0=v["dec"][0:n, h:h + 1],
                               engine=nisa.engine.scalar)
            nisa.tensor_tensor(dst=gam, data1=gam, data2=new, op=nl.add)

    def finish(self):
        """da = reverse cumsum(dcs) + <Gam, S_end> for all heads; ddt_raw (stored); dA / dbias / dD partial sums."""
        k, v, b, t0 = self.k, self.v, self.b, self.t0
        n_heads, n, p = k["H"], k["N"], k["P"]
        da = _ps((CHUNK, n_heads))
        nisa.nc_matmul(dst=da, stationary=k["lower"], moving=self.dcs, is_stationary_onezero=True)
        if not self.last:  # d(end state)/d(cs_end) = the end state: <Gam, S_end> reaches every step
            kprod = self.gam_t  # in place: Gam^T is not needed after this
            nisa.tensor_tensor(dst=kprod, data1=self.gam_t, data2=self.s_next_t, op=nl.multiply)
            kp = _sb((p, n_heads))
            nisa.tensor_reduce(dst=kp, op=nl.add, data=kprod.reshape((p, n_heads, n)), axis=1)  # sums each n-block
            nisa.nc_matmul(dst=da, stationary=k["ones_tt"][0:p, :], moving=kp, is_stationary_onezero=True)
        pair = self.pair.reshape((CHUNK, n_heads, 2))
        ddt = _sb((CHUNK, n_heads))
        nisa.tensor_tensor(dst=ddt, data1=da, data2=k["a_rows"], op=nl.multiply)
        nisa.tensor_tensor(dst=ddt, data1=ddt, data2=pair[:, :, 0], op=nl.add)
        da_dt = _sb((CHUNK, n_heads))
        nisa.tensor_tensor(dst=da_dt, data1=da, data2=v["dt"], op=nl.multiply)
        sums = k["sums"]  # (T, 3H): dA | dbias | dD
        nisa.tensor_tensor(dst=sums[:, 0:n_heads], data1=sums[:, 0:n_heads], data2=da_dt, op=nl.add)
        if k["softplus"]:
            sig = _sb((CHUNK, n_heads))
            nisa.activation(dst=sig, op=nl.sigmoid, data=v["raw"])
            nisa.tensor_tensor(dst=ddt, data1=ddt, data2=sig, op=nl.multiply)
        nisa.tensor_tensor(dst=sums[:, n_heads:2 * n_heads], data1=sums[:, n_heads:2 * n_heads], data2=ddt,
                           op=nl.add)
        if k["D"] is not None:
            nisa.tensor_tensor(dst=sums[:, 2 * n_heads:3 * n_heads], data1=sums[:, 2 * n_heads:3 * n_heads],
                               data2=pair[:, :, 1], op=nl.add)
        nisa.dma_copy(dst=k["ddt_out"][b, t0:t0 + CHUNK, :], src=ddt)


def _reverse_chunk(k, b, c, scratch, gam, s_next_t):
    """Pass 2 for chunk c; returns the state entering it (S^T). The chunk's other tiles die on return."""
    ch = _Chunk(k, b, c, scratch, gam, s_next_t)
    for g in range(k["G"]):
        ch.group(g)
    ch.finish()
    return ch.s_t


@nki.jit
def ssd_bwd(dy, x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=True):
    """Gradients of `ssd_fwd`'s y: (dx, ddt, dA, dB, dC, dD, ddt_bias).

    dx in x's dtype, ddt in dt's dtype, dB / dC in B's / C's dtype; dA, dD, ddt_bias (H,)
    fp32 (zeros when D / dt_bias are None). ddt is the gradient of the raw dt (the
    bias and softplus folded in as the reference op does). Shapes as `ssd_fwd`.
    """
    batch, length, n_heads, head_dim = x.shape
    groups, n = B.shape[2], B.shape[3]
    assert length % CHUNK == 0 and head_dim <= PMAX and n <= PMAX and n_heads <= PMAX
    assert n_heads % groups == 0
    n_chunks = length // CHUNK
    ones_row = ones((1, PMAX))
    k = {"dy": dy, "x": x, "dt": dt, "B": B, "C": C, "D": D, "softplus": dt_softplus, "H": n_heads, "N": n,
         "P": head_dim, "G": groups, "hpg": n_heads // groups, "chunks": n_chunks,
         "upper": triangle(CHUNK, lower=False, strict=False), "lower": triangle(CHUNK, lower=True, strict=False),
         "ones_tt": ones((CHUNK, CHUNK)), "ones_col": ones((CHUNK, 1)), "eye": identity(CHUNK),
         "sel_h": selectors(n_heads, PMAX),
         "a_rows": head_rows(A, n_heads, ones_row), "bias_rows": head_rows(dt_bias, n_heads, ones_row),
         "d_rows": head_rows(D, n_heads, ones_row) if D is not None else None}
    k["dx_out"] = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    k["ddt_out"] = nl.ndarray(dt.shape, dtype=dt.dtype, buffer=nl.shared_hbm)
    k["dB_out"] = nl.ndarray(B.shape, dtype=B.dtype, buffer=nl.shared_hbm)
    k["dC_out"] = nl.ndarray(C.shape, dtype=C.dtype, buffer=nl.shared_hbm)
    scratch = nl.ndarray((batch, n_chunks, head_dim, n_heads * n), dtype=F32, buffer=nl.private_hbm)
    k["sums"] = _sb((CHUNK, 3 * n_heads))
    nisa.memset(dst=k["sums"], value=0.0)
    for b in nl.sequential_range(batch):  # sequential: the dA / dbias / dD sums are carried across batches
        _forward_states(k, b, scratch)
        gam = _sb((n, n_heads * head_dim))  # dL/dS of the state leaving the current chunk, per head
        s_next_t = None  # S^T entering the chunk after the current one
        for c in range(n_chunks - 1, -1, -1):
            s_next_t = _reverse_chunk(k, b, c, scratch, gam, s_next_t)
    tot = _ps((1, 3 * n_heads))
    nisa.nc_matmul(dst=tot, stationary=k["ones_col"], moving=k["sums"], is_stationary_onezero=True)
    tot_sb = _sb((1, 3 * n_heads))
    nisa.tensor_copy(dst=tot_sb, src=tot)
    outs = []
    for i in range(3):  # dA, ddt_bias, dD
        out = nl.ndarray((n_heads,), dtype=F32, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=out.reshape((1, n_heads)), src=tot_sb[:, i * n_heads:(i + 1) * n_heads])
        outs.append(out)
    d_a, d_bias, d_d = outs
    return k["dx_out"], k["ddt_out"], d_a, k["dB_out"], k["dC_out"], d_d, d_bias
