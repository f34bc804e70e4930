"""BiT in TensorFlow 2 (Keras 3 on the TensorFlow backend).

- `bit_tf2.models`: the ResNet-v2 and the contract (`load_npz`, `predict`, `embed`, `save_npz`,
  plus `export` to a SavedModel that reloads without this package);
- `bit_tf2.data`: the tf.data + tfds input pipeline (shared with bit_jax);
- `bit_tf2.train`: `python -m bit_tf2.train`, the shared CLI and training loop.

Submodules are imported on demand, so `import bit_tf2` does not start TensorFlow. It does ask for
TensorFlow's oneDNN kernels (TF_ENABLE_ONEDNN_OPTS=1, unless the environment says otherwise):
TensorFlow turns them on by itself only on CPUs with AVX-512 VNNI or newer, and elsewhere falls
back to Eigen convolutions, with which an R50x1 training step ran 1.37x slower (2-core AVX2 host).
The variable is read when TensorFlow is first imported, so import bit_tf2 before tensorflow.
"""

import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
