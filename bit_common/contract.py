"""What the three `models` modules share beyond the checkpoint: the contract's input check and how
`predict` and `embed` cut their input into batches.

    y = models.predict(m, images, batch_size=64)   # float32 NHWC in [-1, 1] -> [N, C]
    f = models.embed(m, images, batch_size=64)     # -> [N, 2048 * width]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from bit_common.errors import BiTError

PREDICT_BATCH = 64  # images per forward pass of predict/embed: bounds the activations' memory


def check_images(images: Any) -> np.ndarray:
    """`images` as float32 NHWC with 3 channels, or a BiTError naming the shape it has."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise BiTError(f"Images must be float32 NHWC with 3 channels (RGB scaled to [-1, 1]), "
                       f"got shape {x.shape}. Add a batch axis to a single image, and repeat a "
                       f"grayscale channel three times.")
    return x


def padded_size(n: int, batch_size: int) -> int:
    """The smallest power of two >= n, at most `batch_size`: the rows a chunk of n is run as."""
    return min(batch_size, 1 << max(n - 1, 0).bit_length())


def run_in_batches(fn: Callable[[np.ndarray], np.ndarray], images: Any, width: int,
                   batch_size: int = PREDICT_BATCH, pad: bool = False) -> np.ndarray:
    """`fn` (float32 [b, H, W, 3] -> [b, width]) over chunks of at most `batch_size` images,
    concatenated as float32 [N, width].

    With `pad`, a shorter chunk is filled up with zero images to `padded_size`, so that a
    framework that compiles per input shape compiles a few programs per image size rather than
    one per batch size (every image is computed on its own: group norm has no batch statistics).
    """
    x = check_images(images)
    if batch_size < 1:
        raise BiTError(f"batch_size must be at least 1, got {batch_size}.")
    outs = []
    for start in range(0, len(x), batch_size):
        chunk = x[start:start + batch_size]
        rows = len(chunk)
        if pad and rows < padded_size(rows, batch_size):
            filler = np.zeros((padded_size(rows, batch_size) - rows, *chunk.shape[1:]),
                              np.float32)
            chunk = np.concatenate([chunk, filler])
        outs.append(np.asarray(fn(chunk), np.float32)[:rows])
    return np.concatenate(outs) if outs else np.zeros((0, width), np.float32)
