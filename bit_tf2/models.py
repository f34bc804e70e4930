"""BiT ResNet-v2 (GroupNorm + Weight Standardization) as Keras 3 layers on the TensorFlow backend.

The computation is exactly the one the released `.npz` weights expect (`bit_common.checkpoint`):
explicit symmetric padding, a zero-padded max pool in the root, pre-activation bottleneck units
with the stride on the 3x3 conv, and a head that is `relu(group_norm(x))`, a global mean and a
1x1 conv (a dense layer with a bias). The kernels under the layers are in `bit_tf2.ops`.

`model.variables_by_key` maps each released key to its variable (`_variable_table`).

    model = load_npz("BiT-M-R50x1.npz", num_classes=10)   # zero head for fine-tuning
    logits = predict(model, images)                        # float32 NHWC in [-1, 1]
    f = embed(model, images)                               # pre-logits [N, 2048 * width]
    s = features(model, images)                            # {"block1".."block4": NHWC}
    save_npz(model, "model.npz")
    export(model, "saved_model/")                          # plain tf.saved_model.load works
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import tensorflow as tf

from bit_common import checkpoint, contract
from bit_common.checkpoint import HEAD_BIAS, HEAD_KERNEL, PREFIX, ROOT_KERNEL
from bit_common.errors import CheckpointError
from bit_common.registry import Arch
from bit_tf2 import ops

# Keras 3 (tf.keras in TF >= 2.16 is Keras 3); import it the way TF exposes it.
keras = tf.keras


# ---- layers --------------------------------------------------------------------------------
class StandardizedConv2D(keras.layers.Layer):
    """Conv without bias whose HWIO kernel is standardized over (H, W, I) on every call.

    `(w - mean) / sqrt(var + 1e-10)` with the biased variance, computed in float32 (the layer
    does not autocast its kernel), then cast to the compute dtype. `padding` zeros are added
    symmetrically on each side (never TF's 'SAME', which pads strided convolutions on one side);
    stride-1 3x3 layers compute by Winograd where `ops.use_winograd` says so.
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
        w = tf.cast(ops.standardize_kernel(tf.convert_to_tensor(self.kernel)), x.dtype)
        if (self.kernel_size, self.strides, self.padding) == (3, 1, 1) and ops.use_winograd(x):
            return ops.conv3x3_winograd(x, w)
        return tf.nn.conv2d(ops.pad(x, self.padding), w, strides=self.strides, padding="VALID")


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
        return ops.group_norm_relu(x, tf.convert_to_tensor(self.gamma),
                                   tf.convert_to_tensor(self.beta))


class Bottleneck(keras.layers.Layer):
    """Pre-activation bottleneck unit; the stride is on the 3x3 conv and on the projection."""

    def __init__(self, cmid: int, cout: int, stride: int, proj: bool, **kwargs):
        super().__init__(**kwargs)
        self.stride = stride
        self.gn_a, self.gn_b, self.gn_c = (GroupNormReLU(name=n) for n in ("gn_a", "gn_b", "gn_c"))
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


class _Untracked:
    """A plain holder that Keras' and TF's attribute tracking ignore (no double tracking of the
    variables, no cached tf.functions in SavedModels)."""

    def __init__(self, table: dict):
        self.table = table
        self.fns: dict = {}


class ResNetV2(keras.Model):
    """BiT ResNet-v2 for an architecture and a head size.

    `model(x)` gives logits, `model(x, features=True)` the pre-logits, `model(x, stages=True)`
    {"block1".."block4": each block's output} (all float32); `variables_by_key` maps the released
    keys to the variables.
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
        self.pre_head_gn = GroupNormReLU(name="pre_head_gn")
        self.head = Head(num_classes, name="head")
        self.build((None, None, None, 3))
        self._untracked = _Untracked(_variable_table(self))

    @property
    def variables_by_key(self) -> dict[str, tf.Variable]:
        """{released key: variable} for every parameter."""
        return self._untracked.table

    def build(self, input_shape):
        # Building once on a tiny input creates every variable with its final shape. Through
        # __call__ (marked built first, so it does not come back here), as every later call:
        # under a mixed policy only __call__ gives the float32-reading layers their scope.
        if not self.built:
            self.built = True
            self(tf.zeros((1, 32, 32, 3)))

    def call(self, x, features: bool = False, stages: bool = False):
        x = tf.cast(x, self.compute_dtype)
        x = self.root_conv(ops.pad(x, 3))
        x = tf.nn.max_pool2d(ops.pad(x, 1), ksize=3, strides=2, padding="VALID")  # zero pad
        outputs = {}
        for name, unit in zip(self.unit_names, self.units):
            x = unit(x)
            if stages:  # kept only when asked for: eager calls would hold them to the end
                outputs[name.split("/")[0]] = x  # a block's output is its last unit's
        if stages:
            return {k: tf.cast(v, tf.float32) for k, v in outputs.items()}
        x = self.pre_head_gn(x)
        feats = tf.reduce_mean(tf.cast(x, tf.float32), axis=[1, 2])
        return feats if features else self.head(feats)


# ---- the released names of the layers' weights -------------------------------------------------
_UNIT_LAYERS = {"a": ("gn_a", "conv_a"), "b": ("gn_b", "conv_b"), "c": ("gn_c", "conv_c")}


def _variable_table(model: ResNetV2) -> dict[str, tf.Variable]:
    """{released key: variable}, checked to cover the released layout and every weight."""
    table = {ROOT_KERNEL: model.root_conv.kernel}
    for name, unit in zip(model.unit_names, model.units):
        prefix = f"{PREFIX}{name}/"
        for sub, (gn, conv) in _UNIT_LAYERS.items():
            table[f"{prefix}{sub}/group_norm/gamma"] = getattr(unit, gn).gamma
            table[f"{prefix}{sub}/group_norm/beta"] = getattr(unit, gn).beta
            table[f"{prefix}{sub}/standardized_conv2d/kernel"] = getattr(unit, conv).kernel
        if unit.proj is not None:
            table[f"{prefix}a/proj/standardized_conv2d/kernel"] = unit.proj.kernel
    table[f"{PREFIX}group_norm/gamma"] = model.pre_head_gn.gamma
    table[f"{PREFIX}group_norm/beta"] = model.pre_head_gn.beta
    table[HEAD_KERNEL], table[HEAD_BIAS] = model.head.kernel, model.head.bias
    want = checkpoint.expected_shapes(model.arch, model.num_classes)
    if set(table) != set(want) or len({id(v) for v in table.values()}) != len(
            model.trainable_variables):  # a programming error, never a user's
        raise AssertionError(f"The layers' weights do not match the released keys: "
                             f"{sorted(set(table) ^ set(want))[:5]}")
    return table


# ---- conversion ----------------------------------------------------------------------------
def from_params(arch: Arch, params: dict[str, np.ndarray]) -> ResNetV2:
    """A model holding canonical `params` (validated; the head size is read off them).

    Call it inside `strategy.scope()` to get mirrored variables.
    """
    if HEAD_BIAS not in params:
        raise CheckpointError(f"Parameters have no {HEAD_BIAS!r}.")
    num_classes = int(np.shape(params[HEAD_BIAS])[0])
    checkpoint.validate(params, arch, num_classes, source="Parameters")
    model = ResNetV2(arch, num_classes)
    assign_params(model, params)
    return model


def assign_params(model: ResNetV2, params: dict[str, np.ndarray]) -> None:
    """Copy canonical `params` into the model's variables."""
    checkpoint.validate(params, model.arch, model.num_classes, source="Parameters")
    for key, value in params.items():
        model.variables_by_key[key].assign(np.asarray(value, np.float32))


def to_params(model: ResNetV2) -> dict[str, np.ndarray]:
    """The model's weights as canonical (released-layout) numpy arrays."""
    params = {key: np.asarray(v.numpy(), np.float32) for key, v in model.variables_by_key.items()}
    checkpoint.validate(params, model.arch, model.num_classes, source="The TF2 model")
    return params


# ---- the contract --------------------------------------------------------------------------
def load_npz(path: str | os.PathLike, num_classes: int | None = None) -> ResNetV2:
    """A model from a released-layout `.npz`; with `num_classes`, a new zero head."""
    arch, params = checkpoint.load_params(path, num_classes=num_classes)
    return from_params(arch, params)


def save_npz(model: ResNetV2, path: str | os.PathLike) -> None:
    """Write the model in the released layout (atomically), loadable by every framework."""
    checkpoint.save_params(to_params(model), path)


_OUTPUTS = {"logits": {}, "embed": {"features": True}, "features": {"stages": True}}


def _forward(model: ResNetV2, output: str, x: tf.Tensor) -> tf.Tensor | dict[str, tf.Tensor]:
    return model(x, **_OUTPUTS[output])


def _compiled(model: ResNetV2, output: str, height: int, width: int):
    """The model's forward pass giving `output` ('logits', 'embed' or 'features') for images of
    one size, as a tf.function traced once with the batch left open: any batch size reuses it,
    with the Winograd convolutions (which need the image size). A partial rather than a closure,
    so that TensorFlow counts each one's traces apart."""
    key = (output, height, width)
    fn = model._untracked.fns.get(key)
    if fn is None:
        spec = tf.TensorSpec([None, height, width, 3], tf.float32)
        fn = tf.function(functools.partial(_forward, model, output), input_signature=[spec],
                         jit_compile=_jit_inference())
        model._untracked.fns[key] = fn
    return fn


def _jit_inference() -> bool:
    # XLA fuses the standardization and group norms on GPUs; on CPU the oneDNN convolutions of
    # the plain graph are faster (benchmarks/README.md).
    return bool(tf.config.list_logical_devices("GPU"))


def _run(model: ResNetV2, images: np.ndarray, features: bool, batch_size: int) -> np.ndarray:
    def forward(x: np.ndarray) -> np.ndarray:
        output = "embed" if features else "logits"
        return _compiled(model, output, *x.shape[1:3])(tf.constant(x)).numpy()

    width = model.arch.feature_dim if features else model.num_classes
    return contract.run_in_batches(forward, images, width, batch_size)


def predict(model: ResNetV2, images: np.ndarray,
            batch_size: int = contract.PREDICT_BATCH) -> np.ndarray:
    """Logits [N, C] (float32) of float32 NHWC images in [-1, 1]."""
    return _run(model, images, False, batch_size)


def embed(model: ResNetV2, images: np.ndarray,
          batch_size: int = contract.PREDICT_BATCH) -> np.ndarray:
    """Pre-logits [N, 2048 * width] (float32) of float32 NHWC images in [-1, 1]."""
    return _run(model, images, True, batch_size)


def features(model: ResNetV2, images: np.ndarray,
             batch_size: int = contract.PREDICT_BATCH) -> dict[str, np.ndarray]:
    """float32 NHWC images in [-1, 1] -> {"block1".."block4": float32 NHWC stage outputs}, the
    raw residual stream at the end of each block (timm's `features_only` taps); shapes and what
    the taps are: `bit_common.contract.feature_shapes`. Traced once per image size, as
    `predict`.
    """
    def forward(x: np.ndarray) -> dict[str, np.ndarray]:
        out = _compiled(model, "features", *x.shape[1:3])(tf.constant(x))
        return {k: v.numpy() for k, v in out.items()}

    return contract.run_dict_in_batches(forward, images,
                                        functools.partial(contract.feature_shapes, model.arch),
                                        batch_size)


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
