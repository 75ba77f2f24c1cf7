"""Fused eidetic-window (B'MOJO) attention, forward, in NKI 0.2.0.

For query ``i`` (chunk ``j = i // c``) one online softmax runs over three key sets,
never concatenated and never forming an L x L score matrix:

* in-context: ``k[t]``,  ``t in (i - w, i]``              (lags 0 .. w - 1)
* fading:     ``k_f[t]``, ``t in (i - w - w_f, i - w]``     (lags w .. w + w_f - 1), or with
  ``fading_overlap`` ``t in (i - w_f, i]`` (lags 0 .. w_f - 1, over the in-context window)
* memory:     the M slots ``mem_k[j]``, with an additive validity bias (0 or -1e30).

Layouts (docs/kernels.md, "Attention"): the bridge passes queries and keys transposed,
head dim on the partitions, so ``Q K^T`` is one matmul with no on-chip transpose:

    qT        (batch, q_heads, d, L)          q, rotated; d <= 128, L a multiple of 128
    kT, v     (batch, kv_heads, d, L), (batch, kv_heads, L, d)
    kfT, vf   the same for the fading stream, or None
    memkT     (batch, kv_heads, n_chunks, d, M);  memv (batch, kv_heads, n_chunks, M, d); or None
    mem_bias  (batch, n_chunks, M) fp32: 0 for a valid slot, -1e30 for an empty one
    -> out (batch, q_heads, L, d) in q's dtype, lse (batch, q_heads, L) fp32 (natural log,
       of the scaled scores).

Tiling: per (batch, kv head, query tile of 128 rows on the partitions) the key ranges of
the tile are planned at trace time (`plan_tile`): each stream's range, clipped at 0, cut
into segments of at most 512 keys (one PSUM bank of fp32 scores); segments wholly outside
a window are never emitted, and a segment gets an `affine_select` mask only for the
window edges (or chunk edges, for memory) that cut through it. The K/V tiles of a query
tile are loaded once and reused by every query head of the GQA group. The query heads of
``LANE_KV_HEADS`` kv heads form the *lanes* of a query tile; their online-softmax steps
are issued in turn, so the engines work on one lane's chain while another lane waits on
its own. Per segment: one ``nc_matmul`` for the scores (queries x keys in PSUM, fp32
accumulation), the memory bias accumulated into the same PSUM tile by a rank-1 matmul,
row max (Vector), exp (Scalar), P transposed per 128-key block on the Tensor engine,
evacuated to SBUF (Vector or Scalar, whichever is less busy) and multiplied with V,
extended by a ones column that yields the row sums, into one PSUM tile; the running
output is rescaled once per step. V blocks come from a pool reused across query tiles
(`VBlockPool`), so their ones column is written once, not on every load. Matmuls run in the inputs'
dtype: bf16 in training (fp32 accumulation in PSUM), fp32 for fp32 inputs (tests).
The in-context segment holding the diagonal goes first, so every row has a finite max
from its first step (masked entries are -1e30, never -inf: no NaN even otherwise).
Requires scale > 0.
"""

from __future__ import annotations

from nki_kernels.common import PMAX, ones
from nki_kernels.compat import nisa, nki, nl

NEG = -1.0e30  # masked score; exp(scale * NEG - m) underflows to exactly 0
SEG = 512  # keys per segment: one PSUM bank of fp32 scores per partition
STEP_SEGMENTS = 4  # segments (PSUM banks) per online-softmax step
LANE_KV_HEADS = 2


class Segment(nl.NKIObject):
    """One online-softmax step of a query tile: `n` keys of `stream` starting at `k0`.

    `conds` are affine_select conditions (offset, free step, channel multiplier), each
    meaning ``offset + step * f + cm * r >= 0`` keeps score (row r, key k0 + f).
    `chunk` is the memory chunk for stream "mem"; `k0` is then the first slot.
    """

    def __init__(self, stream: str, k0: int, n: int, conds: tuple, chunk: int = -1) -> None:
        self.stream = stream  # "ctx", "fad" or "mem"
        self.k0, self.n, self.conds, self.chunk = k0, n, conds, chunk


def _edge_conds(k0: int, n: int, q0: int, lo_lag: int, hi_lag: int) -> tuple:
    """Mask conditions a key block [k0, k0 + n) needs for rows q0.. of the window [i - hi_lag, i - lo_lag]."""
    out = []
    if k0 + n - 1 > q0 - lo_lag:  # some key is later than some row's newest key: keep t <= i - lo_lag
        out.append((q0 - lo_lag - k0, -1, 1))
    if k0 < q0 + PMAX - 1 - hi_lag:  # some key is older than some row's oldest key: keep t >= i - hi_lag
        out.append((k0 - q0 + hi_lag, 1, -1))
    return tuple(out)


def _unmasked_run(stream: str, run: list, segs: list) -> None:
    """Append consecutive unmasked 128-key blocks as segments of up to 512 keys."""
    per_seg = SEG // PMAX
    for i in range(0, len(run), per_seg):
        part = run[i:i + per_seg]
        total = 0
        for block in part:
            total += block[1]
        segs.append(Segment(stream, part[0][0], total, ()))


def window_segments(stream: str, q0: int, lo_lag: int, hi_lag: int, length: int) -> list[Segment]:
    """Segments of keys ``t in [i - hi_lag, i - lo_lag]`` for queries ``i in [q0, q0 + 128)``.

    Keys go in 128-aligned blocks; the blocks an edge of the window cuts through become
    segments of their own (so only they pay for a mask), the blocks between them go in
    unmasked segments of up to 512 keys.
    """
    first = max(0, q0 - hi_lag)
    last = min(length - 1, q0 + PMAX - 1 - lo_lag)
    if last < first:
        return []
    segs: list[Segment] = []
    run: list = []  # consecutive unmasked blocks (k0, n)
    for k0 in range((first // PMAX) * PMAX, last + 1, PMAX):
        n = min(PMAX, last + 1 - k0)
        conds = _edge_conds(k0, n, q0, lo_lag, hi_lag)
        if conds:
            _unmasked_run(stream, run, segs)
            run = []
            segs.append(Segment(stream, k0, n, conds))
        else:
            run.append((k0, n))
    _unmasked_run(stream, run, segs)
    return segs


def memory_segments(q0: int, chunk: int, n_slots: int) -> list[Segment]:
    """Memory segments of the query tile: per chunk it overlaps, its slots, masked to that chunk's rows."""
    segs = []
    for j in range(q0 // chunk, (q0 + PMAX - 1) // chunk + 1):
        conds = []
        if j * chunk > q0:  # rows before the chunk start: q0 + r >= j*c
            conds.append((q0 - j * chunk, 0, 1))
        if (j + 1) * chunk - 1 < q0 + PMAX - 1:  # rows after the chunk end: q0 + r <= (j+1)c - 1
            conds.append(((j + 1) * chunk - 1 - q0, 0, -1))
        for m0 in range(0, n_slots, SEG):
            segs.append(Segment("mem", m0, min(SEG, n_slots - m0), tuple(conds), j))
    return segs


def plan_tile(q0: int, length: int, window: int, fading_window: int, chunk: int, n_slots: int,
              use_fading: bool, use_memory: bool, fading_overlap: bool = False) -> list[Segment]:
    """Every online-softmax step of query tile q0, diagonal (in-context) segment first."""
    segs = window_segments("ctx", q0, 0, window - 1, length)[::-1]
    if use_fading:
        lo_lag, hi_lag = stream_lags("fad", window, fading_window, fading_overlap)
        segs += window_segments("fad", q0, lo_lag, hi_lag, length)
    if use_memory:
        segs += memory_segments(q0, chunk, n_slots)
    return segs


def stream_lags(stream: str, window: int, fading_window: int, fading_overlap: bool = False) -> tuple[int, int]:
    """(nearest, farthest) lag ``i - t`` of the keys a query reads from `stream` ("ctx" or "fad")."""
    if stream == "ctx":
        return 0, window - 1
    nearest = 0 if fading_overlap else window
    return nearest, nearest + fading_window - 1


def plan_steps(plan: list[Segment]) -> list[list[int]]:
    """Online-softmax steps as lists of indices into `plan`: consecutive segments, at most 4
    (PSUM banks of scores) and 2048 keys each."""
    steps: list[list[int]] = []
    keys = 0
    for i, seg in enumerate(plan):
        if steps and len(steps[-1]) < STEP_SEGMENTS and keys + seg.n <= STEP_SEGMENTS * SEG:
            steps[-1].append(i)
            keys += seg.n
        else:
            steps.append([i])
            keys = seg.n
    return steps


class VBlockPool(nl.NKIObject):
    """SBUF V blocks (<= 128 keys, d + 1) reused from query tile to query tile.

    Column d of every V block is 1, so the P.V matmul also yields the softmax row sums;
    it is set once per block, when the block is first allocated, not on every load (on
    GpSimd, which shares the SBUF port with Vector). Two sets alternate by query tile, so
    one group of lanes' loads do not wait for the previous group's P.V matmuls.
    """

    def __init__(self, d: int, dtype) -> None:
        self.d, self.dtype = d, dtype
        self.sets = [[], []]
        self.current = 0
        self.used = 0

    def next_set(self) -> None:
        """Take blocks from the other set from now on, from its first block."""
        self.current = 1 - self.current
        self.used = 0

    def take(self, rows: int):
        blocks = self.sets[self.current]
        if self.used < len(blocks) and blocks[self.used].shape[0] == rows:
            vb = blocks[self.used]
        else:
            vb = nl.ndarray((rows, self.d + 1), dtype=self.dtype, buffer=nl.sbuf)
            nisa.memset(dst=vb[:, self.d:self.d + 1], value=1.0, engine=nisa.engine.gpsimd)
            if self.used < len(blocks):
                blocks[self.used] = vb
            else:
                blocks.append(vb)
        self.used += 1
        return vb


def load_keys(seg: Segment, b: int, g: int, streams: dict, mem_bias, pool: VBlockPool):
    """K^T (d, n), the V blocks (<= 128 keys, d + 1, from `pool`) of a segment, and its bias row (1, n) or None."""
    kT_hbm, v_hbm = streams[seg.stream]
    d = kT_hbm.shape[-2]
    kt = nl.ndarray((d, seg.n), dtype=pool.dtype, buffer=nl.sbuf)
    blocks = []
    bias = None
    mem = seg.stream == "mem"
    if mem:
        nisa.dma_copy(dst=kt, src=kT_hbm[b, g, seg.chunk, :, seg.k0:seg.k0 + seg.n])
        bias = nl.ndarray((1, seg.n), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=bias, src=mem_bias[b, seg.chunk, seg.k0:seg.k0 + seg.n])
    else:
        nisa.dma_copy(dst=kt, src=kT_hbm[b, g, :, seg.k0:seg.k0 + seg.n])
    for f0 in range(0, seg.n, PMAX):
        nb = min(PMAX, seg.n - f0)
        r0 = seg.k0 + f0
        vb = pool.take(nb)
        rows = v_hbm[b, g, seg.chunk, r0:r0 + nb, :] if mem else v_hbm[b, g, r0:r0 + nb, :]
        nisa.dma_copy(dst=vb[:, 0:d], src=rows)
        blocks.append(vb)
    return kt, blocks, bias


def masked_scores(qt, kt, bias, ones_row, seg: Segment, copy_engine: str = "vector"):
    """Scores (128 queries, n keys): PSUM when unmasked, else an SBUF copy with masked entries = NEG."""
    s_ps = nl.ndarray((PMAX, seg.n), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(dst=s_ps, stationary=qt, moving=kt)
    if bias is not None:  # + validity bias of each memory slot, broadcast to every query row
        nisa.nc_matmul(dst=s_ps, stationary=ones_row, moving=bias, is_stationary_onezero=True)
    if not seg.conds:
        return s_ps
    s_sb = nl.ndarray((PMAX, seg.n), dtype=nl.float32, buffer=nl.sbuf)
    if copy_engine == "scalar":
        nisa.activation(dst=s_sb, op=nl.copy, data=s_ps)
    else:
        nisa.tensor_copy(dst=s_sb, src=s_ps)
    for offset, step, cm in seg.conds:
        nisa.affine_select(dst=s_sb, pattern=[[step, seg.n]], offset=offset, channel_multiplier=cm,
                           on_true_tile=s_sb, on_false_value=NEG, cmp_op=nl.greater_equal)
    return s_sb


class Balance(nl.NKIObject):
    """Trace-time estimate of Vector and Scalar busy time (ns), to place the work either can do."""

    CLOCK = {"vector": 1.12, "scalar": 1.4}  # GHz

    def __init__(self) -> None:
        self.ns = {"vector": 0.0, "scalar": 0.0}

    def add(self, engine: str, n: int) -> None:
        self.ns[engine] += (max(64, n) + 60) / self.CLOCK[engine]

    def pick(self, n: int) -> str:
        on_vector = self.ns["vector"] + (max(64, n) + 60) / self.CLOCK["vector"]
        on_scalar = self.ns["scalar"] + (max(64, n) + 60) / self.CLOCK["scalar"]
        engine = "vector" if on_vector <= on_scalar else "scalar"
        self.add(engine, n)
        return engine


def copy_on(engine: str, dst, src) -> None:
    if engine == "scalar":
        nisa.activation(dst=dst, op=nl.copy, data=src)
    else:
        nisa.tensor_copy(dst=dst, src=src)


class SoftmaxState(nl.NKIObject):
    """Running row max m, -scale*m and unnormalised [output | row sum] acc (128, d + 1) of one (head, tile)."""

    def __init__(self) -> None:
        self.m = self.neg_m = self.acc = None


def softmax_step(st: SoftmaxState, scores: list, v_blocks: list, scale: float, dtype, d: int, bal: Balance) -> None:
    """Fold one step (up to 4 segments of scores, their V blocks) into the running softmax state."""
    gp = nisa.engine.gpsimd
    if len(scores) == 1:
        m_step = nl.ndarray((PMAX, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_reduce(dst=m_step, op=nl.maximum, data=scores[0], axis=1)
    else:
        parts = nl.ndarray((PMAX, len(scores)), dtype=nl.float32, buffer=nl.sbuf)
        for i, sc in enumerate(scores):
            nisa.tensor_reduce(dst=parts[:, i:i + 1], op=nl.maximum, data=sc, axis=1)
        m_step = nl.ndarray((PMAX, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_reduce(dst=m_step, op=nl.maximum, data=parts, axis=1)
    for sc in scores:
        bal.add("vector", sc.shape[1])
    first = st.m is None
    if first:
        m_new = m_step
    else:
        m_new = nl.ndarray((PMAX, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=m_new, data1=st.m, data2=m_step, op=nl.maximum, engine=gp)
    neg_m = nl.ndarray((PMAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=neg_m, op=nl.copy, data=m_new, scale=-scale)
    pv = nl.ndarray((PMAX, d + 1), dtype=nl.float32, buffer=nl.psum)
    for sc, blocks in zip(scores, v_blocks):
        n = sc.shape[1]
        p = nl.ndarray((PMAX, n), dtype=dtype, buffer=nl.sbuf)
        nisa.activation(dst=p, op=nl.exp, data=sc, bias=neg_m, scale=scale)
        bal.add("scalar", n)
        # P^T of every 128-key block side by side in one PSUM bank (fp32: a NeuronCore-v2 Tensor-engine
        # transpose writes fp32), evacuated by one copy that casts back to the matmul dtype
        pt_ps = nl.ndarray((PMAX, len(blocks) * PMAX), dtype=nl.float32, buffer=nl.psum)
        for i, vb in enumerate(blocks):
            nb = vb.shape[0]
            nisa.nc_transpose(dst=pt_ps[0:nb, i * PMAX:(i + 1) * PMAX], data=p[:, i * PMAX:i * PMAX + nb])
        pt = nl.ndarray((PMAX, len(blocks) * PMAX), dtype=dtype, buffer=nl.sbuf)
        copy_on(bal.pick(len(blocks) * PMAX), pt, pt_ps)
        for i, vb in enumerate(blocks):
            nisa.nc_matmul(dst=pv, stationary=pt[0:vb.shape[0], i * PMAX:(i + 1) * PMAX], moving=vb)
    if first:
        acc = nl.ndarray((PMAX, d + 1), dtype=nl.float32, buffer=nl.sbuf)
        copy_on(bal.pick(d + 1), acc, pv)
        st.acc = acc
    else:
        corr = nl.ndarray((PMAX, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=corr, op=nl.exp, data=st.m, bias=neg_m, scale=scale)
        bal.add("scalar", 1)
        nisa.activation(dst=st.acc, op=nl.copy, data=st.acc, scale=corr)
        bal.add("scalar", d + 1)
        nisa.tensor_tensor(dst=st.acc, data1=st.acc, data2=pv, op=nl.add)
        bal.add("vector", d + 1)
    st.m, st.neg_m = m_new, neg_m


class Lane(nl.NKIObject):
    """One query head of a query tile: its head index, the K/V tiles it reads, its queries and softmax state."""

    def __init__(self, head: int, keys: list, qt) -> None:
        self.head, self.keys, self.qt = head, keys, qt
        self.state = SoftmaxState()


def load_queries(qT, b: int, h: int, q0: int, d: int, dtype):
    """Q^T of one head's query tile (d, 128)."""
    qt = nl.ndarray((d, PMAX), dtype=dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=qt, src=qT[b, h, :, q0:q0 + PMAX])
    return qt


def finish(st: SoftmaxState, out, lse, b: int, h: int, q0: int, d: int) -> None:
    """out = acc / l (in out's dtype), lse = scale*m + log l (l = the last column of acc)."""
    o_sb = nl.ndarray((PMAX, d), dtype=out.dtype, buffer=nl.sbuf)
    row_sum = st.acc[:, d:d + 1]
    inv = nl.ndarray((PMAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=inv, op=nl.reciprocal, data=row_sum)  # row sums are >= 1: inside the valid range
    nisa.activation(dst=o_sb, op=nl.copy, data=st.acc[:, 0:d], scale=inv)
    nisa.dma_copy(dst=out[b, h, q0:q0 + PMAX, :], src=o_sb)
    log_l = nl.ndarray((PMAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=log_l, op=nl.log, data=row_sum)
    res = nl.ndarray((PMAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=res, data1=log_l, data2=st.neg_m, op=nl.subtract, engine=nisa.engine.gpsimd)
    nisa.dma_copy(dst=lse[b, h, q0:q0 + PMAX], src=res)


def check_config(qT, kT, window: int, fading_window: int, chunk: int, scale: float) -> None:
    batch, q_heads, d, length = qT.shape
    assert length % PMAX == 0, f"eidetic_attention: L ({length}) must be a multiple of {PMAX}"
    assert d <= PMAX, f"eidetic_attention: head_dim ({d}) must be <= {PMAX}"
    assert q_heads % kT.shape[1] == 0, "eidetic_attention: kv heads must divide query heads"
    assert window >= 1 and fading_window >= 0 and chunk >= 1 and scale > 0


@nki.jit
def eidetic_attention_fwd(qT, kT, v, kfT, vf, memkT, memv, mem_bias, window, fading_window, chunk, scale,
                          fading_overlap=False):
    """(out, lse) of B'MOJO attention; layouts in the module docstring."""
    batch, q_heads, d, length = qT.shape
    check_config(qT, kT, window, fading_window, chunk, scale)
    kv_heads = kT.shape[1]
    groups = q_heads // kv_heads
    dtype = qT.dtype
    window = min(window, length)
    use_fading = kfT is not None and fading_window > 0
    n_slots = memkT.shape[-1] if memkT is not None else 0
    use_memory = n_slots > 0
    out = nl.ndarray((batch, q_heads, length, d), dtype=qT.dtype, buffer=nl.shared_hbm)
    lse = nl.ndarray((batch, q_heads, length), dtype=nl.float32, buffer=nl.shared_hbm)
    streams = {"ctx": (kT, v), "fad": (kfT, vf), "mem": (memkT, memv)}
    ones_row = ones((1, PMAX)) if use_memory else None
    for b in nl.affine_range(batch):
        # One pool per batch element: blocks shared across `affine_range` iterations would be a
        # loop-carried dependency the compiler is free to reorder.
        pool = VBlockPool(d, dtype)
        for q0 in range(0, length, PMAX):
            plan = plan_tile(q0, length, window, fading_window, chunk, n_slots, use_fading, use_memory,
                             fading_overlap)
            steps = plan_steps(plan)
            for g0 in range(0, kv_heads, LANE_KV_HEADS):
                pool.next_set()
                lanes = []
                for g in range(g0, min(g0 + LANE_KV_HEADS, kv_heads)):
                    keys = []  # per segment of the plan: (K^T, V blocks, bias row)
                    for seg in plan:
                        keys.append(load_keys(seg, b, g, streams, mem_bias, pool))
                    for h in range(g * groups, (g + 1) * groups):
                        lanes.append(Lane(h, keys, load_queries(qT, b, h, q0, d, dtype)))
                bal = Balance()
                # The lanes' steps are issued in turn, so one lane's exp, transpose and evacuation
                # run while the next lane's scores are on the Tensor engine.
                for step in steps:
                    for lane in lanes:
                        scores, v_blocks = [], []
                        for i in step:
                            seg = plan[i]
                            eng = bal.pick(seg.n) if seg.conds else "vector"
                            kt, blocks, bias = lane.keys[i]
                            scores.append(masked_scores(lane.qt, kt, bias, ones_row, seg, eng))
                            v_blocks.append(blocks)
                        softmax_step(lane.state, scores, v_blocks, scale, dtype, d, bal)
                for lane in lanes:
                    finish(lane.state, out, lse, b, lane.head, q0, d)
    return out, lse
