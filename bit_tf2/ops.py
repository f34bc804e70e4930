"""The kernels under bit_tf2's ResNet-v2, each with a gradient written for TensorFlow on CPU.

Autodiff of the plain formulas makes several more passes over the activations than needed, and
on CPU those passes cost as much as the convolutions. Each op keeps the formula's value and
writes its gradient by hand (`tf.custom_gradient`), each direction one XLA-compiled function
(the convolutions around them stay on oneDNN, which beats XLA's on CPU); the tests check values
and gradients against autodiff of the formula or TensorFlow's own convolution.

- `standardize_kernel`: weight standardization over H, W, I (biased variance, eps 1e-10);
- `group_norm_relu`: `relu(group_norm(x) * gamma + beta)` (32 groups, eps 1e-5) as one op,
  statistics in float32;
- `conv3x3_winograd`: stride-1 3x3 convolutions by Winograd F(2x2, 3x3) (`bit_common.winograd`),
  where `use_winograd` says so.
"""

from __future__ import annotations

import tensorflow as tf

from bit_common import runtime, winograd

GN_GROUPS, GN_EPS, WS_EPS = 32, 1e-5, 1e-10


def after(x: tf.Tensor, g: tf.Tensor) -> tf.Tensor:
    """`x`, made to depend on `g` (a zero from it), so that what is computed from x runs after g
    exists: TensorFlow's executor otherwise runs a backward pass's work on forward values during
    the forward pass and keeps the result until it is used. XLA does not fold a float `0 * g`."""
    return x + tf.cast(0 * tf.reshape(g, [-1])[0], x.dtype)


def pad(x: tf.Tensor, p: int) -> tf.Tensor:
    """`p` zeros on each side of NHWC `x`'s height and width (never TF's asymmetric 'SAME')."""
    return tf.pad(x, [[0, 0], [p, p], [p, p], [0, 0]]) if p else x


@tf.function(jit_compile=True)
def _ws_fwd(w2):
    mean = tf.reduce_mean(w2, axis=0, keepdims=True)
    centred = w2 - mean
    rstd = tf.math.rsqrt(tf.reduce_mean(tf.square(centred), axis=0, keepdims=True) + WS_EPS)
    return centred * rstd, rstd


@tf.function(jit_compile=True)
def _ws_bwd(dy, y, rstd):
    mean_dy = tf.reduce_mean(dy, axis=0, keepdims=True)
    mean_dy_y = tf.reduce_mean(dy * y, axis=0, keepdims=True)
    return rstd * (dy - mean_dy - y * mean_dy_y)


@tf.custom_gradient
def _standardize_2d(w2: tf.Tensor):
    y, rstd = _ws_fwd(w2)
    return y, lambda dy: _ws_bwd(dy, y, rstd)


def standardize_kernel(w: tf.Tensor) -> tf.Tensor:
    """`(w - mean) / sqrt(var + 1e-10)` over (H, W, I) of an HWIO kernel, biased variance.

    Two-pass statistics and the two-reduction gradient `r * (g - mean(g) - y * mean(g * y))`,
    each direction one XLA-fused kernel (4x faster on CPU than autodiff of the moments formula;
    oneDNN's fused batch norm is as fast but loses precision in the gradient, whose mean
    nearly cancels).
    """
    return tf.reshape(_standardize_2d(tf.reshape(w, [-1, w.shape[-1]])), tf.shape(w))


class _TfOps:
    """`bit_common.winograd.ArrayOps` in TensorFlow."""

    @staticmethod
    def slice(x, axis, start, stop, step):
        rank = x.shape.rank
        begin, end, strides = [0] * rank, [0] * rank, [1] * rank
        begin[axis], end[axis], strides[axis] = start, stop, step
        whole = ((1 << rank) - 1) & ~(1 << axis)  # every other axis in full, known size or not
        return tf.strided_slice(x, begin, end, strides, begin_mask=whole, end_mask=whole)

    @staticmethod
    def pad(x, pads):
        return tf.pad(x, [list(p) for p in pads])

    @staticmethod
    def reshape(x, shape):
        return tf.reshape(x, [-1 if d is None else d for d in shape])

    stack = staticmethod(tf.stack)


WINOGRAD_ENV = "BIT_TF2_WINOGRAD"
_WINO_M = 2


def use_winograd(x: tf.Tensor) -> bool:
    """Winograd for float32 3x3 convolutions of known image size on CPU (BIT_TF2_WINOGRAD=1/0
    overrides). F(2, 3) does oneDNN's direct convolution's work with 2.25x fewer
    multiplications; GPUs have cuDNN's own algorithms, and half precision would lose accuracy
    in the transforms. The batch may be unknown; an unknown height, width or channel count (the
    export's any-size signatures) keeps the direct op.
    """
    if x.dtype != tf.float32 or not x.shape[1:].is_fully_defined():
        return False
    forced = runtime.env_override(WINOGRAD_ENV)
    return not tf.config.list_logical_devices("GPU") if forced is None else forced


# The transforms are additions over strided views: each direction is one XLA-compiled function
# (fused passes over the activations); the batched matmuls between them stay TensorFlow ops.
@tf.function(jit_compile=True)
def _wino_input(x):
    return winograd.input_transform(_TfOps, x, x.shape, _WINO_M)


@tf.function(jit_compile=True)
def _wino_input_again(x, g):
    """`_wino_input(x)` once `g` exists: the backward's recomputation, which the executor would
    otherwise run during the forward pass and keep until the backward."""
    return _wino_input(after(x, g))


@tf.function(jit_compile=True)
def _wino_kernel(w):
    return winograd.kernel_transform(_TfOps, w, _WINO_M)


@tf.function(jit_compile=True)
def _wino_output(mm, x):
    return winograd.output_transform(_TfOps, mm, (*x.shape[:3], mm.shape[-1]), _WINO_M)


@tf.function(jit_compile=True)
def _wino_output_grad(g):
    return winograd.output_transform_grad(_TfOps, g, g.shape, _WINO_M)


@tf.function(jit_compile=True)
def _wino_input_grad(dv, x):
    return winograd.input_transform_grad(_TfOps, dv, x.shape, _WINO_M)


@tf.function(jit_compile=True)
def _wino_kernel_grad(du):
    return winograd.kernel_transform_grad(_TfOps, du, _WINO_M)


@tf.custom_gradient
def conv3x3_winograd(x: tf.Tensor, w: tf.Tensor):
    """A stride-1, padding-1 NHWC/HWIO 3x3 convolution by Winograd F(2x2, 3x3), with the
    transposed transforms as its gradient (`bit_common.winograd`). The transformed input (4x the
    size of x) is recomputed in the backward pass rather than kept."""
    u = _wino_kernel(w)
    y = _wino_output(tf.matmul(_wino_input(x), u), x)

    def grad(g):
        dm = _wino_output_grad(g)
        du = tf.matmul(_wino_input_again(x, g), dm, transpose_a=True)
        return _wino_input_grad(tf.matmul(dm, u, transpose_b=True), x), _wino_kernel_grad(du)

    return y, grad


def _group_sums(t: tf.Tensor) -> tf.Tensor:
    """Per-group sums of per-channel values (N, 1, C), broadcast back to (N, 1, C)."""
    n, c = tf.shape(t)[0], t.shape[-1]
    s = tf.reduce_sum(tf.reshape(t, [n, 1, GN_GROUPS, c // GN_GROUPS]), axis=3, keepdims=True)
    return tf.reshape(tf.broadcast_to(s, [n, 1, GN_GROUPS, c // GN_GROUPS]), [n, 1, c])


def _as_nlc(x: tf.Tensor) -> tf.Tensor:
    return tf.reshape(x, [tf.shape(x)[0], -1, x.shape[-1]])


# The statistics reduce over H*W per channel first, then over a group's channels on a tiny
# (N, 1, C) tensor: Eigen reduces one contiguous axis 3x faster than (H*W, C/32) at once. XLA
# fuses each direction into a couple of passes over the activations (2x faster on CPU than the
# same ops one kernel each); the convolutions around it stay on oneDNN.
@tf.function(jit_compile=True)
def _gn_relu_fwd(x, gamma, beta):
    x3 = _as_nlc(x)
    count = tf.cast(tf.shape(x3)[1] * (x3.shape[-1] // GN_GROUPS), tf.float32)
    mean = _group_sums(tf.reduce_sum(x3, axis=1, keepdims=True)) / count
    var = _group_sums(tf.reduce_sum(tf.math.squared_difference(x3, mean), axis=1,
                                    keepdims=True)) / count  # two-pass, biased
    rstd = tf.math.rsqrt(var + GN_EPS)
    scale = gamma * rstd
    y = tf.nn.relu(x3 * scale + (beta - mean * scale))
    return tf.reshape(y, tf.shape(x)), mean, rstd


@tf.function(jit_compile=True)
def _gn_relu_bwd(dy, x, y, mean, rstd, gamma):
    x3 = _as_nlc(x)
    gy = tf.where(_as_nlc(y) > 0, _as_nlc(dy), 0.0)
    centred = x3 - mean
    s1 = tf.reduce_sum(gy, axis=1, keepdims=True)                    # sum(dy') per channel
    s2 = tf.reduce_sum(gy * centred, axis=1, keepdims=True) * rstd   # sum(dy' * xhat)
    count = tf.cast(tf.shape(x3)[1] * (x3.shape[-1] // GN_GROUPS), tf.float32)
    m1 = _group_sums(gamma * s1) / count  # group mean of d(xhat)
    m2 = _group_sums(gamma * s2) / count  # group mean of d(xhat) * xhat
    dx = gy * (gamma * rstd) - centred * (rstd * rstd * m2) - rstd * m1
    return tf.reshape(dx, tf.shape(x)), tf.reduce_sum(s2, [0, 1]), tf.reduce_sum(s1, [0, 1])


@tf.custom_gradient
def group_norm_relu(x: tf.Tensor, gamma: tf.Tensor, beta: tf.Tensor):
    """relu(group_norm(x) * gamma + beta), groups over (H, W, C/32), statistics in float32.

    With its own gradient: the input gradient needs only the per-channel sums of dy' and
    dy' * xhat, where autodiff of the same formula makes several more passes over the
    activations (on CPU they cost as much as the convolutions).
    """
    dtype = x.dtype
    xf = tf.cast(x, tf.float32)
    y, mean, rstd = _gn_relu_fwd(xf, gamma, beta)

    def grad(dy):
        dx, dgamma, dbeta = _gn_relu_bwd(tf.cast(dy, tf.float32), xf, y, mean, rstd, gamma)
        return tf.cast(dx, dtype), dgamma, dbeta

    return tf.cast(y, dtype), grad


