"""The released `.npz` layout: expected keys and shapes, reading, validating and writing files.

Canonical names are the released file's keys, float32, convolution kernels HWIO:

    resnet/root_block/standardized_conv2d/kernel              (7, 7, 3, 64w)
    resnet/block{b}/unit{u:02d}/{a,b,c}/group_norm/{gamma,beta}
    resnet/block{b}/unit{u:02d}/{a,b,c}/standardized_conv2d/kernel   (1x1, 3x3, 1x1)
    resnet/block{b}/unit01/a/proj/standardized_conv2d/kernel  (the first unit of each block)
    resnet/group_norm/{gamma,beta}, resnet/head/conv2d/{kernel,bias}

Some released files spell a convolution `standardized_conv2d_<N>`; `read_npz` accepts both.
The computation the weights expect, which each framework's `models.py` implements: inputs RGB
NHWC in [-1, 1]; the root pads 3, applies its 7x7 stride-2 convolution, pads 1 with zeros and
max-pools 3x3 with stride 2; every kernel is standardized over H, W, I (biased variance, eps
1e-10); group norm has 32 groups and eps 1e-5; a pre-activation bottleneck computes
`a = relu(gn_a(x))`, the shortcut `proj(a)` (first unit of a block) or `x`, then the 1x1, 3x3 (the
unit's stride, padding 1) and 1x1 convolutions with `relu(gn(.))` before the last two; stride 2
on the first unit of blocks 2-4; the head is `relu(group_norm(x))`, a global mean and the 1x1
convolution with bias.

Each framework's `models.py` owns the names its own parameters have and converts with
`to_framework` / `from_framework`.
"""

from __future__ import annotations

import os
import re
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bit_common.errors import CheckpointError
from bit_common.registry import ARCHITECTURES, UNITS, Arch

PREFIX = "resnet/"
ROOT_KERNEL = "resnet/root_block/standardized_conv2d/kernel"
HEAD_KERNEL = "resnet/head/conv2d/kernel"
HEAD_BIAS = "resnet/head/conv2d/bias"
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


_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


def npz_problem(path: Path, error: Exception) -> str:
    """What is wrong with a file np.load could not read as an `.npz`, in words (numpy's own
    messages talk of pickles, which a checkpoint never needs)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if not head:
        return "is empty"
    if head.startswith(b"\x93NUMPY"):
        return "is a single .npy array, not an .npz archive of named arrays"
    if not head.startswith(_ZIP_MAGIC):
        kind = "text" if head.isascii() else "binary data"
        return (f"is not an .npz archive (a zip of .npy arrays): it begins with {kind} "
                f"{head!r}, as a failed download's web page or another format would")
    return (f"is a damaged or truncated .npz archive ({type(error).__name__}), as an "
            f"interrupted download or copy leaves")


def read_npz(path: str | os.PathLike) -> Params:
    """Read a `.npz` into canonical names (float32), with a clear error for unreadable files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {str(path)!r} does not exist. Check the path, or put "
                              f"the released .npz there (see `python -m bit_common.weights`).")
    try:
        with np.load(path, allow_pickle=False) as npz:
            raw = {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"Checkpoint {str(path)!r} {npz_problem(path, e)}: delete it and download it again."
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
            _make_durable(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _make_durable(f: Any) -> None:
    """Flush and fsync the written data (before the rename makes it the file)."""
    f.flush()
    os.fsync(f.fileno())


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


# ---- conversion to and from a framework's own parameter names ---------------------------
def _same(value: np.ndarray) -> np.ndarray:
    return value


def to_framework(params: Mapping[str, np.ndarray], name: Callable[[str], str],
                 layout: Callable[[np.ndarray], np.ndarray] = _same) -> Params:
    """Canonical params -> {name(key): layout(array)}: a framework's names and array layout."""
    return {name(key): layout(value) for key, value in params.items()}


def from_framework(fw_params: Mapping[str, Any], arch: Arch, num_classes: int,
                   name: Callable[[str], str],
                   layout: Callable[[np.ndarray], np.ndarray] = _same,
                   source: str = "The model") -> Params:
    """{framework name: array} -> canonical float32 params (`layout` back to HWIO), validated
    against the released layout of `arch` with `num_classes`."""
    out: Params = {}
    for key in expected_shapes(arch, num_classes):
        fw_name = name(key)
        if fw_name not in fw_params:
            raise CheckpointError(f"{source} has no parameter {fw_name!r} (canonical {key!r}).")
        value = layout(np.asarray(fw_params[fw_name], dtype=np.float32))
        out[key] = np.ascontiguousarray(value)
    validate(out, arch, num_classes, source=source)
    return out
