"""Fused eidetic-window (B'MOJO) attention, forward, in NKI 0.2.0.

For query ``i`` (chunk ``j = i // c``) one softmax runs over three key sets, never
concatenated and never forming an L x L score matrix:

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

Tiling: per (batch, query tile of 128 rows) the key ranges of the tile are planned at
trace time (`plan_tile`): each stream's range, clipped at 0, cut into segments of at most
512 keys; segments wholly outside a window are never emitted, and a segment is masked
only for the window edges (or chunk edges, for memory) that cut through it. A *unit* is
up to ``LANES`` query heads of a query tile (K/V loaded once per kv head of the unit).
Per unit and query head, two passes over the tile's keys, with no online rescaling:

1. Row max: ``S = Q K^T`` (queries on the partitions) two PSUM banks at a time, the
   window-edge masks (0 / NEG, built once by ``affine_select``) and the memory validity
   bias added into the same PSUM tile by matmuls, then ``tensor_reduce`` max (Vector,
   straight from PSUM); the pieces' maxima are combined on GpSimd. -m enters pass 2
   rounded to the matmul dtype (exact as a matmul operand), and the lse uses m so rounded.
2. ``P^T`` directly: per block of 128 keys, ``S^T = K Q^T`` (keys on the partitions; the
   masks and bias added transposed), and ``-m[q]`` added by one more matmul, ones (128,
   keys) as stationary and ``diag(-m)`` as moving; then ``exp(scale * .)`` from PSUM
   straight into SBUF (Scalar) is ``P^T``, the stationary of ``P V`` (V extended by a
   ones column, so the same matmul yields the row sums l) accumulated in one PSUM tile
   over every key of the tile. Nothing is transposed on the Tensor engine and nothing is
   copied out of PSUM but the final [O | l].

Per key that is two PSUM reads (the max on Vector, the exp on Scalar, which share the
PSUM port on NeuronCore-v2) against three for an online softmax over P (max, exp and the
evacuation of the transposed P), for one more Tensor-engine pass (K Q^T and the -m
matmul replace the transpose). The units run as a software pipeline, so that the
in-order engines rarely wait on each other's chains: unit i + 2 is loaded; unit i + 1's
row max is issued one piece at a time between unit i's exps (Vector and Scalar take turns
on the PSUM port) and its first S^T tiles before unit i's last P V; unit i - 1's outputs
are finished in steps between unit i's exps ([O | l] out of PSUM, then log l, then the
lse, each one exp after the previous). V blocks come from a pool of three
sets reused across units (`VBlockPool`), so their ones column is written once. Matmuls run
in the inputs' dtype: bf16 in training (fp32 accumulation in PSUM), fp32 for fp32 inputs
(tests). Every row has a finite max (its own key at lag 0); masked scores are -1e30,
never -inf, so no row ever computes inf - inf.
Requires scale > 0.
"""

from __future__ import annotations

from nki_kernels.common import PMAX, identity, ones
from nki_kernels.compat import nisa, nki, nl

NEG = -1.0e30  # mask value added to a score; exp(scale * (NEG + s - m)) underflows to exactly 0
SEG = 512  # keys per segment: one PSUM bank of fp32 scores per partition
PIECE = 2 * SEG  # score columns per PSUM tile of the row max (two banks)
GROUP_BLOCKS = 2 * SEG // PMAX  # key blocks per S^T PSUM tile and exp (two banks of 4 x 128 queries)
LANES = 2  # query heads per unit of the software pipeline
LOOKAHEAD = 1  # S^T banks each lane keeps open ahead of its exp
KV_SBUF_BUDGET = 128 * 1024  # bytes per partition for the K/V of the three units in flight


class Segment(nl.NKIObject):
    """A run of keys of a query tile: `n` keys of `stream` starting at `k0`.

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
    """Every segment of keys query tile q0 reads, diagonal (in-context) segment first."""
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



class KeyBlock(nl.NKIObject):
    """Up to 128 consecutive keys of one segment of the plan: keys ``f0 .. f0 + n`` of segment `seg`,
    at columns ``col .. col + n`` of the query tile's row of scores."""

    def __init__(self, seg: int, f0: int, n: int, col: int) -> None:
        self.seg, self.f0, self.n, self.col = seg, f0, n, col


def key_blocks(plan: list[Segment]) -> list[KeyBlock]:
    """The plan's keys in blocks of at most 128 (one partition tile of S^T each), in plan order."""
    blocks = []
    col = 0
    for i, seg in enumerate(plan):
        for f0 in range(0, seg.n, PMAX):
            n = min(PMAX, seg.n - f0)
            blocks.append(KeyBlock(i, f0, n, col))
            col += n
    return blocks


def bank_pieces(c0: int, c1: int, lo: int, hi: int) -> list:
    """(start, end) pieces of columns [c0, c1) inside [lo, hi), cut at PSUM bank boundaries (every 512
    columns of fp32, counted from `lo`, where the PSUM tile starts): a matmul writes one bank."""
    out = []
    a = max(c0, lo)
    end = min(c1, hi)
    while a < end:
        b = min(end, lo + ((a - lo) // SEG + 1) * SEG)
        out.append((a, b))
        a = b
    return out


class Constants(nl.NKIObject):
    """Tiles every query tile reuses: identity, negated identity and ones (the Tensor engine's adders),
    the window-edge masks by their conditions, and each memory chunk's validity bias row."""

    def __init__(self, dtype) -> None:
        self.dtype = dtype
        eye32 = identity(PMAX)
        self.eye = nl.ndarray((PMAX, PMAX), dtype=dtype, buffer=nl.sbuf)
        nisa.tensor_copy(dst=self.eye, src=eye32, engine=nisa.engine.gpsimd)
        self.neg_eye = nl.ndarray((PMAX, PMAX), dtype=dtype, buffer=nl.sbuf)
        nisa.activation(dst=self.neg_eye, op=nl.copy, data=eye32, scale=-1.0)
        self.ones = ones((PMAX, PMAX), dtype)
        self.masks = {}  # conditions (as text) -> (mask (128 queries, n keys), its transpose)
        # Chunk-edge masks of memory segments (conditions on the query row only) differ from query tile to
        # query tile when the chunk is not a multiple of 128: kept for the current and the previous tile only.
        self.row_masks, self.old_row_masks = {}, {}
        self.tile_q0 = -1
        self.bias_rows = {}  # "chunk:first slot" -> (1, n) validity bias in the matmul dtype, this tile's
        self.old_bias_rows = {}  # and the previous tile's


def mask_pair(consts: Constants, conds: tuple, f0: int, n: int):
    """Additive masks (0 kept, NEG dropped) of keys f0 .. f0 + n of a segment with affine conditions
    `conds`: as (128 queries, n keys) for the scores and as (n keys, 128 queries) for their transpose.
    Built once per distinct set of conditions (GpSimd), then added on the Tensor engine."""
    key = str(n)
    for offset, step, cm in conds:
        key = key + ";" + str(offset + step * f0) + "," + str(step) + "," + str(cm)
    row_only = True
    for cond in conds:
        row_only = row_only and cond[1] == 0
    cache = consts.row_masks if row_only else consts.masks
    if key in cache:
        return cache[key]
    if row_only and key in consts.old_row_masks:
        return consts.old_row_masks[key]
    gp = nisa.engine.gpsimd
    rows = nl.ndarray((PMAX, n), dtype=consts.dtype, buffer=nl.sbuf)
    cols = nl.ndarray((n, PMAX), dtype=consts.dtype, buffer=nl.sbuf)
    nisa.memset(dst=rows, value=0.0, engine=gp)
    nisa.memset(dst=cols, value=0.0, engine=gp)
    for offset, step, cm in conds:  # keep where offset + step * (f0 + key) + cm * row >= 0
        nisa.affine_select(dst=rows, pattern=[[step, n]], offset=offset + step * f0, channel_multiplier=cm,
                           on_true_tile=rows, on_false_value=NEG, cmp_op=nl.greater_equal)
        nisa.affine_select(dst=cols, pattern=[[cm, PMAX]], offset=offset + step * f0, channel_multiplier=step,
                           on_true_tile=cols, on_false_value=NEG, cmp_op=nl.greater_equal)
    cache[key] = (rows, cols)
    return rows, cols


def memory_bias_row(consts: Constants, mem_bias, b: int, seg: Segment):
    """The validity bias (1, n) of a memory segment in the matmul dtype, loaded once per chunk and query
    tile (kept for the current and the previous query tile, which share most chunks)."""
    key = str(seg.chunk) + ":" + str(seg.k0)
    if key in consts.bias_rows:
        return consts.bias_rows[key]
    if key in consts.old_bias_rows:
        consts.bias_rows[key] = consts.old_bias_rows[key]
        return consts.bias_rows[key]
    raw = nl.ndarray((1, seg.n), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=raw, src=mem_bias[b, seg.chunk, seg.k0:seg.k0 + seg.n])
    row = raw
    if consts.dtype != nl.float32:
        row = nl.ndarray((1, seg.n), dtype=consts.dtype, buffer=nl.sbuf)
        nisa.tensor_copy(dst=row, src=raw, engine=nisa.engine.gpsimd)
    consts.bias_rows[key] = row
    return row


class VBlockPool(nl.NKIObject):
    """SBUF V blocks (<= 128 keys, d + 1) reused from query tile to query tile.

    Column d of every V block is 1, so the P.V matmul also yields the softmax row sums;
    it is set once per block, when the block is first allocated, not on every load (on
    GpSimd, which shares the SBUF port with Vector). Three sets rotate by unit: the software
    pipeline holds the K/V of three units (one running, one scored, one loading).
    """

    def __init__(self, d: int, dtype) -> None:
        self.d, self.dtype = d, dtype
        self.sets = [[], [], []]
        self.current = 0
        self.used = 0

    def next_set(self) -> None:
        """Take blocks from the other set from now on, from its first block."""
        self.current = (self.current + 1) % len(self.sets)
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


def load_keys(seg: Segment, b: int, g: int, streams: dict, pool: VBlockPool):
    """K^T (d, n) of a segment and its V blocks (<= 128 keys, d + 1, from `pool`)."""
    kT_hbm, v_hbm = streams[seg.stream]
    d = kT_hbm.shape[-2]
    kt = nl.ndarray((d, seg.n), dtype=pool.dtype, buffer=nl.sbuf)
    mem = seg.stream == "mem"
    if mem:
        nisa.dma_copy(dst=kt, src=kT_hbm[b, g, seg.chunk, :, seg.k0:seg.k0 + seg.n])
    else:
        nisa.dma_copy(dst=kt, src=kT_hbm[b, g, :, seg.k0:seg.k0 + seg.n])
    blocks = []
    for f0 in range(0, seg.n, PMAX):
        nb = min(PMAX, seg.n - f0)
        r0 = seg.k0 + f0
        vb = pool.take(nb)
        rows = v_hbm[b, g, seg.chunk, r0:r0 + nb, :] if mem else v_hbm[b, g, r0:r0 + nb, :]
        nisa.dma_copy(dst=vb[:, 0:d], src=rows)
        blocks.append(vb)
    return kt, blocks


class Lane(nl.NKIObject):
    """One query head of a query tile: its head, queries, the K/V tiles and bias rows it reads (per
    segment of the plan), then its row max and the P.V accumulator."""

    def __init__(self, head: int, qt, keys: list, biases: list) -> None:
        self.head, self.qt, self.keys, self.biases = head, qt, keys, biases
        self.m = self.parts = self.m_used = self.diag = self.pv = self.acc = None
        self.st = []  # S^T PSUM tiles in flight, one per group of GROUP_BLOCKS key blocks


def load_queries(qT, b: int, h: int, q0: int, d: int, dtype):
    """Q^T of one head's query tile (d, 128)."""
    qt = nl.ndarray((d, PMAX), dtype=dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=qt, src=qT[b, h, :, q0:q0 + PMAX])
    return qt


def max_pieces(blocks: list[KeyBlock]) -> int:
    """PSUM tiles (of PIECE score columns) the row max of a query tile reads."""
    total = blocks[-1].col + blocks[-1].n
    return (total + PIECE - 1) // PIECE


def row_max_piece(lane: Lane, plan: list[Segment], blocks: list[KeyBlock], consts: Constants, p: int) -> None:
    """Piece p of lane.m (128, 1) fp32, the max over every key of the tile of the masked scores
    S = Q K^T.

    S lives only in PSUM, PIECE columns at a time; window-edge masks and memory biases are added there
    by matmuls. Each piece's max goes to a column of lane.parts and is folded into lane.m on GpSimd as
    it arrives (GpSimd is idle; Vector is the engine that reads PSUM), so one small op follows the
    last piece. Pieces are issued one at a time, between exps of the unit in flight, so that the two
    take turns on the PSUM port.
    """
    total = blocks[-1].col + blocks[-1].n
    pieces = max_pieces(blocks)
    if p == 0:
        lane.m = nl.ndarray((PMAX, 1), dtype=nl.float32, buffer=nl.sbuf)
        lane.parts = nl.ndarray((PMAX, pieces), dtype=nl.float32, buffer=nl.sbuf) if pieces > 1 else None
    lo = p * PIECE
    hi = min(total, lo + PIECE)
    s_ps = nl.ndarray((PMAX, hi - lo), dtype=nl.float32, buffer=nl.psum)
    for i, seg in enumerate(plan):  # Q K^T, one matmul per segment and bank
        c0 = blocks[lane_first_block(plan, i)].col
        kt = lane.keys[i][0]
        for a, e in bank_pieces(c0, c0 + seg.n, lo, hi):
            nisa.nc_matmul(dst=s_ps[:, a - lo:e - lo], stationary=lane.qt, moving=kt[:, a - c0:e - c0])
        if lane.biases[i] is not None:  # + each memory slot's validity bias, on every query row
            for a, e in bank_pieces(c0, c0 + seg.n, lo, hi):
                nisa.nc_matmul(dst=s_ps[:, a - lo:e - lo], stationary=consts.ones[0:1, :],
                               moving=lane.biases[i][:, a - c0:e - c0], is_stationary_onezero=True)
    for blk in blocks:  # + NEG where a window or chunk edge drops a key
        conds = plan[blk.seg].conds
        if conds:
            rows = mask_pair(consts, conds, blk.f0, blk.n)[0]
            for a, e in bank_pieces(blk.col, blk.col + blk.n, lo, hi):
                nisa.nc_matmul(dst=s_ps[:, a - lo:e - lo], stationary=consts.eye,
                               moving=rows[:, a - blk.col:e - blk.col], is_stationary_onezero=True)
    if pieces == 1:
        nisa.tensor_reduce(dst=lane.m, op=nl.maximum, data=s_ps, axis=1)
        return
    nisa.tensor_reduce(dst=lane.parts[:, p:p + 1], op=nl.maximum, data=s_ps, axis=1)
    if p > 0:  # fold into the running max as the pieces arrive: one GpSimd op after the last
        nisa.tensor_tensor(dst=lane.m, data1=lane.parts[:, 0:1] if p == 1 else lane.m,
                           data2=lane.parts[:, p:p + 1], op=nl.maximum, engine=nisa.engine.gpsimd)


def lane_first_block(plan: list[Segment], seg_index: int) -> int:
    """Index in `key_blocks(plan)` of the first block of segment seg_index."""
    first = 0
    for i in range(seg_index):
        first += (plan[i].n + PMAX - 1) // PMAX
    return first


def row_max(lane: Lane, plan: list[Segment], blocks: list[KeyBlock], consts: Constants) -> None:
    """Every piece of `row_max_piece`, in order."""
    for p in range(max_pieces(blocks)):
        row_max_piece(lane, plan, blocks, consts, p)


def shift_tile(lane: Lane, consts: Constants) -> None:
    """diag(-m) (128, 128) in the matmul dtype: as moving operand under a ones stationary it adds -m[q]
    to every key row of a block of S^T (queries on the free axis, where the Scalar engine has no
    per-column bias). The rounding of -m to that dtype happens here; lane.m_used = m so rounded
    (for the lse) is made after, off the path to the exps."""
    diag = nl.ndarray((PMAX, PMAX), dtype=consts.dtype, buffer=nl.sbuf)
    nisa.activation(dst=diag, op=nl.copy, data=consts.neg_eye, scale=lane.m)
    lane.diag = diag
    lane.m_used = lane.m
    if consts.dtype != nl.float32:
        rounded = nl.ndarray((PMAX, 1), dtype=consts.dtype, buffer=nl.sbuf)
        nisa.tensor_copy(dst=rounded, src=lane.m, engine=nisa.engine.gpsimd)
        lane.m_used = rounded


def transposed_scores(lane: Lane, plan: list[Segment], blocks: list[KeyBlock], consts: Constants, g0: int) -> None:
    """Open the S^T PSUM tile of the GROUP_BLOCKS key blocks from g0: K Q^T per block (keys on the partitions), plus
    its masks and memory bias. The -m shift comes later (`probabilities`), once the row max is known."""
    group = blocks[g0:g0 + GROUP_BLOCKS]
    st = nl.ndarray((PMAX, len(group) * PMAX), dtype=nl.float32, buffer=nl.psum)
    for i, blk in enumerate(group):
        seg = plan[blk.seg]
        dst = st[0:blk.n, i * PMAX:(i + 1) * PMAX]
        nisa.nc_matmul(dst=dst, stationary=lane.keys[blk.seg][0][:, blk.f0:blk.f0 + blk.n], moving=lane.qt)
        if seg.conds:
            cols = mask_pair(consts, seg.conds, blk.f0, blk.n)[1]
            nisa.nc_matmul(dst=dst, stationary=consts.eye[0:blk.n, 0:blk.n], moving=cols,
                           is_stationary_onezero=True)
        bias = lane.biases[blk.seg]
        if bias is not None:
            nisa.nc_matmul(dst=dst, stationary=bias[:, blk.f0:blk.f0 + blk.n], moving=consts.ones[0:1, :],
                           is_moving_onezero=True)
    lane.st.append(st)


def probabilities(lane: Lane, blocks: list[KeyBlock], consts: Constants, g0: int, scale: float):
    """P^T (keys, GROUP_BLOCKS x 128 queries) of the blocks from g0 in the matmul dtype: the -m shift added to the
    open S^T bank by one matmul per block, then exp(scale * .) straight from PSUM into SBUF."""
    group = blocks[g0:g0 + GROUP_BLOCKS]
    if lane.diag is None:
        shift_tile(lane, consts)
    st = lane.st.pop(0)
    for i, blk in enumerate(group):
        nisa.nc_matmul(dst=st[0:blk.n, i * PMAX:(i + 1) * PMAX], stationary=consts.ones[:, 0:blk.n],
                       moving=lane.diag, is_stationary_onezero=True)
    pt = nl.ndarray((PMAX, len(group) * PMAX), dtype=consts.dtype, buffer=nl.sbuf)
    full = 0
    while full < len(group) and group[full].n == PMAX:
        full += 1
    if full > 0:
        nisa.activation(dst=pt[:, 0:full * PMAX], op=nl.exp, data=st[:, 0:full * PMAX], scale=scale)
    for i in range(full, len(group)):  # a short block: only its key rows were written
        n = group[i].n
        nisa.activation(dst=pt[0:n, i * PMAX:(i + 1) * PMAX], op=nl.exp, data=st[0:n, i * PMAX:(i + 1) * PMAX],
                        scale=scale)
    return pt


def accumulate_pv(lane: Lane, blocks: list[KeyBlock], g0: int, pt, d: int) -> None:
    """[O | l] += P V over the GROUP_BLOCKS blocks from g0 (V extended by its ones column: l = the row sums)."""
    if lane.pv is None:
        lane.pv = nl.ndarray((PMAX, d + 1), dtype=nl.float32, buffer=nl.psum)
    for i, blk in enumerate(blocks[g0:g0 + GROUP_BLOCKS]):
        vb = lane.keys[blk.seg][1][blk.f0 // PMAX]
        nisa.nc_matmul(dst=lane.pv, stationary=pt[0:blk.n, i * PMAX:(i + 1) * PMAX], moving=vb)


def finish_copy(lane: Lane, d: int) -> None:
    """[O | l] out of PSUM once (Scalar), freeing the lane's P V bank."""
    acc = nl.ndarray((PMAX, d + 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=acc, op=nl.copy, data=lane.pv)
    lane.pv = None
    lane.acc = acc


def finish_output(lane: Lane, out, b: int, q0: int, d: int) -> None:
    """out = O / l (in out's dtype) on Vector, from the copy of [O | l]."""
    inv = nl.ndarray((PMAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.reciprocal(dst=inv, data=lane.acc[:, d:d + 1])  # l >= ~1 (the max's own key)
    o_sb = nl.ndarray((PMAX, d), dtype=out.dtype, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=o_sb, data=lane.acc[:, 0:d], op0=nl.multiply, operand0=inv)
    nisa.dma_copy(dst=out[b, lane.head, q0:q0 + PMAX, :], src=o_sb)


def finish_log(lane: Lane, d: int) -> None:
    """log l (Scalar). Issued an exp after `finish_output`: the log waits on the copy, and the in-order
    Scalar engine should not."""
    log_l = nl.ndarray((PMAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=log_l, op=nl.log, data=lane.acc[:, d:d + 1])
    lane.acc = log_l


def finish_lse(lane: Lane, lse, b: int, q0: int, scale: float) -> None:
    """lse = scale * m + log l, with m as rounded for the exps (Vector). Issued a step after
    `finish_log`, so the in-order Vector engine does not wait on the log before its next row max."""
    res = nl.ndarray((PMAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=res, data=lane.m_used, op0=nl.multiply, operand0=scale, op1=nl.add, operand1=lane.acc)
    nisa.dma_copy(dst=lse[b, lane.head, q0:q0 + PMAX], src=res)
    lane.acc = None


class Unit(nl.NKIObject):
    """The lanes (up to LANES query heads) of one query tile, with the tile's plan and key blocks."""

    def __init__(self, q0: int, plan: list[Segment], blocks: list[KeyBlock], lanes: list[Lane]) -> None:
        self.q0, self.plan, self.blocks, self.lanes = q0, plan, blocks, lanes


def unit_lanes(cfg: dict, dtype) -> int:
    """LANES query heads per unit, or 1 where the K/V of three units of LANES heads would not fit in
    KV_SBUF_BUDGET (very long windows): per kv head, K^T takes n elements per partition and the V
    blocks d + 1 per 128 keys, for the n keys of the longest query tile."""
    keys, blocks = 0, 0
    for q0 in range(0, cfg["length"], PMAX):
        plan = plan_tile(q0, cfg["length"], cfg["window"], cfg["fading_window"], cfg["chunk"], cfg["n_slots"],
                         cfg["use_fading"], cfg["use_memory"], cfg["fading_overlap"])
        n, nb = 0, 0
        for seg in plan:
            n += seg.n
            nb += (seg.n + PMAX - 1) // PMAX
        keys, blocks = max(keys, n), max(blocks, nb)
    kv_per_unit = min(LANES, (LANES + cfg["groups"] - 1) // cfg["groups"] + 1)
    per_head = (keys + blocks * (cfg["d"] + 1)) * (4 if dtype == nl.float32 else 2)
    return LANES if 3 * kv_per_unit * per_head <= KV_SBUF_BUDGET else 1


def load_unit(cfg: dict, consts: Constants, pool: VBlockPool, b: int, q0: int, h0: int) -> Unit:
    """A unit's K/V (once per kv head of the unit) and queries (query heads h0 .. h0 + lanes - 1 of
    query tile q0), into the next set of the V-block pool."""
    plan = plan_tile(q0, cfg["length"], cfg["window"], cfg["fading_window"], cfg["chunk"], cfg["n_slots"],
                     cfg["use_fading"], cfg["use_memory"], cfg["fading_overlap"])
    pool.next_set()
    if q0 != consts.tile_q0:  # per-tile caches: keep this tile's and the previous tile's entries only
        consts.old_row_masks, consts.row_masks = consts.row_masks, {}
        consts.old_bias_rows, consts.bias_rows = consts.bias_rows, {}
        consts.tile_q0 = q0
    lanes = []
    q_heads = cfg["qT"].shape[1]
    last_g = -1
    keys, biases = [], []
    for h in range(h0, min(h0 + cfg["lanes"], q_heads)):
        g = h // cfg["groups"]
        if g != last_g:
            keys, biases = [], []
            for seg in plan:
                keys.append(load_keys(seg, b, g, cfg["streams"], pool))
                biases.append(memory_bias_row(consts, cfg["mem_bias"], b, seg) if seg.stream == "mem" else None)
            last_g = g
        lanes.append(Lane(h, load_queries(cfg["qT"], b, h, q0, cfg["d"], consts.dtype), keys, biases))
    return Unit(q0, plan, key_blocks(plan), lanes)


def complete_unit(unit: Unit, following, finishing, cfg: dict, consts: Constants, out, lse, b: int) -> None:
    """Pass 2 of a unit (its row maxes issued): per group of key blocks and lane, S^T, P^T = exp, P V.

    Woven in, so that no engine waits long on another's chain: the `following` unit's row max (loaded),
    one piece after each exp (Vector's max and Scalar's exp alternate on the PSUM port), and its
    first S^T banks before this unit's last P V; lane j of the `finishing` unit (whose P V is done)
    after group j's exps. S^T banks are opened LOOKAHEAD groups ahead of their exp, so the Tensor
    engine has K Q^T work; a lane's shift tile is issued one exp after its row max, or with its first
    exp if that comes first (the Scalar engine runs in order: it must not wait on a max too early).
    """
    blocks, scale, d = unit.blocks, cfg["scale"], cfg["d"]
    starts = list(range(0, len(blocks), GROUP_BLOCKS))
    open_banks(unit, consts)
    queue = []  # (lane, piece) of the following unit's row max, in issue order
    pending = None  # a following lane whose max is issued and whose shift tile is not
    outputs = []  # finishing lanes whose [O | l] is copied out of PSUM and whose output is not
    if finishing is not None:
        for lane in finishing.lanes:  # first: frees their P V banks before this unit's row-max pieces
            finish_copy(lane, d)
            outputs.append(lane)
    logs = []  # finishing lanes whose output is issued and whose log l is not
    lses = []  # finishing lanes whose log l is issued and whose lse is not
    if following is not None:
        for lane in following.lanes:
            for p in range(max_pieces(following.blocks)):
                queue.append((lane, p))
    for j in range(len(starts)):
        pts = []
        for lane in unit.lanes:
            pts.append(probabilities(lane, blocks, consts, starts[j], scale))
            if j + LOOKAHEAD < len(starts):
                transposed_scores(lane, unit.plan, blocks, consts, starts[j + LOOKAHEAD])
            if pending is not None:
                shift_tile(pending, consts)
                pending = None
            if lses:
                finish_lse(lses.pop(0), lse, b, finishing.q0, scale)
            if logs:
                finish_log(logs[0], d)
                lses.append(logs.pop(0))
            if queue:
                nxt, p = queue.pop(0)
                row_max_piece(nxt, following.plan, following.blocks, consts, p)
                if p == max_pieces(following.blocks) - 1:
                    pending = nxt  # its shift tile goes one exp later, when its max is ready
            if outputs:  # Vector work while Scalar's next exp holds the PSUM port
                lane_out = outputs.pop(0)
                finish_output(lane_out, out, b, finishing.q0, d)
                logs.append(lane_out)
        if j == len(starts) - 1 and following is not None:
            for nxt, p in queue:
                row_max_piece(nxt, following.plan, following.blocks, consts, p)
            queue = []
            open_banks(following, consts)
        for lane, pt in zip(unit.lanes, pts):
            accumulate_pv(lane, blocks, starts[j], pt, d)
    if finishing is not None:
        for lane in outputs:
            finish_output(lane, out, b, finishing.q0, d)
            logs.append(lane)
        for lane in logs:
            finish_log(lane, d)
            lses.append(lane)
        for lane in lses:
            finish_lse(lane, lse, b, finishing.q0, scale)


def open_banks(unit: Unit, consts: Constants) -> None:
    """Open each lane's first LOOKAHEAD S^T banks (those not open yet)."""
    starts = list(range(0, len(unit.blocks), GROUP_BLOCKS))
    for j in range(min(LOOKAHEAD, len(starts))):
        for lane in unit.lanes:
            if len(lane.st) <= j:
                transposed_scores(lane, unit.plan, unit.blocks, consts, starts[j])


def finish_unit(unit: Unit, cfg: dict, out, lse, b: int) -> None:
    """The outputs of a unit whose P V is done (the last of the pipeline)."""
    for lane in unit.lanes:
        finish_copy(lane, cfg["d"])
        finish_output(lane, out, b, unit.q0, cfg["d"])
    for lane in unit.lanes:
        finish_log(lane, cfg["d"])
    for lane in unit.lanes:
        finish_lse(lane, lse, b, unit.q0, cfg["scale"])


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
    n_slots = memkT.shape[-1] if memkT is not None else 0
    out = nl.ndarray((batch, q_heads, length, d), dtype=qT.dtype, buffer=nl.shared_hbm)
    lse = nl.ndarray((batch, q_heads, length), dtype=nl.float32, buffer=nl.shared_hbm)
    cfg = {"qT": qT, "d": d, "length": length, "window": min(window, length), "fading_window": fading_window,
           "chunk": chunk, "n_slots": n_slots, "use_fading": kfT is not None and fading_window > 0,
           "use_memory": n_slots > 0, "fading_overlap": fading_overlap, "groups": q_heads // kv_heads,
           "scale": scale, "mem_bias": mem_bias, "streams": {"ctx": (kT, v), "fad": (kfT, vf), "mem": (memkT, memv)}}
    cfg["lanes"] = unit_lanes(cfg, qT.dtype)
    units = []  # (first query row, first head) of each unit, in issue order
    for q0 in range(0, length, PMAX):
        for h0 in range(0, q_heads, cfg["lanes"]):
            units.append((q0, h0))
    for b in nl.affine_range(batch):
        # Per batch element: tiles shared across `affine_range` iterations would be a loop-carried
        # dependency the compiler is free to reorder.
        consts = Constants(qT.dtype)
        pool = VBlockPool(d, qT.dtype)
        # Software pipeline over units: unit i + 2 is loaded and unit i + 1's row maxes are computed
        # while unit i runs its exps and P V matmuls.
        loaded = [load_unit(cfg, consts, pool, b, units[0][0], units[0][1])]
        for lane in loaded[0].lanes:
            row_max(lane, loaded[0].plan, loaded[0].blocks, consts)
            shift_tile(lane, consts)
        if len(units) > 1:
            loaded.append(load_unit(cfg, consts, pool, b, units[1][0], units[1][1]))
        finishing = None
        for i in range(len(units)):
            if i + 2 < len(units):
                loaded.append(load_unit(cfg, consts, pool, b, units[i + 2][0], units[i + 2][1]))
            following = loaded[1] if len(loaded) > 1 else None
            complete_unit(loaded[0], following, finishing, cfg, consts, out, lse, b)
            finishing = loaded.pop(0)
        finish_unit(finishing, cfg, out, lse, b)
    return out, lse
