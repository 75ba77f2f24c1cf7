"""Fused eidetic-window (B'MOJO) attention, backward, in NKI 0.2.0.

Recomputes the scores of each (query tile, key segment) exactly as the forward
(`attention_fwd.plan_tile`: same segments, same masks), with the saved log-sum-exp
instead of an online max, so P = exp(scale*S - lse) needs no rescaling and no L x L
matrix is stored. Per segment (queries on partitions, keys on the free axis):

    P  = exp(scale*S - lse)                         Scalar, from PSUM
    dP = dO V^T                                     one matmul (stationary dO^T)
    dS = scale * P * (dP - Di),  Di = rowsum(dO*O) - dlse   (Scalar, then GpSimd)
    dV_blk += P_blk^T dO,  dK_blk += dS_blk^T Q     matmuls contracting over the queries
    dQ     += dS_blk K_blk                          dS_blk transposed on the Tensor engine;
                                                    dQ accumulates in one PSUM tile per
                                                    (head, query tile) over all segments

Key gradients of the three streams accumulate in fp32 SBUF tiles, one per 128-key
block (or memory chunk block), summed over the query tiles and the GQA heads that read
them; a block is written to HBM once the last query tile that can read it is done
(blocks no query reads are written as zeros).

Layouts (the bridge prepares both orientations where a matmul needs them):

    q, qT         (batch, q_heads, L, d), (batch, q_heads, d, L)
    k, kT         (batch, kv_heads, L, d), (batch, kv_heads, d, L);   vT (batch, kv_heads, d, L)
    kf, kfT, vfT  the same for the fading stream, or None
    memk, memkT, memvT  (batch, kv_heads, n_chunks, M, d) / (..., d, M) / (..., d, M), or None
    mem_bias      (batch, n_chunks, M) fp32 (0 or -1e30)
    o, do, doT    (batch, q_heads, L, d), (.., L, d), (.., d, L): forward output and its gradient
    lse, dlse     (batch, q_heads, L) fp32 (dlse may be None)
    -> dq (batch, q_heads, L, d), dk, dv, dkf, dvf (batch, kv_heads, L, d) and
       dmemk, dmemv (batch, kv_heads, n_chunks, M, d), all fp32 (None for absent streams).
"""

from __future__ import annotations

from nki_kernels.attention_fwd import PMAX, Segment, check_config, masked_scores, plan_tile, stream_lags
from nki_kernels.common import ones
from nki_kernels.compat import nisa, nki, nl


def _load_segment(seg: Segment, b: int, g: int, src: dict, mem_bias, dtype, d: int):
    """K^T (d, n), V^T (d, n), natural K blocks (<= 128, d), bias row (1, n) or None."""
    k_nat, kT_hbm, vT_hbm = src[seg.stream]
    kt = nl.ndarray((d, seg.n), dtype=dtype, buffer=nl.sbuf)
    vt = nl.ndarray((d, seg.n), dtype=dtype, buffer=nl.sbuf)
    blocks = []
    bias = None
    mem, j = seg.stream == "mem", seg.chunk
    if mem:
        nisa.dma_copy(dst=kt, src=kT_hbm[b, g, j, :, seg.k0:seg.k0 + seg.n])
        nisa.dma_copy(dst=vt, src=vT_hbm[b, g, j, :, seg.k0:seg.k0 + seg.n])
        bias = nl.ndarray((1, seg.n), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=bias, src=mem_bias[b, j, seg.k0:seg.k0 + seg.n])
    else:
        nisa.dma_copy(dst=kt, src=kT_hbm[b, g, :, seg.k0:seg.k0 + seg.n])
        nisa.dma_copy(dst=vt, src=vT_hbm[b, g, :, seg.k0:seg.k0 + seg.n])
    for f0 in range(0, seg.n, PMAX):
        nb = min(PMAX, seg.n - f0)
        r0 = seg.k0 + f0
        kb = nl.ndarray((nb, d), dtype=dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=kb, src=k_nat[b, g, j, r0:r0 + nb, :] if mem else k_nat[b, g, r0:r0 + nb, :])
        blocks.append(kb)
    return kt, vt, blocks, bias


class _BlockGrads(nl.NKIObject):
    """fp32 SBUF accumulators of dK and dV of one key block (stream, memory chunk or -1, block index)."""

    def __init__(self, stream: str, chunk: int, block: int, rows: int, d: int) -> None:
        self.stream, self.chunk, self.block = stream, chunk, block
        self.dk = nl.ndarray((rows, d), dtype=nl.float32, buffer=nl.sbuf)
        self.dv = nl.ndarray((rows, d), dtype=nl.float32, buffer=nl.sbuf)
        nisa.memset(dst=self.dk, value=0.0)
        nisa.memset(dst=self.dv, value=0.0, engine=nisa.engine.gpsimd)


def block_name(stream: str, chunk: int, block: int) -> str:
    """The string key of a key block (NKI dictionaries take string keys only)."""
    return f"{stream}:{chunk}:{block}"


class _Accumulators(nl.NKIObject):
    """The live key blocks' dK / dV accumulators, by block name; flushed to HBM when final."""

    def __init__(self, d: int) -> None:
        self.d = d
        self.tiles = {}

    def get(self, stream: str, chunk: int, block: int, rows: int) -> _BlockGrads:
        name = block_name(stream, chunk, block)
        if name not in self.tiles:
            self.tiles[name] = _BlockGrads(stream, chunk, block, rows, self.d)
        return self.tiles[name]

    def flush(self, name: str, dk_dst, dv_dst) -> None:
        blk = self.tiles.pop(name)
        nisa.dma_copy(dst=dk_dst, src=blk.dk)
        nisa.dma_copy(dst=dv_dst, src=blk.dv)


def _segment_grads(seg: Segment, loaded, head, acc: _Accumulators, dq_ps, ones_row, scale: float, dtype, d: int):
    """One (head, query tile, key segment): accumulate dQ in PSUM, dK/dV of its key blocks in SBUF."""
    kt, vt, k_blocks, bias = loaded
    qt, q_nat, do_nat, doT, neg_lse, neg_sdi = head
    scores = masked_scores(qt, kt, bias, ones_row, seg)
    n = seg.n
    p = nl.ndarray((PMAX, n), dtype=dtype, buffer=nl.sbuf)
    nisa.activation(dst=p, op=nl.exp, data=scores, bias=neg_lse, scale=scale)
    dp_ps = nl.ndarray((PMAX, n), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(dst=dp_ps, stationary=doT, moving=vt)
    t = nl.ndarray((PMAX, n), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=t, op=nl.copy, data=dp_ps, scale=scale, bias=neg_sdi)  # scale * (dP - Di), Scalar
    ds = nl.ndarray((PMAX, n), dtype=dtype, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=ds, data1=t, data2=p, op=nl.multiply, engine=nisa.engine.gpsimd)  # SBUF only: GpSimd
    for i, kb in enumerate(k_blocks):
        f0, nb = i * PMAX, kb.shape[0]
        blk = acc.get(seg.stream, seg.chunk, (seg.k0 + f0) // PMAX, PMAX if seg.stream != "mem" else nb)
        dk_acc, dv_acc = blk.dk, blk.dv
        dv_ps = nl.ndarray((nb, d), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=dv_ps, stationary=p[:, f0:f0 + nb], moving=do_nat)
        nisa.tensor_tensor(dst=dv_acc[0:nb, :], data1=dv_acc[0:nb, :], data2=dv_ps, op=nl.add)
        dk_ps = nl.ndarray((nb, d), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=dk_ps, stationary=ds[:, f0:f0 + nb], moving=q_nat)
        nisa.tensor_tensor(dst=dk_acc[0:nb, :], data1=dk_acc[0:nb, :], data2=dk_ps, op=nl.add)
        dst_ps = nl.ndarray((nb, PMAX), dtype=nl.float32, buffer=nl.psum)  # v2 Tensor-engine transposes write fp32
        nisa.nc_transpose(dst=dst_ps, data=ds[:, f0:f0 + nb])
        dst_sb = nl.ndarray((nb, PMAX), dtype=dtype, buffer=nl.sbuf)
        nisa.activation(dst=dst_sb, op=nl.copy, data=dst_ps)
        nisa.nc_matmul(dst=dq_ps, stationary=dst_sb, moving=kb)


def _load_head(b: int, h: int, q0: int, q, qT, o, do, doT, lse, dlse, dtype, d: int, scale: float):
    """Per (head, query tile): Q^T, Q, dO, dO^T, -lse and -scale*Di, Di = rowsum(dO*O) - dlse."""
    sl = slice(q0, q0 + PMAX)
    qt = nl.ndarray((d, PMAX), dtype=dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=qt, src=qT[b, h, :, sl])
    q_nat = nl.ndarray((PMAX, d), dtype=dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=q_nat, src=q[b, h, sl, :])
    do_nat = nl.ndarray((PMAX, d), dtype=dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=do_nat, src=do[b, h, sl, :])
    dot = nl.ndarray((d, PMAX), dtype=dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=dot, src=doT[b, h, :, sl])
    o_nat = nl.ndarray((PMAX, d), dtype=o.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=o_nat, src=o[b, h, sl, :])
    prod = nl.ndarray((PMAX, d), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=prod, data1=do_nat, data2=o_nat, op=nl.multiply)
    di = nl.ndarray((PMAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=di, op=nl.add, data=prod, axis=1)
    if dlse is not None:
        dl = nl.ndarray((PMAX, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=dl, src=dlse[b, h, sl])
        nisa.tensor_tensor(dst=di, data1=di, data2=dl, op=nl.subtract)
    ls = nl.ndarray((PMAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=ls, src=lse[b, h, sl])
    neg_lse = nl.ndarray((PMAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=neg_lse, op=nl.copy, data=ls, scale=-1.0)
    neg_sdi = nl.ndarray((PMAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=neg_sdi, op=nl.copy, data=di, scale=-scale)
    return qt, q_nat, do_nat, dot, neg_lse, neg_sdi


def _last_tile(blk: _BlockGrads, length: int, window: int, fading_window: int, chunk: int,
               fading_overlap: bool) -> int:
    """Index of the last query tile that can read key block `blk`."""
    if blk.stream == "mem":
        return (min(length, (blk.chunk + 1) * chunk) - 1) // PMAX
    _, hi_lag = stream_lags(blk.stream, window, fading_window, fading_overlap)
    return min(length - 1, blk.block * PMAX + PMAX - 1 + hi_lag) // PMAX


def _out_views(grads: dict, n_slots: int, stream: str, j: int, blk: int, b: int, g: int) -> tuple:
    """The HBM (dK, dV) views of key block `blk` of `stream` (memory chunk `j`) for batch b, kv head g."""
    dk_hbm, dv_hbm = grads[stream]
    if stream == "mem":
        a, z = blk * PMAX, min(n_slots, blk * PMAX + PMAX)
        return dk_hbm[b, g, j, a:z, :], dv_hbm[b, g, j, a:z, :]
    return dk_hbm[b, g, blk * PMAX:(blk + 1) * PMAX, :], dv_hbm[b, g, blk * PMAX:(blk + 1) * PMAX, :]


def _flush(acc: _Accumulators, name: str, grads: dict, n_slots: int, b: int, g: int, done: dict) -> None:
    blk = acc.tiles[name]
    dk_view, dv_view = _out_views(grads, n_slots, blk.stream, blk.chunk, blk.block, b, g)
    acc.flush(name, dk_view, dv_view)
    done[name] = True


@nki.jit
def eidetic_attention_bwd(q, qT, k, kT, vT, kf, kfT, vfT, memk, memkT, memvT, mem_bias, o, do, doT, lse, dlse,
                          window, fading_window, chunk, scale, fading_overlap=False):
    """Gradients of B'MOJO attention; layouts in the module docstring."""
    batch, q_heads, d, length = qT.shape
    check_config(qT, kT, window, fading_window, chunk, scale)
    kv_heads = kT.shape[1]
    groups = q_heads // kv_heads
    dtype = qT.dtype
    window = min(window, length)
    use_fading = kfT is not None and fading_window > 0
    n_slots = memkT.shape[-1] if memkT is not None else 0
    use_memory = n_slots > 0
    n_chunks = memkT.shape[2] if use_memory else 0
    f32, hbm = nl.float32, nl.shared_hbm
    dq = nl.ndarray((batch, q_heads, length, d), dtype=f32, buffer=hbm)
    kv_shape = (batch, kv_heads, length, d)
    grads = {"ctx": (nl.ndarray(kv_shape, dtype=f32, buffer=hbm), nl.ndarray(kv_shape, dtype=f32, buffer=hbm))}
    if use_fading:
        grads["fad"] = (nl.ndarray(kv_shape, dtype=f32, buffer=hbm), nl.ndarray(kv_shape, dtype=f32, buffer=hbm))
    if use_memory:
        mem_shape = (batch, kv_heads, n_chunks, n_slots, d)
        grads["mem"] = (nl.ndarray(mem_shape, dtype=f32, buffer=hbm), nl.ndarray(mem_shape, dtype=f32, buffer=hbm))
    src = {"ctx": (k, kT, vT), "fad": (kf, kfT, vfT), "mem": (memk, memkT, memvT)}
    ones_row = ones((1, PMAX)) if use_memory else None
    zero = nl.ndarray((PMAX, d), dtype=f32, buffer=nl.sbuf)
    nisa.memset(dst=zero, value=0.0)
    n_tiles = length // PMAX
    for b in nl.affine_range(batch):
        for g in nl.affine_range(kv_heads):
            acc = _Accumulators(d)
            done = {}  # names of the key blocks already written
            for tile in range(n_tiles):
                q0 = tile * PMAX
                plan = plan_tile(q0, length, window, fading_window, chunk, n_slots, use_fading, use_memory,
                                 fading_overlap)
                loaded = [_load_segment(seg, b, g, src, mem_bias, dtype, d) for seg in plan]
                for h in range(g * groups, (g + 1) * groups):
                    head = _load_head(b, h, q0, q, qT, o, do, doT, lse, dlse, dtype, d, scale)
                    dq_ps = nl.ndarray((PMAX, d), dtype=f32, buffer=nl.psum)
                    for seg, seg_loaded in zip(plan, loaded):
                        _segment_grads(seg, seg_loaded, head, acc, dq_ps, ones_row, scale, dtype, d)
                    dq_sb = nl.ndarray((PMAX, d), dtype=f32, buffer=nl.sbuf)
                    nisa.tensor_copy(dst=dq_sb, src=dq_ps)
                    nisa.dma_copy(dst=dq[b, h, q0:q0 + PMAX, :], src=dq_sb)
                final = [name for name, blk in acc.tiles.items()
                         if _last_tile(blk, length, window, fading_window, chunk, fading_overlap) <= tile]
                for name in final:
                    _flush(acc, name, grads, n_slots, b, g, done)
            for name in list(acc.tiles):
                _flush(acc, name, grads, n_slots, b, g, done)
            # blocks no query reads (e.g. the last w keys of the fading stream) get zeros
            for stream in grads:
                blocks = ([(j, blk) for j in range(n_chunks) for blk in range(-(-n_slots // PMAX))]
                          if stream == "mem" else [(-1, blk) for blk in range(n_tiles)])
                for j, blk in blocks:
                    if block_name(stream, j, blk) not in done:
                        for view in _out_views(grads, n_slots, stream, j, blk, b, g):
                            nisa.dma_copy(dst=view, src=zero[0:view.shape[0], :])
    return (dq, grads["ctx"][0], grads["ctx"][1], grads.get("fad", (None, None))[0], grads.get("fad", (None, None))[1],
            grads.get("mem", (None, None))[0], grads.get("mem", (None, None))[1])
