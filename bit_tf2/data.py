"""The TensorFlow 2 input pipeline: bit_tfdata's tf.data + tfds pipeline, which bit_jax shares,
so the two frameworks see identical batches. `batches` iterates a dataset (as numpy arrays, or
tensors with numpy=False), turning an unreadable image file into a DataError naming it."""

from bit_tfdata.pipeline import (batches, eval_dataset, image_problem, load_splits,
                                 preprocess_eval, preprocess_train, stepped_batches,
                                 train_dataset)

__all__ = ["batches", "eval_dataset", "image_problem", "load_splits", "preprocess_eval",
           "preprocess_train", "stepped_batches", "train_dataset"]
