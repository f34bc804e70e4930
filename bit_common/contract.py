"""What the three `models` modules share beyond the checkpoint: the contract's input check, the
stage outputs' names and shapes, and how `predict`, `embed` and `features` cut their input into
batches.

    y = models.predict(m, images, batch_size=64)   # float32 NHWC in [-1, 1] -> [N, C]
    f = models.embed(m, images, batch_size=64)     # -> [N, 2048 * width]
    s = models.features(m, images, batch_size=64)  # -> {"block1".."block4": NHWC stage outputs}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from bit_common.errors import BiTError
from bit_common.registry import Arch

PREDICT_BATCH = 64  # images per forward pass of predict/embed: bounds the activations' memory

# The keys of `features`: the checkpoint's names of the four blocks whose outputs it returns.
STAGES: tuple[str, ...] = ("block1", "block2", "block3", "block4")


def check_images(images: Any) -> np.ndarray:
    """`images` as float32 NHWC with 3 channels, or a BiTError naming the shape it has."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise BiTError(f"Images must be float32 NHWC with 3 channels (RGB scaled to [-1, 1]), "
                       f"got shape {x.shape}. Add a batch axis to a single image, and repeat a "
                       f"grayscale channel three times.")
    return x


def feature_shapes(arch: Arch, height: int, width: int) -> dict[str, tuple[int, int, int]]:
    """(H, W, C) of each stage output of `features` for `height` x `width` images.

    Every stride-2 layer (the root's 7x7 convolution with padding 3, its 3x3 max pool with padding
    1, the 3x3 convolutions with padding 1 and the 1x1 projections of blocks 2-4) maps a size s to
    ceil(s / 2), so block b has ceil(s / 2 ** (b + 1)) rows and 256 * width * 2 ** (b - 1)
    channels: 56, 28, 14 and 7 for 224 px, 9, 5, 3 and 2 for 33 px.
    """
    shapes = {}
    for b, name in enumerate(STAGES, start=1):
        stride = 2 ** (b + 1)  # sizes rounded up, as ceil(ceil(s / 2) / 2) == ceil(s / 4)
        shapes[name] = (-(-height // stride), -(-width // stride),
                        256 * arch.width * 2 ** (b - 1))
    return shapes


def padded_size(n: int, batch_size: int) -> int:
    """The smallest power of two >= n, at most `batch_size`: the rows a chunk of n is run as."""
    return min(batch_size, 1 << max(n - 1, 0).bit_length())


def run_in_batches(fn: Callable[[np.ndarray], np.ndarray], images: Any, width: int,
                   batch_size: int = PREDICT_BATCH, pad: bool = False) -> np.ndarray:
    """`fn` (float32 [b, H, W, 3] -> [b, width]) over chunks of at most `batch_size` images,
    concatenated as float32 [N, width]; `pad` as in `run_dict_in_batches`."""
    return run_dict_in_batches(lambda chunk: {"out": fn(chunk)}, images,
                               lambda *_: {"out": (width,)}, batch_size, pad)["out"]


def run_dict_in_batches(fn: Callable[[np.ndarray], Mapping[str, Any]], images: Any,
                        shapes: Callable[[int, int], Mapping[str, tuple[int, ...]]],
                        batch_size: int = PREDICT_BATCH, pad: bool = False
                        ) -> dict[str, np.ndarray]:
    """`fn` (float32 [b, H, W, 3] -> {key: [b, ...]}) over chunks of at most `batch_size` images,
    each key's outputs concatenated as float32 [N, ...]. `shapes(H, W)` gives every key's
    trailing shape, for the empty output of no images.

    With `pad`, a shorter chunk is filled up with zero images to `padded_size`, so that a
    framework that compiles per input shape compiles a few programs per image size rather than
    one per batch size (every image is computed on its own: group norm has no batch statistics).
    """
    x = check_images(images)
    if batch_size < 1:
        raise BiTError(f"batch_size must be at least 1, got {batch_size}.")
    outs: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(x), batch_size):
        chunk = x[start:start + batch_size]
        rows = len(chunk)
        if pad and rows < padded_size(rows, batch_size):
            filler = np.zeros((padded_size(rows, batch_size) - rows, *chunk.shape[1:]),
                              np.float32)
            chunk = np.concatenate([chunk, filler])
        for key, value in fn(chunk).items():
            outs.setdefault(key, []).append(np.asarray(value, np.float32)[:rows])
    if not outs:
        return {key: np.zeros((0, *shape), np.float32)
                for key, shape in shapes(*x.shape[1:3]).items()}
    return {key: np.concatenate(parts) for key, parts in outs.items()}
