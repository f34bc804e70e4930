"""The released `.npz` layout: expected keys and shapes, reading, validating, writing, name mapping.

Canonical names are the released file's keys (`resnet/block1/unit01/a/group_norm/gamma`, ...),
float32, kernels HWIO. Each framework package converts with `to_framework` / `from_framework`
and holds no name strings of its own.
"""

from __future__ import annotations

import os
import re
import signal
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from bit_common.errors import CheckpointError
from bit_common.registry import ARCHITECTURES, UNITS, Arch

PREFIX = "resnet/"
ROOT_KERNEL = "resnet/root_block/standardized_conv2d/kernel"
HEAD_KERNEL = "resnet/head/conv2d/kernel"
HEAD_BIAS = "resnet/head/conv2d/bias"
FRAMEWORKS = ("pytorch", "jax", "tf2")
_QUIRK = re.compile(r"standardized_conv2d_\d+")

Params = dict[str, np.ndarray]


def unit_names(arch: Arch) -> list[tuple[int, str, int, int, int, int]]:
    """(block, unit, cin, cmid, cout, stride) for every bottleneck unit, in order."""
    units, cin = [], 64 * arch.width
    for b, n in enumerate(arch.units, start=1):
        cmid = 64 * arch.width * 2 ** (b - 1)
        for u in range(1, n + 1):
            stride = 2 if (u == 1 and b > 1) else 1
            units.append((b, f"block{b}/unit{u:02d}", cin, cmid, 4 * cmid, stride))
            cin = 4 * cmid
    return units


def expected_shapes(arch: Arch, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Every key of a released file of this architecture and head size, with its shape."""
    wf = arch.width
    shapes: dict[str, tuple[int, ...]] = {ROOT_KERNEL: (7, 7, 3, 64 * wf)}
    for _, name, cin, cmid, cout, _ in unit_names(arch):
        p = f"{PREFIX}{name}/"
        for sub, (ch, kernel) in {"a": (cin, (1, 1, cin, cmid)),
                                  "b": (cmid, (3, 3, cmid, cmid)),
                                  "c": (cmid, (1, 1, cmid, cout))}.items():
            shapes[f"{p}{sub}/group_norm/gamma"] = (ch,)
            shapes[f"{p}{sub}/group_norm/beta"] = (ch,)
            shapes[f"{p}{sub}/standardized_conv2d/kernel"] = kernel
        if name.endswith("unit01"):
            shapes[f"{p}a/proj/standardized_conv2d/kernel"] = (1, 1, cin, cout)
    shapes[f"{PREFIX}group_norm/gamma"] = (arch.feature_dim,)
    shapes[f"{PREFIX}group_norm/beta"] = (arch.feature_dim,)
    shapes[HEAD_KERNEL] = (1, 1, arch.feature_dim, num_classes)
    shapes[HEAD_BIAS] = (num_classes,)
    return shapes


def canonical_key(key: str) -> str:
    """Undo the `standardized_conv2d_<N>` spelling some released files use."""
    return _QUIRK.sub("standardized_conv2d", key)


def read_npz(path: str | os.PathLike) -> Params:
    """Read a `.npz` into canonical names (float32), with a clear error for unreadable files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {str(path)!r} does not exist. Check the path, or put "
                              f"the released .npz there (see `python -m bit_common.weights`).")
    try:
        with np.load(path, allow_pickle=False) as npz:
            raw = {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, KeyError) as e:
        raise CheckpointError(
            f"Checkpoint {str(path)!r} is not a readable .npz file ({type(e).__name__}: {e}). "
            f"It may be truncated by an interrupted download: delete it and download it again."
        ) from None
    params: Params = {}
    for key, value in raw.items():
        canon = canonical_key(key)
        if canon in params:
            raise CheckpointError(f"Checkpoint {str(path)!r} holds {canon!r} twice (as {key!r} "
                                  f"too); it is not a released BiT file.")
        params[canon] = np.asarray(value, dtype=np.float32)
    return params


def infer_arch(params: Mapping[str, np.ndarray], source: str = "checkpoint") -> tuple[Arch, int]:
    """(architecture, head classes) read off the shapes of a checkpoint's parameters."""
    for key in (ROOT_KERNEL, HEAD_BIAS):
        if key not in params:
            raise CheckpointError(f"{source} has no {key!r}, so it is not a BiT ResNet-v2 "
                                  f"checkpoint (its first keys: {sorted(params)[:3]}).")
    width = params[ROOT_KERNEL].shape[-1] // 64
    units = tuple(len({k.split("/")[2] for k in params if k.startswith(f"{PREFIX}block{b}/")})
                  for b in range(1, 5))
    depth = next((d for d, u in UNITS.items() if u == units), None)
    arch = Arch(depth or 0, width)
    if depth is None or arch.name not in ARCHITECTURES:
        raise CheckpointError(
            f"{source} has {units} units per block and root width {64 * width}, which matches "
            f"no released architecture ({', '.join(ARCHITECTURES)}).")
    return arch, int(params[HEAD_BIAS].shape[0])


def validate(params: Mapping[str, np.ndarray], arch: Arch, num_classes: int,
             source: str = "checkpoint") -> None:
    """Raise CheckpointError naming the first missing, unexpected or mis-shaped key."""
    want = expected_shapes(arch, num_classes)
    missing = [k for k in want if k not in params]
    extra = [k for k in params if k not in want]
    bad = [(k, tuple(params[k].shape), want[k])
           for k in want if k in params and tuple(params[k].shape) != want[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s), first {missing[0]!r}")
    if extra:
        problems.append(f"{len(extra)} unexpected key(s), first {extra[0]!r}")
    if bad:
        k, got, exp = bad[0]
        problems.append(f"{len(bad)} shape mismatch(es), first {k!r}: file has {got}, "
                        f"{arch.name} needs {exp}")
    if problems:
        raise CheckpointError(
            f"{source} does not fit BiT {arch.name} with {num_classes} classes: "
            + "; ".join(problems) + ". Pass the checkpoint of the architecture you asked for "
            "(--model), or a complete, unmodified released file.")


def load_params(path: str | os.PathLike, num_classes: int | None = None,
                expected: Arch | None = None) -> tuple[Arch, Params]:
    """Read, infer and validate a checkpoint; with `num_classes`, replace the head by zeros.

    With `expected` (the architecture the user asked for), a file of another architecture is
    named as such, and a damaged one is checked key by key against the expected layout.
    """
    params = read_npz(path)
    source = f"Checkpoint {str(path)!r}"
    try:
        arch, classes = infer_arch(params, source=source)
    except CheckpointError:
        if expected is None or HEAD_BIAS not in params:
            raise
        arch, classes = expected, int(params[HEAD_BIAS].shape[0])
    if expected is not None and arch != expected:
        raise CheckpointError(
            f"{source} holds a {arch.name}, but a {expected.name} was asked for. Pass the "
            f"released file of the model you name (--model), or name the model this file is.")
    validate(params, arch, classes, source=source)
    if num_classes is not None:
        params = dict(params)
        params[HEAD_KERNEL] = np.zeros((1, 1, arch.feature_dim, num_classes), np.float32)
        params[HEAD_BIAS] = np.zeros((num_classes,), np.float32)
    return arch, params


TMP_SUFFIX = ".tmp"
# Fault injection for the reliability tests: SIGKILL this process in the middle of its N-th
# atomic write (after the data, before the rename), as a power cut or `kill -9` would.
KILL_ON_SAVE_ENV = "BIT_TEST_KILL_ON_SAVE"
_saves = 0


def _maybe_die_mid_write() -> None:
    global _saves
    _saves += 1
    if os.environ.get(KILL_ON_SAVE_ENV) == str(_saves):
        os.kill(os.getpid(), signal.SIGKILL)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete temporary files left by writes that were killed before their rename."""
    stale = [p for p in Path(folder).glob(f".*{TMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink()
    return stale


def atomic_savez(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """Write a `.npz` to a temporary file beside `path`, fsync, then rename over it.

    A crash at any moment leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            _maybe_die_mid_write()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_params(params: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Validate canonical params and write them in the released layout, atomically."""
    arch, classes = infer_arch(params, source="Parameters to save")
    validate(params, arch, classes, source="Parameters to save")
    want = expected_shapes(arch, classes)
    atomic_savez(path, {k: np.asarray(params[k], np.float32) for k in want})


def random_params(arch: Arch, num_classes: int, seed: int = 0) -> Params:
    """A seeded random checkpoint in exactly the released layout, for tests and offline demos.

    Kernels are He-normal (standardization removes their scale anyway), group-norm scales near
    one, and the head small but non-zero so that logits are informative.
    """
    rng = np.random.default_rng(seed)
    params: Params = {}
    for key, shape in expected_shapes(arch, num_classes).items():
        if key.endswith("/gamma"):
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif key.endswith("/beta") or key == HEAD_BIAS:
            value = 0.1 * rng.standard_normal(shape)
        else:
            fan_in = int(np.prod(shape[:-1]))
            value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        params[key] = value.astype(np.float32)
    return params


def write_random_checkpoint(path: str | os.PathLike, arch: Arch | str, num_classes: int,
                            seed: int = 0) -> Path:
    """Write `random_params` to `path` (atomically) and return the path."""
    if isinstance(arch, str):
        from bit_common.registry import parse_arch
        arch = parse_arch(arch)
    atomic_savez(path, random_params(arch, num_classes, seed))
    return Path(path)


# ---- name mapping -------------------------------------------------------------------------
# PyTorch module names for the three sub-layers of a unit and for the head.
_TORCH_SUB = {"a": ("gn1", "conv1"), "b": ("gn2", "conv2"), "c": ("gn3", "conv3")}
_TORCH_GN = {"gamma": "weight", "beta": "bias"}
_FLAX_GN = {"gamma": "scale", "beta": "bias"}


def _torch_key(key: str) -> str:
    parts = key[len(PREFIX):].split("/")
    if parts[0] == "root_block":
        return "root.conv.weight"
    if parts[0] == "group_norm":
        return f"head.gn.{_TORCH_GN[parts[1]]}"
    if parts[0] == "head":
        return f"head.conv.{'weight' if parts[2] == 'kernel' else 'bias'}"
    block, unit, sub = parts[0], parts[1], parts[2]
    prefix = f"body.{block}.{unit}."
    if parts[3] == "proj":
        return prefix + "downsample.weight"
    gn, conv = _TORCH_SUB[sub]
    if parts[3] == "group_norm":
        return prefix + f"{gn}.{_TORCH_GN[parts[4]]}"
    return prefix + f"{conv}.weight"


def framework_key(key: str, framework: str) -> str:
    """The name a framework's model gives the canonical parameter `key`.

    pytorch: `state_dict()` keys (`body.block1.unit01.conv1.weight`);
    jax: flax parameter paths joined by '/' (`block1/unit01/a/group_norm/scale`);
    tf2: Keras layer paths joined by '/' (`block1/unit01/a/group_norm/gamma`).
    """
    if framework == "pytorch":
        return _torch_key(key)
    stripped = key[len(PREFIX):]
    if framework == "jax":
        head, _, leaf = stripped.rpartition("/")
        if head.endswith("group_norm"):
            leaf = _FLAX_GN[leaf]
        return f"{head}/{leaf}"
    if framework == "tf2":
        return stripped
    raise ValueError(f"framework must be one of {FRAMEWORKS}, got {framework!r}")


def to_framework(params: Mapping[str, np.ndarray], framework: str) -> Params:
    """Canonical params -> {framework name: array in the framework's layout}.

    Only PyTorch changes layout: conv kernels HWIO -> OIHW (the head stays a 1x1 conv).
    """
    out: Params = {}
    for key, value in params.items():
        if framework == "pytorch" and value.ndim == 4:
            value = np.ascontiguousarray(value.transpose(3, 2, 0, 1))
        out[framework_key(key, framework)] = value
    return out


def from_framework(fw_params: Mapping[str, np.ndarray], arch: Arch, num_classes: int,
                   framework: str) -> Params:
    """{framework name: array} -> canonical params, validated against the released layout."""
    out: Params = {}
    for key in expected_shapes(arch, num_classes):
        name = framework_key(key, framework)
        if name not in fw_params:
            raise CheckpointError(f"The {framework} model has no parameter {name!r} "
                                  f"(canonical {key!r}).")
        value = np.asarray(fw_params[name], dtype=np.float32)
        if framework == "pytorch" and value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        out[key] = np.ascontiguousarray(value)
    validate(out, arch, num_classes, source=f"The {framework} model")
    return out
