"""The hand-written gradients of bit_jax.ops agree with autodiff of the plain XLA ops."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from bit_jax import models, ops

HIGHEST = lax.Precision.HIGHEST


def _close(got, want, rtol: float = 1e-5) -> None:
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        scale = float(jnp.max(jnp.abs(w)))
        assert float(jnp.max(jnp.abs(g - w))) <= rtol * scale, (g.shape, scale)


def _value_and_grads(fn, *args):
    rng = np.random.default_rng(1)
    probe = jnp.asarray(rng.standard_normal(jax.eval_shape(fn, *args).shape, dtype=np.float32))
    return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(fn(*a) * probe),
                                      argnums=tuple(range(len(args)))))(*args)


@pytest.mark.parametrize("k,stride,cin,cout", [(3, 1, 16, 8), (3, 2, 8, 16), (7, 2, 3, 16),
                                               (7, 1, 4, 8)])
def test_conv_kxk_matches_xla_conv(k, stride, cin, cout):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 13, 11, cin), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((k, k, cin, cout), dtype=np.float32))
    pad = k // 2
    want = _value_and_grads(lambda x, w: lax.conv_general_dilated(
        x, w, (stride, stride), [(pad, pad)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=HIGHEST), x, w)
    got = _value_and_grads(lambda x, w: ops.conv(x, w, stride, pad, HIGHEST), x, w)
    _close(got, want)


@pytest.mark.parametrize("shape", [(2, 13, 11, 16), (2, 8, 8, 24), (1, 1, 3, 8)])
def test_winograd_conv_matches_xla_conv(shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, shape[-1], 12), dtype=np.float32))
    want = _value_and_grads(lambda x, w: lax.conv_general_dilated(
        x, w, (1, 1), [(1, 1)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=HIGHEST), x, w)
    got = _value_and_grads(lambda x, w: ops.conv3x3_winograd(x, w, HIGHEST), x, w)
    _close(got, want)


def test_std_conv_takes_winograd_for_float32_3x3_on_cpu(monkeypatch):
    """The stride-1 3x3 layers use Winograd on CPU, BIT_JAX_WINOGRAD=0 turns it off, and the
    two agree; strided, 1x1 and bfloat16 layers never use it."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 9, 9, 8), dtype=np.float32))

    calls = []
    winograd_conv = ops.conv3x3_winograd
    monkeypatch.setattr(ops, "conv3x3_winograd",
                        lambda *a: calls.append(a) or winograd_conv(*a))

    def run(stride=1, k=3, dtype=jnp.float32):
        calls.clear()
        conv = models.StdConv(16, k, stride, k // 2, dtype)
        params = conv.init(jax.random.PRNGKey(0), x)
        return conv.apply(params, x), bool(calls)

    monkeypatch.delenv(ops.WINOGRAD_ENV, raising=False)
    y_wino, used = run()
    assert used and jax.default_backend() == "cpu"
    assert not run(stride=2)[1] and not run(k=1)[1] and not run(dtype=jnp.bfloat16)[1]
    monkeypatch.setenv(ops.WINOGRAD_ENV, "0")
    y_direct, used = run()
    assert not used
    np.testing.assert_allclose(y_wino, y_direct, rtol=1e-5, atol=1e-5)


def test_matmul_matches_dot_general():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((24, 40), dtype=np.float32))
    for cin, cout in ((24, 40), (40, 24)):
        x = jnp.asarray(rng.standard_normal((2, 5, 3, cin), dtype=np.float32))
        wk = w if cin == 24 else w.T
        want = _value_and_grads(lambda x, w: jnp.dot(x, w, precision=HIGHEST), x, wk)
        got = _value_and_grads(lambda x, w: ops.matmul(x, w, HIGHEST), x, wk)
        _close(got, want)


def test_max_pool_matches_flax_with_ties():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 11, 9, 4), dtype=np.float32))
    x = x.at[:, :, ::3].set(0.0).at[:, ::4].set(0.5)  # ties inside windows
    want = _value_and_grads(lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID"), x)
    got = _value_and_grads(lambda x: ops.max_pool(x, 3, 2), x)
    _close(got, want)


def test_weight_standardization_matches_the_formula_and_its_autodiff():
    """The kernel's standardization over H, W, I and its hand-written gradient vs the plain
    formula, on a kernel whose mean is far from zero (as a fine-tuned one can be)."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((3, 3, 8, 16), dtype=np.float32) * 0.05 + 0.3)

    def formula(w):
        mean = w.mean(axis=(0, 1, 2), keepdims=True)
        var = jnp.square(w - mean).mean(axis=(0, 1, 2), keepdims=True)
        return (w - mean) / jnp.sqrt(var + 1e-10)

    _close(_value_and_grads(ops.standardize_kernel, w), _value_and_grads(formula, w))


@pytest.mark.parametrize("relu", [False, True])
def test_group_norm_matches_the_formula_and_its_autodiff(relu):
    """GroupNorm's (+ ReLU's) folded pass and hand-written gradient vs plain (H*W, C/32) moments."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 5, 7, 64), dtype=np.float32) * 3 + 1)
    scale = jnp.asarray(rng.standard_normal(64, dtype=np.float32))
    bias = jnp.asarray(rng.standard_normal(64, dtype=np.float32))
    gn = models.GroupNorm(relu=relu)
    params = {"params": {"scale": scale, "bias": bias}}

    def formula(x, scale, bias):
        g = x.reshape(2, 5, 7, 32, 2)
        mean = g.mean(axis=(1, 2, 4), keepdims=True)
        var = jnp.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)
        z = ((g - mean) / jnp.sqrt(var + 1e-5)).reshape(x.shape) * scale + bias
        return nn.relu(z) if relu else z

    want = _value_and_grads(formula, x, scale, bias)
    got = _value_and_grads(lambda x, s, b: gn.apply({"params": {"scale": s, "bias": b}}, x),
                           x, scale, bias)
    _close(got, want, rtol=2e-5)
    assert gn.apply(params, x).shape == x.shape


def test_group_norm_relu_in_bfloat16():
    """bfloat16 in and out (statistics in float32); the gradient keeps the input's dtype."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 4, 4, 64), dtype=np.float32))
    params = {"params": {"scale": jnp.ones(64), "bias": jnp.zeros(64)}}
    gn32, gn16 = models.GroupNorm(relu=True), models.GroupNorm(jnp.bfloat16, relu=True)
    want = gn32.apply(params, x)
    got = gn16.apply(params, x.astype(jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    assert float(jnp.max(jnp.abs(got.astype(jnp.float32) - want))) <= 0.05
    dx = jax.grad(lambda x: jnp.sum(gn16.apply(params, x).astype(jnp.float32)))(
        x.astype(jnp.bfloat16))
    assert dx.dtype == jnp.bfloat16
