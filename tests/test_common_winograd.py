"""bit_common.winograd in NumPy float64: the transforms compute a 3x3 convolution, and each
`*_grad` is the exact transpose (adjoint) of its transform, so the gradients built from them are
the convolution's gradients in any framework."""

from __future__ import annotations

import numpy as np
import pytest

from bit_common import winograd


class NumpyOps:
    @staticmethod
    def slice(x, axis, start, stop, step):
        index = [slice(None)] * x.ndim
        index[axis] = slice(start, stop, step)
        return x[tuple(index)]

    pad, stack, reshape = staticmethod(np.pad), staticmethod(np.stack), staticmethod(np.reshape)


M = 2
SHAPES = [(2, 8, 8, 3), (1, 7, 5, 4), (3, 1, 1, 2), (1, 4, 9, 5)]


def _direct_conv(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Stride 1, zero padding 1, NHWC/HWIO, by its definition."""
    n, h, wd, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return sum(np.einsum("nhwi,io->nhwo", xp[:, i:i + h, j:j + wd], w[i, j])
               for i in range(3) for j in range(3))


def _winograd_conv(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    v = winograd.input_transform(NumpyOps, x, x.shape, M)
    u = winograd.kernel_transform(NumpyOps, w, M)
    return winograd.output_transform(NumpyOps, np.einsum("kpi,kio->kpo", v, u),
                                     (*x.shape[:3], w.shape[-1]), M)


@pytest.mark.parametrize("shape", SHAPES)
def test_winograd_computes_the_3x3_convolution(shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape)
    w = rng.standard_normal((3, 3, shape[-1], 6))
    np.testing.assert_allclose(_winograd_conv(x, w), _direct_conv(x, w), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
def test_each_gradient_transform_is_the_adjoint_of_its_transform(shape):
    """<T a, b> == <a, T^T b> for random a, b: the `*_grad` functions are exact transposes."""
    rng = np.random.default_rng(1)
    n, h, w, c = shape
    tiles = n * winograd.tiles(h, M) * winograd.tiles(w, M)
    pairs = [
        (lambda a: winograd.input_transform(NumpyOps, a, shape, M),
         lambda b: winograd.input_transform_grad(NumpyOps, b, shape, M),
         shape, (16, tiles, c)),
        (lambda a: winograd.output_transform(NumpyOps, a, shape, M),
         lambda b: winograd.output_transform_grad(NumpyOps, b, shape, M),
         (16, tiles, c), shape),
        (lambda a: winograd.kernel_transform(NumpyOps, a, M),
         lambda b: winograd.kernel_transform_grad(NumpyOps, b, M),
         (3, 3, c, 5), (16, c, 5)),
    ]
    for forward, adjoint, in_shape, out_shape in pairs:
        a, b = rng.standard_normal(in_shape), rng.standard_normal(out_shape)
        ta, tb = forward(a), adjoint(b)
        assert ta.shape == out_shape and tb.shape == in_shape
        assert np.vdot(ta, b) == pytest.approx(np.vdot(a, tb), rel=1e-12)


def test_combine_skips_zeros_and_signs():
    xs = [np.array([1.0]), np.array([10.0]), np.array([100.0])]
    rows = winograd.combine([[1, 0, -1], [0, 0.5, 2]], xs)
    assert [float(r[0]) for r in rows] == [-99.0, 205.0]
