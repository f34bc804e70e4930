"""BiT ResNet-v2 (GroupNorm + Weight Standardization) as Keras 3 layers on the TensorFlow backend.

The computation is exactly the one the released `.npz` weights expect
(`shared/spec/checkpoint-format.md`): explicit symmetric padding, a zero-padded max pool in the
root, pre-activation bottleneck units with the stride on the 3x3 conv, and a head that is
`relu(group_norm(x))`, a global mean and a 1x1 conv (a dense layer with a bias).

Every variable is reachable through `model.named_variables`, keyed by the names
`bit_common.checkpoint.framework_key(key, "tf2")` gives; the conversion to and from the canonical
(released) names is done by `bit_common.checkpoint` only.

    model = load_npz("BiT-M-R50x1.npz", num_classes=10)   # zero head for fine-tuning
    logits = predict(model, images)                        # float32 NHWC in [-1, 1]
    save_npz(model, "model.npz")
    export(model, "saved_model/")                          # plain tf.saved_model.load works
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tensorflow as tf

from bit_common import checkpoint, runtime, winograd
from bit_common.errors import CheckpointError
from bit_common.registry import Arch

# Keras 3 (tf.keras in TF >= 2.16 is Keras 3); import it the way TF exposes it.
keras = tf.keras

FRAMEWORK = "tf2"
# Full float32 on GPUs, as in the other two frameworks: the parity tolerances assume it.
tf.config.experimental.enable_tensor_float_32_execution(False)
GN_GROUPS, GN_EPS, WS_EPS = 32, 1e-5, 1e-10


# ---- layers --------------------------------------------------------------------------------
class StandardizedConv2D(keras.layers.Layer):
    """Conv without bias whose HWIO kernel is standardized over (H, W, I) on every call.

    `(w - mean) / sqrt(var + 1e-10)` with the biased variance, computed in float32 (the layer
    does not autocast its kernel), then cast to the compute dtype. `padding` zeros are added
    symmetrically on each side (never TF's 'SAME', which pads strided convolutions on one side);
    stride-1 3x3 layers compute by Winograd where `use_winograd` says so.
    """

    def __init__(self, filters: int, kernel_size: int, strides: int = 1, padding: int = 0,
                 **kwargs):
        super().__init__(autocast=False, **kwargs)
        self.filters, self.kernel_size, self.strides = filters, kernel_size, strides
        self.padding = padding

    def build(self, input_shape):
        k = self.kernel_size
        self.kernel = self.add_weight(name="kernel", shape=(k, k, int(input_shape[-1]),
                                                             self.filters),
                                      initializer="he_normal", dtype="float32")

    def call(self, x):
        w = tf.cast(standardize_kernel(tf.convert_to_tensor(self.kernel)), x.dtype)
        if (self.kernel_size, self.strides, self.padding) == (3, 1, 1) and use_winograd(x):
            return conv3x3_winograd(x, w)
        return tf.nn.conv2d(_pad(x, self.padding), w, strides=self.strides, padding="VALID")

    def named_variables(self, prefix: str) -> dict:
        return {f"{prefix}/kernel": self.kernel}


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
        begin, end, strides = [0] * x.shape.rank, list(x.shape), [1] * x.shape.rank
        begin[axis], end[axis], strides[axis] = start, stop, step
        return tf.strided_slice(x, begin, end, strides)

    @staticmethod
    def pad(x, pads):
        return tf.pad(x, [list(p) for p in pads])

    stack, reshape = staticmethod(tf.stack), staticmethod(tf.reshape)


WINOGRAD_ENV = "BIT_TF2_WINOGRAD"
_WINO_M = 2


def use_winograd(x: tf.Tensor) -> bool:
    """Winograd for float32 3x3 convolutions of known shape on CPU (BIT_TF2_WINOGRAD=1/0
    overrides). F(2, 3) does oneDNN's direct convolution's work with 2.25x fewer
    multiplications; GPUs have cuDNN's own algorithms, and half precision would lose accuracy
    in the transforms. An unknown dimension (an export signature's batch) keeps the direct op.
    """
    if x.dtype != tf.float32 or not x.shape.is_fully_defined():
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
    otherwise run during the forward pass and keep until the backward (XLA does not fold the
    float `0 * g`)."""
    return _wino_input(x + 0 * g[0, 0, 0, 0])


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
def _group_norm_relu(x: tf.Tensor, gamma: tf.Tensor, beta: tf.Tensor):
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


class GroupNormReLU(keras.layers.Layer):
    """`relu(group_norm(x))`: 32 groups, eps 1e-5, biased two-pass variance, per-channel
    `gamma`/`beta`; statistics in float32 under mixed precision. BiT follows every group norm
    with a ReLU, so the two are one op with one hand-written gradient."""

    def __init__(self, **kwargs):
        super().__init__(autocast=False, **kwargs)  # float32 gamma/beta; x keeps its dtype

    def build(self, input_shape):
        c = int(input_shape[-1])
        self.gamma = self.add_weight(name="gamma", shape=(c,), initializer="ones",
                                     dtype="float32")
        self.beta = self.add_weight(name="beta", shape=(c,), initializer="zeros",
                                    dtype="float32")

    def call(self, x):
        return _group_norm_relu(x, tf.convert_to_tensor(self.gamma),
                                tf.convert_to_tensor(self.beta))


def group_norm_relu(name: str = "group_norm") -> GroupNormReLU:
    return GroupNormReLU(name=name)


def _gn_vars(layer: GroupNormReLU, prefix: str) -> dict:
    return {f"{prefix}/gamma": layer.gamma, f"{prefix}/beta": layer.beta}


def _pad(x, p: int):
    return tf.pad(x, [[0, 0], [p, p], [p, p], [0, 0]]) if p else x


class Bottleneck(keras.layers.Layer):
    """Pre-activation bottleneck unit; the stride is on the 3x3 conv and on the projection."""

    def __init__(self, cmid: int, cout: int, stride: int, proj: bool, **kwargs):
        super().__init__(**kwargs)
        self.stride = stride
        self.gn_a, self.gn_b, self.gn_c = (group_norm_relu("gn_a"), group_norm_relu("gn_b"),
                                           group_norm_relu("gn_c"))
        self.conv_a = StandardizedConv2D(cmid, 1, name="conv_a")
        self.conv_b = StandardizedConv2D(cmid, 3, stride, padding=1, name="conv_b")
        self.conv_c = StandardizedConv2D(cout, 1, name="conv_c")
        self.proj = StandardizedConv2D(cout, 1, stride, name="proj") if proj else None

    def call(self, x):
        a = self.gn_a(x)
        shortcut = x if self.proj is None else self.proj(a)
        y = self.conv_a(a)
        y = self.conv_b(self.gn_b(y))
        y = self.conv_c(self.gn_c(y))
        return y + shortcut

    def named_variables(self, prefix: str) -> dict:
        out = {}
        for sub, gn, conv in (("a", self.gn_a, self.conv_a), ("b", self.gn_b, self.conv_b),
                              ("c", self.gn_c, self.conv_c)):
            out.update(_gn_vars(gn, f"{prefix}/{sub}/group_norm"))
            out.update(conv.named_variables(f"{prefix}/{sub}/standardized_conv2d"))
        if self.proj is not None:
            out.update(self.proj.named_variables(f"{prefix}/a/proj/standardized_conv2d"))
        return out


class Head(keras.layers.Layer):
    """The 1x1 conv on the pooled features, kernel stored (1, 1, C, K) as in the release."""

    def __init__(self, num_classes: int, **kwargs):
        super().__init__(autocast=False, **kwargs)
        self.num_classes = num_classes

    def build(self, input_shape):
        c = int(input_shape[-1])
        self.kernel = self.add_weight(name="kernel", shape=(1, 1, c, self.num_classes),
                                      initializer="zeros", dtype="float32")
        self.bias = self.add_weight(name="bias", shape=(self.num_classes,),
                                    initializer="zeros", dtype="float32")

    def call(self, features):
        w = tf.reshape(tf.convert_to_tensor(self.kernel), [-1, self.num_classes])
        return tf.matmul(tf.cast(features, tf.float32), w) + self.bias

    def named_variables(self, prefix: str) -> dict:
        return {f"{prefix}/kernel": self.kernel, f"{prefix}/bias": self.bias}


class _Untracked:
    """A plain holder that Keras' and TF's attribute tracking ignore (no double tracking of the
    variables, no cached tf.functions in SavedModels)."""

    def __init__(self, table: dict):
        self.table = table
        self.fns: dict = {}


class ResNetV2(keras.Model):
    """BiT ResNet-v2 for an architecture and a head size.

    `model(x)` gives logits, `model(x, features=True)` the pre-logits; `named_variables` maps the
    tf2 names of `bit_common.checkpoint` to the variables.
    """

    def __init__(self, arch: Arch, num_classes: int, **kwargs):
        super().__init__(**kwargs)
        self.arch, self.num_classes = arch, num_classes
        self.root_conv = StandardizedConv2D(64 * arch.width, 7, 2, name="root_conv")
        self.unit_names = []
        self.units = []
        for _, name, _, cmid, cout, stride in checkpoint.unit_names(arch):
            self.unit_names.append(name)
            self.units.append(Bottleneck(cmid, cout, stride, proj=name.endswith("unit01"),
                                         name=name.replace("/", "_")))
        self.pre_head_gn = group_norm_relu("pre_head_gn")
        self.head = Head(num_classes, name="head")
        self.build((None, None, None, 3))
        self._untracked = _Untracked(self._collect_names())

    @property
    def named_variables(self) -> dict:
        """{tf2 name (see `checkpoint.framework_key`): variable} for every parameter."""
        return self._untracked.table

    def build(self, input_shape):
        # Building once on a tiny input creates every variable with its final shape. Through
        # __call__ (marked built first, so it does not come back here), as every later call:
        # under a mixed policy only __call__ gives the float32-reading layers their scope.
        if not self.built:
            self.built = True
            self(tf.zeros((1, 32, 32, 3)))

    def call(self, x, features: bool = False):
        x = tf.cast(x, self.compute_dtype)
        x = self.root_conv(_pad(x, 3))
        x = tf.nn.max_pool2d(_pad(x, 1), ksize=3, strides=2, padding="VALID")  # zero pad
        for unit in self.units:
            x = unit(x)
        x = self.pre_head_gn(x)
        feats = tf.reduce_mean(tf.cast(x, tf.float32), axis=[1, 2])
        return feats if features else self.head(feats)

    def _collect_names(self) -> dict:
        names = self.root_conv.named_variables("root_block/standardized_conv2d")
        for name, unit in zip(self.unit_names, self.units):
            names.update(unit.named_variables(name))
        names.update(_gn_vars(self.pre_head_gn, "group_norm"))
        names.update(self.head.named_variables("head/conv2d"))
        want = {checkpoint.framework_key(k, FRAMEWORK)
                for k in checkpoint.expected_shapes(self.arch, self.num_classes)}
        if set(names) != want:  # a programming error, never a user's
            raise AssertionError(f"tf2 names differ from bit_common's: "
                                 f"{sorted(set(names) ^ want)[:5]}")
        if len({id(v) for v in names.values()}) != len(self.trainable_variables):
            raise AssertionError("named_variables does not cover every trainable variable")
        return names


# ---- conversion ----------------------------------------------------------------------------
def from_params(arch: Arch, params: dict[str, np.ndarray]) -> ResNetV2:
    """A model holding canonical `params` (validated; the head size is read off them).

    Call it inside `strategy.scope()` to get mirrored variables.
    """
    if checkpoint.HEAD_BIAS not in params:
        raise CheckpointError(f"Parameters have no {checkpoint.HEAD_BIAS!r}.")
    num_classes = int(np.shape(params[checkpoint.HEAD_BIAS])[0])
    checkpoint.validate(params, arch, num_classes, source="Parameters")
    model = ResNetV2(arch, num_classes)
    assign_params(model, params)
    return model


def assign_params(model: ResNetV2, params: dict[str, np.ndarray]) -> None:
    """Copy canonical `params` into the model's variables."""
    checkpoint.validate(params, model.arch, model.num_classes, source="Parameters")
    for name, value in checkpoint.to_framework(params, FRAMEWORK).items():
        model.named_variables[name].assign(np.asarray(value, np.float32))


def to_params(model: ResNetV2) -> dict[str, np.ndarray]:
    """The model's weights as canonical (released-layout) numpy arrays."""
    values = {name: np.asarray(v.numpy(), np.float32) for name, v in model.named_variables.items()}
    return checkpoint.from_framework(values, model.arch, model.num_classes, FRAMEWORK)


# ---- the contract --------------------------------------------------------------------------
def load_npz(path: str | os.PathLike, num_classes: int | None = None) -> ResNetV2:
    """A model from a released-layout `.npz`; with `num_classes`, a new zero head."""
    arch, params = checkpoint.load_params(path, num_classes=num_classes)
    return from_params(arch, params)


def save_npz(model: ResNetV2, path: str | os.PathLike) -> None:
    """Write the model in the released layout (atomically), loadable by every framework."""
    checkpoint.save_params(to_params(model), path)


def _compiled(model: ResNetV2, features: bool, shape: tuple):
    key = (features, shape)
    fn = model._untracked.fns.get(key)
    if fn is None:
        fn = tf.function(lambda x: model(x, features=features), jit_compile=_jit_inference(),
                         reduce_retracing=False)
        model._untracked.fns[key] = fn
    return fn


def _jit_inference() -> bool:
    # XLA fuses the standardization and group norms on GPUs; on CPU the oneDNN convolutions of
    # the plain graph are faster (see the README's bench table).
    return bool(tf.config.list_logical_devices("GPU"))


def _run(model: ResNetV2, images: np.ndarray, features: bool, batch_size: int) -> np.ndarray:
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be float32 NHWC with 3 channels, got {images.shape}")
    outs = []
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        outs.append(_compiled(model, features, chunk.shape)(tf.constant(chunk)).numpy())
    dim = model.arch.feature_dim if features else model.num_classes
    return np.concatenate(outs).astype(np.float32) if outs else np.zeros((0, dim), np.float32)


def predict(model: ResNetV2, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Logits [N, C] (float32) of float32 NHWC images in [-1, 1]."""
    return _run(model, images, False, batch_size)


def embed(model: ResNetV2, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Pre-logits [N, 2048 * width] (float32) of float32 NHWC images in [-1, 1]."""
    return _run(model, images, True, batch_size)


class _Serving(tf.Module):
    """What `export` saves: the model's variables and two signatures, no Python classes."""

    def __init__(self, model: ResNetV2):
        super().__init__(name="bit_resnet_v2")
        self.model = model
        # Plain tf.Variables tracked by name: the SavedModel needs nothing from this package.
        spec = tf.TensorSpec([None, None, None, 3], tf.float32, name="images")
        self.serve = tf.function(lambda images: {"logits": model(images)},
                                 input_signature=[spec])
        self.embed = tf.function(lambda images: {"pre_logits": model(images, features=True)},
                                 input_signature=[spec])


def export(model: ResNetV2, path: str | os.PathLike) -> Path:
    """Write a SavedModel whose `serving_default` maps float32 NHWC images in [-1, 1]
    (any size, any batch) to `{"logits": [N, C]}`; `embed` gives `{"pre_logits": ...}`.

    `tf.saved_model.load(path)` restores it without this package:
    `tf.saved_model.load(path).serve(images)["logits"]`.
    """
    path = Path(path)
    module = _Serving(model)
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve,
                                                      "embed": module.embed})
    return path
