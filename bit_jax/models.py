"""BiT ResNet-v2 (GroupNorm + Weight Standardization) in flax linen, and the package contract.

The computation is the one the released weights expect (`bit_common.checkpoint`): NHWC, explicit
symmetric padding (never "SAME", which pads stride-2 convolutions asymmetrically), a zero-padded
max pool, pre-activation bottlenecks with the stride on the 3x3 convolution. The kernels under
it, with their hand-written gradients, are in `bit_jax.ops`.

The flax module names follow the released keys, so a parameter's path is its key without
`resnet/`, group norm's `gamma`/`beta` named `scale`/`bias` (`param_path`).

    from bit_jax import models
    m = models.load_npz("BiT-M-R50x1.npz", num_classes=10)
    logits = models.predict(m, images)   # float32 NHWC in [-1, 1] -> float32 [N, C]
    f = models.embed(m, images)          # pre-logits [N, 2048 * width]
    s = models.features(m, images)       # {"block1".."block4": NHWC stage outputs}
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax import lax

from bit_common import checkpoint, contract
from bit_common.checkpoint import PREFIX
from bit_common.registry import Arch
from bit_jax import ops

# Parameters always stay float32; `dtype` is the compute dtype (bfloat16 for mixed precision).
Dtype = Any


def precision_of(dtype: Dtype) -> lax.Precision:
    """Full float32 matmuls/convolutions (no TF32 on GPU) unless computing in a low precision."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


class StdConv(nn.Module):
    """A bias-free convolution whose HWIO kernel is standardized over H, W, I."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        w = self.param("kernel", nn.initializers.he_normal(), (k, k, x.shape[-1], self.features),
                       jnp.float32)
        w = ops.standardize_kernel(w).astype(self.dtype)
        x, s, prec = x.astype(self.dtype), self.stride, precision_of(self.dtype)
        if k == 1 and self.padding == 0:
            return ops.conv1x1(x[:, ::s, ::s, :] if s > 1 else x, w, prec)
        if k == 3 and s == 1 and self.padding == 1 and ops.use_winograd(self.dtype):
            return ops.conv3x3_winograd(x, w, prec)
        return ops.conv(x, w, s, self.padding, prec)


class GroupNorm(nn.Module):
    """Group norm (32 groups, eps 1e-5) with per-channel scale and bias; statistics in float32.

    With `relu=True` it returns `relu(group_norm(x))`, fused into the same pass.
    """

    dtype: Dtype = jnp.float32
    relu: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        x3 = x.reshape(x.shape[0], -1, c)
        y = ops.group_norm_act(x3, scale, bias, self.relu, jnp.dtype(self.dtype))
        return y.reshape(x.shape)


class Conv(nn.Module):
    """A module holding one standardized convolution (`root_block`, `proj`)."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return StdConv(self.features, self.kernel_size, self.stride, self.padding, self.dtype,
                       name="standardized_conv2d")(x)


class PreActConv(nn.Module):
    """`relu(group_norm(x))` then a standardized conv; with `proj_features`, also the shortcut
    projection of the pre-activated input. Named `a`, `b` or `c` inside a unit."""

    features: int
    kernel_size: int
    stride: int = 1
    proj_features: int | None = None
    proj_stride: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        a = GroupNorm(self.dtype, relu=True, name="group_norm")(x)
        shortcut = None
        if self.proj_features is not None:
            shortcut = Conv(self.proj_features, 1, self.proj_stride, 0, self.dtype,
                            name="proj")(a)
        y = StdConv(self.features, self.kernel_size, self.stride, self.kernel_size // 2,
                    self.dtype, name="standardized_conv2d")(a)
        return y, shortcut


class Unit(nn.Module):
    """Pre-activation bottleneck: the stride is on the 3x3 convolution."""

    cmid: int
    cout: int
    stride: int
    proj: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y, shortcut = PreActConv(self.cmid, 1, 1, self.cout if self.proj else None, self.stride,
                                 self.dtype, name="a")(x)
        y, _ = PreActConv(self.cmid, 3, self.stride, dtype=self.dtype, name="b")(y)
        y, _ = PreActConv(self.cout, 1, 1, dtype=self.dtype, name="c")(y)
        return y + (x if shortcut is None else shortcut)


class Block(nn.Module):
    num_units: int
    cmid: int
    stride: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for u in range(1, self.num_units + 1):
            x = Unit(self.cmid, 4 * self.cmid, self.stride if u == 1 else 1, u == 1, self.dtype,
                     name=f"unit{u:02d}")(x)
        return x


class Head(nn.Module):
    """The classifier: a 1x1 convolution with bias on the pooled features (kernel (1,1,C,K))."""

    num_classes: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _Conv1x1(self.num_classes, self.dtype, name="conv2d")(x)


class _Conv1x1(nn.Module):
    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.param("kernel", nn.initializers.zeros, (1, 1, x.shape[-1], self.features),
                       jnp.float32)
        b = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        y = jnp.dot(x.astype(self.dtype), k[0, 0].astype(self.dtype),
                    precision=precision_of(self.dtype))
        return y.astype(jnp.float32) + b


class ResNetV2(nn.Module):
    """BiT ResNet-v2: logits, with `pre_logits=True` the pooled features, or with `stages=True`
    {"block1".."block4": each block's output} (all float32)."""

    depth: int
    width: int
    num_classes: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, pre_logits: bool = False,
                 stages: bool = False) -> jax.Array | dict[str, jax.Array]:
        wf, dt = self.width, self.dtype
        x = Conv(64 * wf, 7, 2, 3, dt, name="root_block")(x.astype(dt))
        x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))  # zeros, not -inf (as the weights expect)
        x = ops.max_pool(x, 3, 2)
        outputs = {}  # a trace-time table: XLA frees whatever a program does not return
        for b, n in enumerate(Arch(self.depth, self.width).units):
            name = contract.STAGES[b]
            x = outputs[name] = Block(n, 64 * wf * 2 ** b, 1 if b == 0 else 2, dt, name=name)(x)
        if stages:
            return {k: v.astype(jnp.float32) for k, v in outputs.items()}
        x = GroupNorm(dt, relu=True, name="group_norm")(x)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if pre_logits:
            return x
        return Head(self.num_classes, dt, name="head")(x)


# ---- parameters: flax tree <-> canonical (released) names -----------------------------------
_GN_LEAVES = {"gamma": "scale", "beta": "bias"}


def param_path(key: str) -> str:
    """The flax parameter path ('/'-joined) of the released parameter `key`."""
    head, _, leaf = key[len(PREFIX):].rpartition("/")
    return f"{head}/{_GN_LEAVES[leaf]}" if head.endswith("group_norm") else f"{head}/{leaf}"


def params_from_canonical(params: Mapping[str, np.ndarray]) -> dict:
    """Canonical flat params -> the flax parameter tree (numpy leaves)."""
    return traverse_util.unflatten_dict(checkpoint.to_framework(params, param_path), sep="/")


def params_to_canonical(tree: Mapping, arch: Arch, num_classes: int) -> dict[str, np.ndarray]:
    """The flax parameter tree -> canonical flat params (validated against the released layout)."""
    flat = traverse_util.flatten_dict(_unfreeze(tree), sep="/")
    return checkpoint.from_framework({k: _to_numpy(v) for k, v in flat.items()}, arch,
                                     num_classes, param_path, source="The JAX model")


def _unfreeze(tree: Mapping) -> dict:
    if "params" in tree and len(tree) == 1:
        tree = tree["params"]
    return {k: _unfreeze(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)  # replicated across processes: every shard is the whole array
    return np.asarray(jax.device_get(x), dtype=np.float32)


# ---- the contract ------------------------------------------------------------------------------
@dataclass
class BiTModel:
    """A ResNet-v2 with its parameters: what `load_npz` returns and `predict`/`embed` take."""

    module: ResNetV2
    arch: Arch
    num_classes: int
    params: dict  # flax parameter tree (no "params" collection wrapper)
    _fns: dict[str, Callable] = field(default_factory=dict, repr=False, compare=False)

    def jitted(self, method: str) -> Callable:
        """jit-compiled `apply` of `method` ('logits', 'embed' or 'features'); compiled once per
        shape."""
        if method not in self._fns:
            self._fns[method] = _jitted_apply(self.module, method)
        return self._fns[method]


_APPLY_CACHE: dict[tuple, Callable] = {}


def _jitted_apply(module: ResNetV2, method: str) -> Callable:
    key = (module.depth, module.width, module.num_classes, jnp.dtype(module.dtype).name, method)
    if key not in _APPLY_CACHE:
        kwargs = {"embed": {"pre_logits": True}, "features": {"stages": True}}.get(method, {})
        _APPLY_CACHE[key] = jax.jit(
            lambda params, x: module.apply({"params": params}, x, **kwargs))
    return _APPLY_CACHE[key]


def make_module(arch: Arch, num_classes: int, dtype: Dtype = jnp.float32) -> ResNetV2:
    return ResNetV2(arch.depth, arch.width, num_classes, dtype)


def from_params(arch: Arch, params: Mapping[str, np.ndarray]) -> BiTModel:
    """A model from canonical params (validated: missing or mis-shaped keys raise)."""
    num_classes = int(params[checkpoint.HEAD_BIAS].shape[0]) if checkpoint.HEAD_BIAS in params \
        else 0
    checkpoint.validate(params, arch, num_classes, source="The parameters")
    tree = jax.tree.map(jnp.asarray, params_from_canonical(params))
    return BiTModel(make_module(arch, num_classes), arch, num_classes, tree)


def to_params(model: BiTModel) -> dict[str, np.ndarray]:
    """The model's parameters under their canonical (released) names, as float32 numpy."""
    return params_to_canonical(model.params, model.arch, model.num_classes)


def load_npz(path: str | os.PathLike, num_classes: int | None = None) -> BiTModel:
    """Load a released `.npz` (architecture read off the file); `num_classes` -> new zero head."""
    arch, params = checkpoint.load_params(path, num_classes=num_classes)
    return from_params(arch, params)


def save_npz(model: BiTModel, path: str | os.PathLike) -> None:
    """Write the model in the released layout (atomically), loadable by every framework."""
    checkpoint.save_params(to_params(model), path)


def _run(model: BiTModel, images: Any, method: str, width: int, batch_size: int) -> np.ndarray:
    fn = model.jitted(method)
    # Padded chunks: jit compiles once per input shape, so a few programs per image size.
    return contract.run_in_batches(lambda x: np.asarray(fn(model.params, x)), images, width,
                                   batch_size, pad=True)


def predict(model: BiTModel, images: Any, batch_size: int = contract.PREDICT_BATCH) -> np.ndarray:
    """float32 NHWC images in [-1, 1] -> float32 logits [N, num_classes]."""
    return _run(model, images, "logits", model.num_classes, batch_size)


def embed(model: BiTModel, images: Any, batch_size: int = contract.PREDICT_BATCH) -> np.ndarray:
    """float32 NHWC images in [-1, 1] -> pre-logits [N, 2048 * width]."""
    return _run(model, images, "embed", model.arch.feature_dim, batch_size)


def features(model: BiTModel, images: Any,
             batch_size: int = contract.PREDICT_BATCH) -> dict[str, np.ndarray]:
    """float32 NHWC images in [-1, 1] -> {"block1".."block4": float32 NHWC stage outputs}, the
    raw residual stream at the end of each block (timm's `features_only` taps); shapes and what
    the taps are: `bit_common.contract.feature_shapes`.
    """
    fn = model.jitted("features")
    # Padded chunks, as in `_run`: a few programs per image size.
    return contract.run_dict_in_batches(
        lambda x: jax.device_get(fn(model.params, x)), images,
        functools.partial(contract.feature_shapes, model.arch), batch_size, pad=True)
