"""The CPU kernels under bit_jax's ResNet-v2: each op with a gradient written for XLA's CPU backend.

Autodiff of the plain formulas is correct but slow on CPU: it stores more of the forward pass,
takes more reductions, and leaves XLA's CPU layout assignment transposes around its dots. Each op
here keeps the formula's value and writes its gradient by hand (`jax.custom_vjp`); the tests
check values and gradients against the autodiff of the formula or XLA's own convolution.

- `standardize_kernel`: weight standardization over H, W, I (biased variance, eps 1e-10);
- `group_norm_act`: group norm (32 groups, eps 1e-5) and its affine, optionally the ReLU, in one
  pass, statistics in float32;
- `conv1x1` / `matmul`: 1x1 convolutions as 2-D matmuls;
- `conv`: a k x k convolution whose kernel gradient is one im2col matmul;
- `conv3x3_winograd`: stride-1 3x3 convolutions by Winograd F(2x2, 3x3) (`bit_common.winograd`);
- `max_pool`: a max pool routing the gradient to each window's first maximum (as PyTorch).

Parameters of the ops are float32; `precision` is a `lax.Precision` for the dots.
"""

from __future__ import annotations

import functools
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from bit_common import runtime, winograd

GN_GROUPS, GN_EPS, WS_EPS = 32, 1e-5, 1e-10
Dtype = Any


def after(x: jax.Array, g: jax.Array) -> jax.Array:
    """`x`, made to depend on `g` (a zero from it), so that XLA schedules what is computed from x
    after g exists: a backward pass's work on forward values otherwise runs in the forward pass
    and stays live until it is used. XLA does not fold a float `0 * g`, and
    `lax.optimization_barrier` does not order them on CPU."""
    return x + (0 * g.ravel()[0]).astype(x.dtype)


def _standardize_fwd(x: jax.Array, axes: tuple[int, ...], eps: float):
    mean = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)  # biased, two-pass
    r = lax.rsqrt(var + eps)
    # `x * r - mean * r`, not `(x - mean) * r`: XLA would write the shared `x - mean` in a pass
    # of its own; this way the variance's reduction computes it on the fly (`make profile`: the
    # forward standardization of R50x1's kernels 76 -> 62 ms per step).
    y = x * r - mean * r
    return y, (y, r)


@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _standardize(x: jax.Array, axes: tuple[int, ...], eps: float) -> jax.Array:
    """`(x - mean) / sqrt(var + eps)` over `axes` (biased variance), with a hand-written gradient.

    The gradient `r * (g - mean(g) - y * mean(g * y))` takes two reductions where autodiff of the
    two-pass statistics takes several more (on CPU the reductions, not the arithmetic, cost).
    """
    return _standardize_fwd(x, axes, eps)[0]


def _standardize_bwd(axes, eps, res, g):
    y, r = res
    mg = jnp.mean(g, axis=axes, keepdims=True)
    mgy = jnp.mean(g * y, axis=axes, keepdims=True)
    return (r * (g - mg - y * mgy),)


_standardize.defvjp(lambda x, axes, eps: _standardize_fwd(x, axes, eps), _standardize_bwd)


def _group_mean(t: jax.Array, count: int) -> jax.Array:
    """Per-channel sums [N, C] -> the mean of each channel's group, again per channel [N, 1, C]."""
    n, c = t.shape
    g = t.reshape(n, GN_GROUPS, c // GN_GROUPS).sum(axis=2, keepdims=True) / count
    return jnp.broadcast_to(g, (n, GN_GROUPS, c // GN_GROUPS)).reshape(n, 1, c)


def _gn_stats(x: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """Group mean and 1/std of float32 [N, H*W, C] per image and group, as [N, 1, C] arrays."""
    count = x.shape[1] * (x.shape[2] // GN_GROUPS)
    mean = _group_mean(x.sum(axis=1), count)
    r = lax.rsqrt(_group_mean(jnp.square(x - mean).sum(axis=1), count) + eps)  # two-pass, biased
    return mean, r


def _gn_act_fwd(x, scale, bias, relu, out_dtype):
    xf = x.astype(jnp.float32)
    mean, r = _gn_stats(xf, GN_EPS)
    a_mul = r * scale
    a_add = bias - mean * a_mul
    z = xf * a_mul + a_add
    a = (jnp.maximum(z, 0.0) if relu else z).astype(out_dtype)
    return a, (x, a, mean, r, scale)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm_act(x: jax.Array, scale: jax.Array, bias: jax.Array, relu: bool,
                   out_dtype: Any) -> jax.Array:
    """`[relu](group_norm(x) * scale + bias)` of [N, H*W, C] (statistics in float32) in one pass.

    Folding the normalization and the affine into per-(image, channel) coefficients makes the
    forward one elementwise pass over `x`, and the hand-written gradient two reductions and one
    elementwise pass over (g, a, x): no normalized copy of `x` is stored for the backward pass.
    Stored arrays matter beyond their traffic: XLA's CPU runtime maps a fresh temp buffer of the
    step's peak size on every call, so every page of it costs a page fault each step.
    """
    return _gn_act_fwd(x, scale, bias, relu, out_dtype)[0]


def _gn_act_bwd(relu, out_dtype, res, g):
    x, a, mean, r, scale = res
    count = x.shape[1] * (x.shape[2] // GN_GROUPS)
    xf, g = x.astype(jnp.float32), g.astype(jnp.float32)
    dz = jnp.where(a > 0, g, 0.0) if relu else g
    s1 = dz.sum(axis=1)                            # [N, C]: sum of dz
    # sum of dz * y, with y = x * r - mean * r: not the forward's `x - mean`, which XLA would
    # otherwise keep (common subexpression) from the forward to here, a full-size stored array.
    s2 = (dz * (xf * r - mean * r)).sum(axis=1)
    mg = _group_mean(s1 * scale, count)            # mean of dy = dz * scale
    mgy = _group_mean(s2 * scale, count)           # mean of dy * y
    # dx = r * (dy - mg - y * mgy) with y = (x - mean) * r, as dz * c1 + x * c2 + c3.
    c1 = r * scale
    c2 = -r * r * mgy
    c3 = r * (r * mgy * mean - mg)
    dx = dz * c1 + xf * c2 + c3
    return dx.astype(x.dtype), s2.sum(axis=0), s1.sum(axis=0)


group_norm_act.defvjp(_gn_act_fwd, _gn_act_bwd)


def standardize_kernel(w: jax.Array) -> jax.Array:
    """Weight standardization of an HWIO kernel over H, W, I (biased variance, eps 1e-10)."""
    k = w.reshape(-1, w.shape[-1])
    return _standardize(k, (0,), WS_EPS).reshape(w.shape)


def _contract_rows(a: jax.Array, b: jax.Array, precision) -> jax.Array:
    """`a^T @ b` for 2-D `a` [M, I] and `b` [M, O] -> [I, O] (a kernel gradient).

    XLA's CPU dot is about twice as fast when the wider operand gives the result's minor
    dimension, so the narrower one goes first and a wider-first product is transposed after
    (the [I, O] result is small).
    """
    dims = (((0,), (0,)), ((), ()))
    if a.shape[1] <= b.shape[1]:
        return lax.dot_general(a, b, dims, precision=precision)
    return lax.dot_general(b, a, dims, precision=precision).T


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x: jax.Array, w: jax.Array, precision) -> jax.Array:
    """`x @ w` over the last dimension of `x` with 2-D `w`, with explicitly 2-D gradients.

    With autodiff the kernel gradient contracts the three leading dimensions of 4-D operands and
    XLA's CPU layout assignment then transposes the (large) output gradient before a slow dot;
    contracting 2-D views keeps every gradient a plain matmul on the arrays as they are laid out.
    """
    return _matmul_fwd(x, w, precision)[0]


def _matmul_fwd(x, w, precision):
    x2 = x.reshape(-1, x.shape[-1])
    y = lax.dot_general(x2, w, (((1,), (0,)), ((), ())), precision=precision)
    return y.reshape(*x.shape[:-1], w.shape[1]), (x2, w)


def _matmul_bwd(precision, res, g):
    x2, w = res
    g2 = g.reshape(-1, g.shape[-1])
    dx = lax.dot_general(g2, w, (((1,), (1,)), ((), ())), precision=precision)
    return dx.reshape(*g.shape[:-1], w.shape[0]), _contract_rows(x2, g2, precision)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def conv1x1(x: jax.Array, w: jax.Array, precision) -> jax.Array:
    """A 1x1 convolution as a matmul over the channels (its gradients are matmuls too)."""
    return matmul(x, w.reshape(w.shape[-2:]), precision)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv(x: jax.Array, w: jax.Array, stride: int, padding: int, precision) -> jax.Array:
    """A k x k NHWC/HWIO convolution whose kernel gradient is one im2col matmul.

    XLA's CPU backend computes a convolution's kernel gradient as a convolution with the batch as
    the contracted feature dimension, several times slower than a matmul over the shifted
    (strided) input windows, which sums the same products.
    """
    return _conv(x, w, stride, padding, precision)


def _conv(x, w, stride, padding, precision):
    return lax.conv_general_dilated(x, w, (stride, stride), [(padding, padding)] * 2,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=precision)


def _conv_kxk_fwd(x, w, stride, padding, precision):
    return _conv(x, w, stride, padding, precision), (x, w)


def _conv_kxk_bwd(stride, padding, precision, res, g):
    x, w = res
    w_t = after(w, g)  # the flipped, transposed kernel is made in the backward pass
    _, vjp_x = jax.vjp(lambda x_: _conv(x_, w_t, stride, padding, precision), x)
    (dx,) = vjp_x(g)
    return dx, _conv_kernel_grad(x, g, w.shape, stride, padding, precision)


def _conv_kernel_grad(x: jax.Array, g: jax.Array, shape: tuple[int, ...], stride: int,
                      padding: int, precision) -> jax.Array:
    """The HWIO kernel gradient as one matmul: transposed patches [k*k*I, M] @ g [M, O].

    The input is transposed once to channel-major [I, N, H, W], so that each tap's (strided)
    window is a copy of contiguous rows rather than a transpose (XLA's CPU dot otherwise
    transposes every [M, I] window it is given), and the k*k windows stack along the leading
    dimension into a matrix whose product with g needs no further layout change.
    """
    kh, kw, ci, co = shape
    n, ho, wo = g.shape[:3]
    # Otherwise every layer's windows (9x the size of x) are made in the forward pass and all of
    # them are live at the peak (R50x1, batch 16, 128 px: 780 -> 490 MB of temp buffer).
    x = after(x, g)
    xt = jnp.transpose(x, (3, 0, 1, 2))
    xt = jnp.pad(xt, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    taps = [lax.slice(xt, (0, 0, i, j),
                      (ci, n, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1),
                      (1, 1, stride, stride)).reshape(ci, -1)
            for i in range(kh) for j in range(kw)]
    cols = jnp.concatenate(taps, axis=0)
    return jnp.dot(cols, g.reshape(-1, co), precision=precision).reshape(shape)


conv.defvjp(_conv_kxk_fwd, _conv_kxk_bwd)


class _JaxOps:
    """`bit_common.winograd.ArrayOps` in jax.numpy."""

    @staticmethod
    def slice(x, axis, start, stop, step):
        return lax.slice_in_dim(x, start, stop, step, axis)

    pad, stack, reshape = staticmethod(jnp.pad), staticmethod(jnp.stack), staticmethod(jnp.reshape)


WINOGRAD_ENV = "BIT_JAX_WINOGRAD"
_WINO_M = 2
_BATCHED = ((0,), (0,))


def use_winograd(dtype: Dtype) -> bool:
    """Winograd for float32 3x3 convolutions on CPU (BIT_JAX_WINOGRAD=1/0 overrides).

    On CPU XLA's direct 3x3 convolution is the slowest part of the step; F(2, 3) does the same
    work with 2.25x fewer multiplications. GPUs have cuDNN's own algorithms, and bfloat16 would
    lose precision in the transforms.
    """
    if jnp.dtype(dtype) != jnp.float32:
        return False
    forced = runtime.env_override(WINOGRAD_ENV)
    return jax.default_backend() == "cpu" if forced is None else forced


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3_winograd(x: jax.Array, w: jax.Array, precision) -> jax.Array:
    """A stride-1, padding-1 NHWC/HWIO 3x3 convolution by Winograd F(2x2, 3x3).

    The gradients are the transposed transforms around two batched matmuls (see
    `bit_common.winograd`), written out rather than left to autodiff, which keeps every matmul in
    the layout XLA's CPU dot runs fastest.
    """
    return _winograd_fwd(x, w, precision)[0]


def _winograd_fwd(x, w, precision):
    v = winograd.input_transform(_JaxOps, x, x.shape, _WINO_M)
    u = winograd.kernel_transform(_JaxOps, w, _WINO_M)
    mm = lax.dot_general(v, u, (((2,), (1,)), _BATCHED), precision=precision)
    y = winograd.output_transform(_JaxOps, mm, (*x.shape[:3], w.shape[-1]), _WINO_M)
    return y, (x, u)


def _winograd_bwd(precision, res, g):
    x, u = res
    # V (4x the size of x) is recomputed rather than stored: R50x1 at batch 128 peaks 0.8 GB
    # lower, at the same step time; made after g, it is live for one layer only.
    x = after(x, g)
    v = winograd.input_transform(_JaxOps, x, x.shape, _WINO_M)
    dm = winograd.output_transform_grad(_JaxOps, g, g.shape, _WINO_M)
    dv = lax.dot_general(dm, u, (((2,), (2,)), _BATCHED), precision=precision)
    du = lax.dot_general(v, dm, (((1,), (1,)), _BATCHED), precision=precision)
    return (winograd.input_transform_grad(_JaxOps, dv, x.shape, _WINO_M),
            winograd.kernel_transform_grad(_JaxOps, du, _WINO_M))


conv3x3_winograd.defvjp(_winograd_fwd, _winograd_bwd)


def _window_taps(x: jax.Array, k: int, stride: int) -> list[jax.Array]:
    """The k*k strided windows of NHWC `x` (no padding) that a k x k window op combines."""
    n, h, w, c = x.shape
    ho, wo = (h - k) // stride + 1, (w - k) // stride + 1
    return [lax.slice(x, (0, i, j, 0),
                      (n, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
                      (1, stride, stride, 1)) for i in range(k) for j in range(k)]


@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def max_pool(x: jax.Array, k: int, stride: int) -> jax.Array:
    """k x k max pool of NHWC `x` without padding; the gradient goes to each window's first max.

    Autodiff of `lax.reduce_window` tracks arg-max indices in a variadic reduction with four
    index arrays, several times slower on CPU than comparing the k*k windows with the output.
    """
    return functools.reduce(jnp.maximum, _window_taps(x, k, stride))


def _max_pool_fwd(x, k, stride):
    y = max_pool(x, k, stride)
    return y, (x, y)


def _max_pool_bwd(k, stride, res, g):
    x, y = res
    n, h, w, c = x.shape
    ho, wo = y.shape[1:3]
    zero = jnp.zeros((), g.dtype)
    dx, taken = None, None
    for t, tap in enumerate(_window_taps(x, k, stride)):
        i, j = divmod(t, k)
        hit = tap == y if taken is None else (tap == y) & ~taken
        taken = hit if taken is None else taken | hit
        cfg = ((0, 0, 0), (i, h - i - stride * (ho - 1) - 1, stride - 1),
               (j, w - j - stride * (wo - 1) - 1, stride - 1), (0, 0, 0))
        part = lax.pad(jnp.where(hit, g, zero), zero, cfg)
        dx = part if dx is None else dx + part
    return (dx,)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


