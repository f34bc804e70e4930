"""BiT in TensorFlow 2 (Keras 3 on the TensorFlow backend).

- `bit_tf2.models`: the ResNet-v2 and the contract (`load_npz`, `predict`, `embed`, `save_npz`,
  plus `export` to a SavedModel that reloads without this package);
- `bit_tf2.data`: the tf.data + tfds input pipeline (shared with bit_jax);
- `bit_tf2.train`: `python -m bit_tf2.train`, the shared CLI and training loop.

Submodules are imported on demand, so `import bit_tf2` does not start TensorFlow.
"""
