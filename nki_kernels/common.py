"""Small NKI 0.2.0 building blocks shared by the kernels (run on hardware or the emulator).

Partition-broadcast by matmul: a row that lives on one partition of an SBUF tile cannot
be read by a compute instruction at an arbitrary partition (partition start rules), and
Vector instructions do not broadcast across partitions. Multiplying by a 0/1 *selector*
on the Tensor engine does both at once and lands the result in PSUM, where a Vector
operand costs N rather than 2N cycles.
"""

from __future__ import annotations

from nki_kernels.compat import nisa, nl

PMAX = 128
SEQ_TILE = 512  # time steps per tile: one PSUM bank of fp32 per partition


def ones(shape: tuple[int, ...], dtype=None):
    """An SBUF tile of ones (GpSimd memset)."""
    t = nl.ndarray(shape, dtype=dtype or nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=t, value=1.0)
    return t


def selectors(rows: int, width: int):
    """sel (rows, rows * width): sel[k, n*width + j] = 1 if k == n else 0.

    `sel[:, n*width:(n+1)*width]` as stationary broadcasts row n of a (rows, F) moving
    tile to `width` partitions: dst[p, f] = moving[n, f].
    """
    one = ones((rows, rows * width))
    sel = nl.ndarray((rows, rows * width), dtype=nl.float32, buffer=nl.sbuf)
    nisa.affine_select(dst=sel, pattern=[[-1, rows], [0, width]], offset=0, channel_multiplier=1,
                       on_true_tile=one, on_false_value=0.0, cmp_op=nl.equal)
    return sel


def identity(size: int):
    """(size, size) identity: the moving operand of a Tensor-engine transpose."""
    one = ones((size, size))
    eye = nl.ndarray((size, size), dtype=nl.float32, buffer=nl.sbuf)
    nisa.affine_select(dst=eye, pattern=[[-1, size]], offset=0, channel_multiplier=1,
                       on_true_tile=one, on_false_value=0.0, cmp_op=nl.equal)
    return eye


def reversal(size: int):
    """(size, size) anti-identity J: J[k, j] = 1 if k + j == size - 1 (reverses time by matmul)."""
    one = ones((size, size))
    rev = nl.ndarray((size, size), dtype=nl.float32, buffer=nl.sbuf)
    nisa.affine_select(dst=rev, pattern=[[1, size]], offset=-(size - 1), channel_multiplier=1,
                       on_true_tile=one, on_false_value=0.0, cmp_op=nl.equal)
    return rev


def broadcast_row(sel, index: int, rows_tile, width: int):
    """PSUM (width, F) whose every partition holds row `index` of `rows_tile` (rows, F)."""
    rows, free = rows_tile.shape[0], rows_tile.shape[1]
    dst = nl.ndarray((width, free), dtype=nl.float32, buffer=nl.psum)
    stride = sel.shape[1] // rows
    nisa.nc_matmul(dst=dst, stationary=sel[0:rows, index * stride:index * stride + width], moving=rows_tile,
                   is_stationary_onezero=True)
    return dst


def load_column(vec, start: int, size: int, fill: float | None = None):
    """A (size, 1) fp32 tile of vec[start:start+size] (HBM vector), or `fill` when vec is None."""
    col = nl.ndarray((size, 1), dtype=nl.float32, buffer=nl.sbuf)
    if vec is None:
        nisa.memset(dst=col, value=fill if fill is not None else 0.0)
    else:
        nisa.dma_copy(dst=col, src=vec.reshape((vec.shape[0], 1))[start:start + size, :])
    return col


def column_selectors(parts: int, n: int):
    """ecol (parts, n*n): ecol[p, k*n + j] = 1 if j == k. `ecol[:, k*n:(k+1)*n]` as stationary
    sums a (parts, F) moving tile over partitions into row k of an (n, F) PSUM tile."""
    one = ones((parts, n * n))
    ecol = nl.ndarray((parts, n * n), dtype=nl.float32, buffer=nl.sbuf)
    nisa.affine_select(dst=ecol, pattern=[[-1, n], [1, n]], offset=0, channel_multiplier=0, on_true_tile=one,
                       on_false_value=0.0, cmp_op=nl.equal)
    return ecol


def reverse_free(src, rev):
    """PSUM (R, T) = src (R, T) with the free (time) axis reversed; T a multiple of 128.

    Per 128-block: Tensor-engine transpose to (128, R), a copy to SBUF (Scalar engine),
    then a matmul with the anti-identity writes the block, reversed, at its mirrored place.
    """
    rows, length = src.shape[0], src.shape[1]
    out = nl.ndarray((rows, length), dtype=nl.float32, buffer=nl.psum)
    blocks = length // PMAX
    for j in range(blocks):
        tp = nl.ndarray((PMAX, rows), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_transpose(dst=tp, data=src[:, j * PMAX:(j + 1) * PMAX])
        ts = nl.ndarray((PMAX, rows), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=ts, op=nl.copy, data=tp)
        k = blocks - 1 - j
        nisa.nc_matmul(dst=out[:, k * PMAX:(k + 1) * PMAX], stationary=ts, moving=rev, is_moving_onezero=True)
    return out


def reversed_copy(src, rev):
    """`reverse_free` landed in SBUF (Scalar-engine copy), for operands that cannot stay in PSUM."""
    ps = reverse_free(src, rev)
    out = nl.ndarray(src.shape, dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=out, op=nl.copy, data=ps)
    return out


def accumulate_out(dst, src, first: bool):
    """Store `src` to HBM `dst`, or add it there (DMA read-modify-write) when not `first`."""
    if first:
        nisa.dma_copy(dst=dst, src=src)
    else:
        nisa.dma_copy(dst=dst, src=src, dst_rmw_op=nl.add)


def triangle(size: int, lower: bool, strict: bool):
    """(size, size) 0/1 triangle on (partition k, free t): lower -> 1 where k >= t (k > t if strict),
    else upper -> 1 where k <= t (k < t if strict). As a matmul stationary over time on the
    partitions, the upper one gives in-chunk cumulative sums, the lower one reverse cumulative sums."""
    one = ones((size, size))
    tri = nl.ndarray((size, size), dtype=nl.float32, buffer=nl.sbuf)
    sign = 1 if lower else -1  # value = sign * (k - t)
    nisa.affine_select(dst=tri, pattern=[[-sign, size]], offset=0, channel_multiplier=sign, on_true_tile=one,
                       on_false_value=0.0, cmp_op=nl.greater if strict else nl.greater_equal)
    return tri
