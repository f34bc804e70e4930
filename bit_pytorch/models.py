"""BiT's ResNet-v2 in PyTorch: weight-standardized convs, GroupNorm(32), pre-activation units.

The computation is the one the released weights expect (`bit_common.checkpoint`). `param_name`
maps each released key to its `state_dict()` key (`resnet/block1/unit01/a/group_norm/gamma` ->
`body.block1.unit01.gn1.weight`); kernels are OIHW here and HWIO in the files.

The contract shared with bit_jax and bit_tf2:

    m = load_npz(path)                  # architecture inferred from the file; its own head
    m = load_npz(path, num_classes=10)  # the fine-tuning start: a new zero head
    y = predict(m, images)              # np.float32 NHWC in [-1, 1] -> np.float32 logits [N, C]
    f = embed(m, images)                # pre-logits [N, 2048 * width]
    s = features(m, images)             # {"block1".."block4": NHWC stage outputs}
    save_npz(m, path)                   # back to the released layout
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bit_common import checkpoint, contract
from bit_common.checkpoint import HEAD_BIAS, PREFIX
from bit_common.errors import CheckpointError
from bit_common.registry import Arch

GN_GROUPS = 32
GN_EPS = 1e-5
WS_EPS = 1e-10
_LAST = contract.STAGES[-1]  # the block whose output the head reads


class StdConv2d(nn.Conv2d):
    """Conv2d whose kernel is standardized over (I, H, W) per output channel on every call.

    `(w - mean) / sqrt(var + 1e-10)` with the biased variance, computed by one `batch_norm` over
    the kernel viewed as (1, O, I*H*W) (the same arithmetic, one fused kernel).
    """

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight
        flat = w.reshape(1, self.out_channels, -1)
        return F.batch_norm(flat, None, None, training=True, momentum=0.0,
                            eps=WS_EPS).reshape_as(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0) -> StdConv2d:
    return StdConv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)


def _gn(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GN_GROUPS, channels, eps=GN_EPS)


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck: the projection sees relu(gn1(x)); the stride is on conv2."""

    def __init__(self, cin: int, cmid: int, cout: int, stride: int, projection: bool):
        super().__init__()
        self.gn1 = _gn(cin)
        self.conv1 = _conv(cin, cmid, 1)
        self.gn2 = _gn(cmid)
        self.conv2 = _conv(cmid, cmid, 3, stride=stride, padding=1)
        self.gn3 = _gn(cmid)
        self.conv3 = _conv(cmid, cout, 1)
        if projection:
            self.downsample = _conv(cin, cout, 1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In-place ReLUs: GroupNorm's backward needs only its input, and every fresh
        # activation-sized tensor costs page faults on CPU.
        a = F.relu(self.gn1(x), inplace=True)
        shortcut = self.downsample(a) if hasattr(self, "downsample") else x
        out = self.conv1(a)
        out = self.conv2(F.relu(self.gn2(out), inplace=True))
        out = self.conv3(F.relu(self.gn3(out), inplace=True))
        return out.add_(shortcut)


class _ZeroPad(nn.Module):
    """Constant-zero padding on all four sides (the root's max pool pads with zeros, not -inf)."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (self.pad,) * 4, mode="constant", value=0.0)

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class _Head(nn.Module):
    """relu(gn(x)) -> global average pool -> 1x1 conv with bias (a dense layer)."""

    def __init__(self, features: int, num_classes: int):
        super().__init__()
        self.gn = _gn(features)
        self.conv = nn.Conv2d(features, num_classes, 1, bias=True)

    def pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.gn(x), inplace=True).mean(dim=(2, 3), keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pre_logits(x)).flatten(1)


class ResNetV2(nn.Module):
    """BiT ResNet-v2 of one architecture (`bit_common.registry.Arch`), NCHW in, logits out."""

    def __init__(self, arch: Arch, num_classes: int):
        super().__init__()
        self.arch, self.num_classes = arch, num_classes
        wf = arch.width
        self.root = nn.Sequential(OrderedDict(
            pad=_ZeroPad(3),
            conv=_conv(3, 64 * wf, 7, stride=2),
            pool_pad=_ZeroPad(1),
            pool=nn.MaxPool2d(kernel_size=3, stride=2),
        ))
        blocks: OrderedDict[str, nn.Sequential] = OrderedDict()
        for b, name, cin, cmid, cout, stride in checkpoint.unit_names(arch):
            block, unit = name.split("/")
            blocks.setdefault(block, nn.Sequential())
            blocks[block].add_module(unit, PreActBottleneck(cin, cmid, cout, stride,
                                                            projection=unit.endswith("01")))
        self.body = nn.Sequential(blocks)
        self.head = _Head(arch.feature_dim, num_classes)

    def stages(self, x: torch.Tensor, keep: Collection[str] = contract.STAGES
               ) -> dict[str, torch.Tensor]:
        """{name: output (NCHW)} of the blocks named in `keep`, after the root: the one pass
        through the network that logits, pre-logits and `features` share. A block left out of
        `keep` is freed as soon as the next one has read it."""
        out = {}
        x = self.root(x)
        for name, block in self.body.named_children():
            x = block(x)
            if name in keep:
                out[name] = x
        return out

    def _last_stage(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x, keep=(_LAST,))[_LAST]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-logits [N, 2048 * width]."""
        return self.head.pre_logits(self._last_stage(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self._last_stage(x))


# ---- the released names of the module tree's parameters --------------------------------------
_UNIT_LAYERS = {"a": ("gn1", "conv1"), "b": ("gn2", "conv2"), "c": ("gn3", "conv3")}
_GN_LEAVES = {"gamma": "weight", "beta": "bias"}


def param_name(key: str) -> str:
    """The `state_dict()` key of the released parameter `key`."""
    parts = key[len(PREFIX):].split("/")
    if parts[0] == "root_block":
        return "root.conv.weight"
    if parts[0] == "group_norm":
        return f"head.gn.{_GN_LEAVES[parts[1]]}"
    if parts[0] == "head":
        return f"head.conv.{'weight' if parts[2] == 'kernel' else 'bias'}"
    block, unit, sub = parts[0], parts[1], parts[2]
    prefix = f"body.{block}.{unit}."
    if parts[3] == "proj":
        return prefix + "downsample.weight"
    gn, conv = _UNIT_LAYERS[sub]
    if parts[3] == "group_norm":
        return prefix + f"{gn}.{_GN_LEAVES[parts[4]]}"
    return prefix + f"{conv}.weight"


def _to_oihw(value: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(value.transpose(3, 2, 0, 1)) if value.ndim == 4 else value


def _to_hwio(value: np.ndarray) -> np.ndarray:
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value


def to_state_dict(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Canonical (released) arrays -> {state_dict key: array}, kernels OIHW."""
    return checkpoint.to_framework(params, param_name, _to_oihw)


def from_state_dict(state: Mapping[str, np.ndarray], arch: Arch, num_classes: int
                    ) -> dict[str, np.ndarray]:
    """{state_dict key: array} -> canonical arrays, validated against the released layout."""
    return checkpoint.from_framework(state, arch, num_classes, param_name, _to_hwio,
                                     source="The PyTorch model")


# ---- canonical parameters <-> model --------------------------------------------------------
def from_params(arch: Arch, params: Mapping[str, np.ndarray],
                device: torch.device | str | None = None) -> ResNetV2:
    """A model holding canonical (released-layout) `params`, validated first.

    The head size is read off the params. A mismatch raises CheckpointError before any model
    exists, so there is never a half-loaded model.
    """
    if HEAD_BIAS not in params:
        raise CheckpointError(f"The parameters have no {HEAD_BIAS!r}; they are not a BiT "
                              f"ResNet-v2 checkpoint.")
    num_classes = int(params[HEAD_BIAS].shape[0])
    checkpoint.validate(params, arch, num_classes, source="The parameters")
    state = {k: torch.tensor(np.asarray(v, np.float32)) for k, v in to_state_dict(params).items()}
    with torch.device("meta"):  # no wasted random init: the weights arrive next
        model = ResNetV2(arch, num_classes)
    model.load_state_dict(state, strict=True, assign=True)
    if device is not None:
        model = model.to(device)
    return model.eval()


def framework_state(model: nn.Module) -> dict[str, np.ndarray]:
    """{state_dict key: float32 numpy array} of a model (unwraps DDP / torch.compile): copies, not
    views of the parameters that the next optimizer step updates in place."""
    model = unwrap(model)
    return {k: v.detach().float().cpu().numpy().copy() for k, v in model.state_dict().items()}


def to_params(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's parameters under canonical names, in the released (HWIO) layout."""
    m = unwrap(model)
    return from_state_dict(framework_state(m), m.arch, m.num_classes)


def unwrap(model: nn.Module) -> ResNetV2:
    """The ResNetV2 inside a DistributedDataParallel or compiled wrapper."""
    while not isinstance(model, ResNetV2):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"Not a BiT ResNetV2 model: {type(model).__name__}")
        model = inner
    return model


# ---- the contract ----------------------------------------------------------------------------
def load_npz(path: str | os.PathLike, num_classes: int | None = None,
             device: torch.device | str | None = None) -> ResNetV2:
    """Load a released-layout `.npz`; with `num_classes`, a new zero head of that size."""
    arch, params = checkpoint.load_params(path, num_classes=num_classes)
    return from_params(arch, params, device=device)


def save_npz(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the model in the released layout (atomically), loadable by all three frameworks."""
    checkpoint.save_params(to_params(model), path)


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """Run CUDA convolutions and matmuls in true float32 (TF32 off), restoring the flags after."""
    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def memory_format(model: nn.Module) -> torch.memory_format:
    """channels_last if the model's convolution kernels are stored that way, else contiguous."""
    w = unwrap(model).root.conv.weight
    cl = w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


@contextlib.contextmanager
def _inference(model: nn.Module
               ) -> Iterator[tuple[ResNetV2, Callable[[np.ndarray], torch.Tensor]]]:
    """The model in eval mode under inference_mode and full float32, with the function that turns
    an NHWC numpy chunk into its input; the model's training mode is restored after."""
    m = unwrap(model)
    was_training = m.training
    m.eval()
    device = next(m.parameters()).device
    fmt = memory_format(m)  # the inputs follow the kernels' layout

    def to_input(chunk: np.ndarray) -> torch.Tensor:
        # NHWC numpy is NCHW's channels_last view
        x = torch.from_numpy(np.ascontiguousarray(chunk)).permute(0, 3, 1, 2)
        return x.to(device).contiguous(memory_format=fmt)

    try:
        with torch.inference_mode(), full_fp32():
            yield m, to_input
    finally:
        m.train(was_training)


def _run(model: nn.Module, images: np.ndarray, embed_only: bool, batch_size: int) -> np.ndarray:
    with _inference(model) as (m, to_input):
        fn = m.embed if embed_only else m
        width = m.arch.feature_dim if embed_only else m.num_classes
        return contract.run_in_batches(lambda x: fn(to_input(x)).float().cpu().numpy(), images,
                                       width, batch_size)


def predict(model: nn.Module, images: np.ndarray,
            batch_size: int = contract.PREDICT_BATCH) -> np.ndarray:
    """np.float32 NHWC images in [-1, 1] -> np.float32 logits [N, C]."""
    return _run(model, images, embed_only=False, batch_size=batch_size)


def embed(model: nn.Module, images: np.ndarray,
          batch_size: int = contract.PREDICT_BATCH) -> np.ndarray:
    """np.float32 NHWC images in [-1, 1] -> np.float32 pre-logits [N, 2048 * width]."""
    return _run(model, images, embed_only=True, batch_size=batch_size)


def features(model: nn.Module, images: np.ndarray,
             batch_size: int = contract.PREDICT_BATCH) -> dict[str, np.ndarray]:
    """float32 NHWC images in [-1, 1] -> {"block1".."block4": float32 NHWC stage outputs}, the
    raw residual stream at the end of each block (timm's `features_only` taps); shapes and what
    the taps are: `bit_common.contract.feature_shapes`.
    """
    with _inference(model) as (m, to_input):
        def forward(chunk: np.ndarray) -> dict[str, np.ndarray]:
            return {k: v.permute(0, 2, 3, 1).float().cpu().numpy()  # NCHW -> NHWC
                    for k, v in m.stages(to_input(chunk)).items()}

        return contract.run_dict_in_batches(forward, images,
                                            functools.partial(contract.feature_shapes, m.arch),
                                            batch_size)
