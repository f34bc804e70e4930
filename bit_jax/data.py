"""The JAX input pipeline: bit_tfdata's tf.data + tfds pipeline, which bit_tf2 shares (as the
official BiT code did), so the two frameworks see identical batches. `batches` iterates a
dataset as numpy arrays, turning an unreadable image file into a DataError naming it. Importing
this module imports TensorFlow's data API; `bit_jax.models` does not."""

from bit_tfdata.pipeline import (batches, eval_dataset, image_problem, load_splits,
                                 preprocess_eval, preprocess_train, stepped_batches,
                                 train_dataset)

__all__ = ["batches", "eval_dataset", "image_problem", "load_splits", "preprocess_eval",
           "preprocess_train", "stepped_batches", "train_dataset"]
