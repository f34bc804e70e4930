"""Winograd F(m x m, 3 x 3) for stride-1, padding-1 NHWC convolutions, written once for any array
library (the framework supplies four array operations, `ArrayOps`).

A 3x3 convolution computes each m x m output tile from an (m+2) x (m+2) input tile. Winograd's
minimal filtering (Lavin & Gray, 2016) transforms input tiles (`B^T d B`) and kernels (`G g G^T`)
so that the tile's output is `A^T [U . V] A`: the convolution becomes (m+2)^2 independent
matmuls [tiles, C_in] @ [C_in, C_out], 9 m^2 / (m+2)^2 as many multiplications as the direct
form (2.25x fewer for F(2, 3), the one used). The transforms are additions over shifted views of the
activations. The gradients are the same three steps transposed, so they save as much:

    dM = A dY A^T,   dV = dM @ U^T  ->  dx = overlap-add of B dV B^T,
                     dU = V^T @ dM  ->  dw = G^T dU G.

Every function here only adds, subtracts and scales arrays and calls `ArrayOps`; the framework
supplies the batched matmuls and the custom gradient. The batch size may be unknown (None) where
the framework traces with an open batch dimension; `ArrayOps.reshape` then takes None for it. F(2, 3)'s float32 error is below 1e-6
relative, next to the direct convolution's own rounding of about 3e-7.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from typing import Any, Protocol

Array = Any
Matrix = Sequence[Sequence[Fraction | int]]

_HALF = Fraction(1, 2)
# (B^T, G, A^T) of F(m, 3) by the output tile m; interpolation points 0, +-1 and infinity.
# F(4, 3) (points 0, +-1, +-2) multiplies 4x less than direct but was slower in the R50 training
# step than F(2, 3): its 6x6 transforms read the activations more and grow the kernels 4x.
TRANSFORMS: dict[int, tuple[Matrix, Matrix, Matrix]] = {
    2: ([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [_HALF, _HALF, _HALF], [_HALF, -_HALF, _HALF], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]]),
}


class ArrayOps(Protocol):
    """The array operations the transforms need, as the framework spells them."""

    def slice(self, x: Array, axis: int, start: int, stop: int, step: int) -> Array: ...
    def pad(self, x: Array, pads: Sequence[tuple[int, int]]) -> Array: ...
    def stack(self, xs: Sequence[Array], axis: int) -> Array: ...
    def reshape(self, x: Array, shape: Sequence[int]) -> Array: ...


def combine(matrix: Matrix, xs: Sequence[Array]) -> list[Array]:
    """`[sum_k matrix[a][k] * xs[k] for each row a]`, skipping zeros and unit multiplications."""
    out = []
    for row in matrix:
        acc = None
        for c, x in zip(row, xs):
            if c == 0:
                continue
            term = x if c == 1 else -x if c == -1 else x * float(c)
            acc = term if acc is None else acc + term
        out.append(acc)
    return out


def transpose(matrix: Matrix) -> Matrix:
    return [list(col) for col in zip(*matrix)]


def tiles(size: int, m: int) -> int:
    """Output tiles along an axis of `size` (the last tile is padded when m does not divide it)."""
    return -(-size // m)


def _shift_views(ops: ArrayOps, x: Array, axis: int, m: int, count: int) -> list[Array]:
    """The m+2 strided views `x[k :: m][:count]` along `axis`: row k of every input tile."""
    return [ops.slice(x, axis, k, k + m * (count - 1) + 1, m) for k in range(m + 2)]


def _interleave(ops: ArrayOps, parts: Sequence[Array], axis: int, shape: Sequence[int]) -> Array:
    """m arrays of the same `shape` -> one with `axis` m times longer, parts[j] at j :: m."""
    out = list(shape)
    out[axis] *= len(parts)
    return ops.reshape(ops.stack(parts, axis + 1), out)


def _overlap_add(ops: ArrayOps, rows: Sequence[Array], axis: int, m: int,
                 shape: Sequence[int]) -> Array:
    """Sum tile rows back into place: row k of tile i lands at m*i + k (the inverse of
    `_shift_views`' gather); the result has m*(count+1) positions along `axis`."""
    phases = []
    for j in range(m):
        acc = None
        for q, k in enumerate(range(j, m + 2, m)):  # row k of tile i - q lands on phase j of i
            pads = [(0, 0)] * len(shape)
            pads[axis] = (q, 1 - q)
            term = ops.pad(rows[k], pads)
            acc = term if acc is None else acc + term
        phases.append(acc)
    longer = list(shape)
    longer[axis] += 1
    return _interleave(ops, phases, axis, longer)


def input_transform(ops: ArrayOps, x: Array, shape: Sequence[int], m: int) -> Array:
    """NHWC `x` -> V [(m+2)^2, N*tiles_h*tiles_w, C]: `B^T d B` of every zero-padded tile.

    Each axis is transformed into one stacked array (rows, then the columns of all rows at
    once): fewer, larger passes than one array per (row, column) pair, 2-3% of the R50 step in
    JAX. (The same form for the gradient transforms measured slower, so they keep theirs.)
    """
    n, h, w, c = shape
    th, tw = tiles(h, m), tiles(w, m)
    xp = ops.pad(x, [(0, 0), (1, 1 + m * th - h), (1, 1 + m * tw - w), (0, 0)])
    bt = TRANSFORMS[m][0]
    rows = ops.stack(combine(bt, _shift_views(ops, xp, 1, m, th)), 0)    # [a, n, th, w', c]
    v = ops.stack(combine(bt, _shift_views(ops, rows, 3, m, tw)), 1)     # [a, a, n, th, tw, c]
    return ops.reshape(v, [(m + 2) ** 2, _tiles_of(n, th * tw), c])


def input_transform_grad(ops: ArrayOps, dv: Array, shape: Sequence[int], m: int) -> Array:
    """The transpose of `input_transform`: dV -> dx of NHWC `shape`."""
    n, h, w, c = shape
    a, th, tw = m + 2, tiles(h, m), tiles(w, m)
    dv = ops.reshape(dv, [a, a, n, th, tw, c])
    b = transpose(TRANSFORMS[m][0])
    cols = [_overlap_add(ops, combine(b, [_index(ops, dv, i, j) for j in range(a)]), 2, m,
                         [n, th, tw, c]) for i in range(a)]
    full = _overlap_add(ops, combine(b, cols), 1, m, [n, th, m * (tw + 1), c])
    return ops.slice(ops.slice(full, 1, 1, 1 + h, 1), 2, 1, 1 + w, 1)


def kernel_transform(ops: ArrayOps, w: Array, m: int) -> Array:
    """HWIO 3x3 kernel -> U [(m+2)^2, C_in, C_out]: `G g G^T`."""
    g = TRANSFORMS[m][1]
    rows = combine(g, [_row(ops, w, k) for k in range(3)])
    return ops.stack([t for r in rows for t in combine(g, [_row(ops, r, k) for k in range(3)])],
                     0)


def kernel_transform_grad(ops: ArrayOps, du: Array, m: int) -> Array:
    """The transpose of `kernel_transform`: dU -> the HWIO kernel gradient."""
    a = m + 2
    gt = transpose(TRANSFORMS[m][1])
    du = ops.reshape(du, [a, a, *du.shape[1:]])
    cols = [ops.stack(combine(gt, [_index(ops, du, i, j) for j in range(a)]), 0)
            for i in range(a)]
    return ops.stack(combine(gt, cols), 0)


def output_transform(ops: ArrayOps, mm: Array, shape: Sequence[int], m: int) -> Array:
    """M [(m+2)^2, tiles, C_out] -> NHWC output of `shape`: `A^T M A` per tile, tiles in place."""
    n, h, w, co = shape
    a, th, tw = m + 2, tiles(h, m), tiles(w, m)
    mm = ops.reshape(mm, [a, a, n, th, tw, co])
    at = TRANSFORMS[m][2]
    rows = combine(at, [_row(ops, mm, i) for i in range(a)])        # m x [a, n, th, tw, co]
    y = [_interleave(ops, combine(at, [_row(ops, r, j) for j in range(a)]), 2, [n, th, tw, co])
         for r in rows]
    y = _interleave(ops, y, 1, [n, th, m * tw, co])
    return ops.slice(ops.slice(y, 1, 0, h, 1), 2, 0, w, 1)  # drop a padded last tile's rest


def output_transform_grad(ops: ArrayOps, dy: Array, shape: Sequence[int], m: int) -> Array:
    """The transpose of `output_transform`: NHWC dY -> dM [(m+2)^2, tiles, C_out]."""
    n, h, w, co = shape
    a, th, tw = m + 2, tiles(h, m), tiles(w, m)
    dy = ops.pad(dy, [(0, 0), (0, m * th - h), (0, m * tw - w), (0, 0)])
    at_t = transpose(TRANSFORMS[m][2])
    rows = ops.stack(combine(at_t, [ops.slice(dy, 1, i, m * th, m) for i in range(m)]), 0)
    t = ops.stack(combine(at_t, [ops.slice(rows, 3, j, m * tw, m) for j in range(m)]), 1)
    return ops.reshape(t, [a * a, _tiles_of(n, th * tw), co])


def _tiles_of(n: int | None, per_image: int) -> int:
    """All tiles of a batch of n images: -1 (reshape's "the rest") where n is unknown (None, a
    batch dimension left open when the framework traces)."""
    return -1 if n is None else n * per_image


def _row(ops: ArrayOps, x: Array, k: int) -> Array:
    """`x[k]` (the leading axis dropped)."""
    return ops.reshape(ops.slice(x, 0, k, k + 1, 1), list(x.shape[1:]))


def _index(ops: ArrayOps, x: Array, i: int, j: int) -> Array:
    """`x[i, j]`."""
    return _row(ops, _row(ops, x, i), j)
