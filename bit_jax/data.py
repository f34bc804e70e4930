"""The JAX input pipeline: the shared tf.data + tensorflow-datasets pipeline of `bit_tf2.data`.

One pipeline serves both TF2 and JAX (the official BiT code did the same), so the two frameworks
see identical batches. This module re-exports it and turns its datasets into numpy iterators (`batches`, which also turns an
unreadable image file into a DataError naming it).
Importing it imports TensorFlow (for tf.data only; no Keras model code): `bit_jax.models` does not.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from bit_tf2.data import (  # noqa: F401  (re-exported)
    batches,
    configure_tf_for_input_only,
    eval_dataset,
    load_eval_split,
    load_train_split,
    train_dataset,
)

__all__ = ["batches", "configure_tf_for_input_only", "eval_dataset", "load_eval_split", "load_train_split",
           "train_dataset", "train_batches", "eval_batches"]


def train_batches(setup: Any, start_step: int, shards: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Numpy batches for steps start_step, start_step+1, ...: image float32 [B, crop, crop, 3] in
    [-1, 1], label int32 [B], mixup_lambda float32 [], mixup_perm int32 [B], step int64 []."""
    return batches(train_dataset(setup, start_step, shards=shards))


def eval_batches(setup: Any, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Numpy evaluation batches: image, label, and mask (0.0 for the padding of the last one)."""
    return batches(eval_dataset(setup, batch_size))
