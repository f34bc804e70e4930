"""BiT in TensorFlow 2 (Keras 3 on the TensorFlow backend).

- `bit_tf2.models`: the ResNet-v2 and the contract (`load_npz`, `predict`, `embed`, `save_npz`,
  plus `export` to a SavedModel that reloads without this package); `bit_tf2.ops`: its kernels
  with hand-written gradients;
- `bit_tf2.data`: the tf.data + tfds input pipeline (bit_tfdata, shared with bit_jax);
- `bit_tf2.backend` and `bit_tf2.train`: the training step and `python -m bit_tf2.train`.

Importing changes nothing process-wide. `bit_common.runtime.configure("tf2")` (the CLI calls it)
asks for TensorFlow's oneDNN kernels, which must happen before TensorFlow is imported, turns
TF32 off and lets TensorFlow take GPU memory as it needs it.
"""
